"""JSONL (plain, .gz, .zst) -> Megatron indexed datasets, byte-identical to Megatron-LM's
`tools/preprocess_data.py` (default tokenizer system, no sentence splitting).

How it scales: the inputs are cut into parts (whole compressed files; byte ranges of
plain files, cut at line starts). Each worker process reads its part itself,
tokenizes it in batches and writes the tokens plus one int32 length per document to
a part folder, so no token crosses a process boundary. The parts are then assembled
in input order into one dataset (or one per input file with `--no-merge`). A part
that finished survives an interrupted run and is reused when the same command runs
again; the part folder is removed once the outputs are complete.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megadoc_megatron import __version__
from megadoc_megatron.data.indexed import commit_dataset
from megadoc_megatron.data.tokenizer import TOKENIZER_TYPES, load_tokenizer
from megadoc_megatron.errors import InputError
from megadoc_megatron.records import (count_lines_before, expand_inputs, is_compressed, iter_lines,
                                      line_starts, parse_record, write_text_atomic)

BATCH_LINES = 512
BATCH_BYTES = 4 << 20
MIN_PART_BYTES = 1 << 20


@dataclass(frozen=True)
class Options:
    """What a worker needs to convert any part (sent once to each worker)."""

    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple[str, ...]
    append_eod: bool
    skip_bad_lines: bool
    parts_dir: str


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of one input file (end None: to its end)."""

    index: int
    file_index: int
    path: str
    start: int
    end: int | None

    def stem(self, options: Options, tokenizer_fingerprint: str) -> str:
        """Part file name: changes whenever the input file or a setting that shapes tokens changes."""
        stat = os.stat(self.path)
        key = [self.path, stat.st_size, stat.st_mtime_ns, self.start, self.end, options.json_keys,
               options.append_eod, options.skip_bad_lines, tokenizer_fingerprint, __version__]
        return f"part{self.index:06d}-" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]


@dataclass
class PartResult:
    index: int
    stem: str
    lines: int = 0
    blank_lines: int = 0
    documents: int = 0
    rejected: int = 0
    bytes: int = 0
    tokens: dict = field(default_factory=dict)
    error: InputError | None = None


# ---------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(options: Options) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _worker["options"] = options
    _worker["tokenizer"] = load_tokenizer(options.tokenizer_type, options.tokenizer_model)


def _texts_of(record: dict, keys, path, line) -> list[str]:
    texts = []
    for key in keys:
        if key not in record:
            raise InputError(f"missing key {key!r}", path, line, fix="add the key or choose others with --json-keys")
        value = record[key]
        if not isinstance(value, str):
            raise InputError(f"the value of {key!r} is a JSON {type(value).__name__}, not a string", path, line,
                             fix="store the document text as a JSON string")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise InputError(f"the value of {key!r} holds a lone surrogate escape at character {error.start}",
                                 path, line, fix="remove or pair the \\uD800-\\uDFFF escape") from None
        texts.append(value)
    return texts


def _to_arrays(ids: list[list[int]], tokenizer, append_eod: bool) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if append_eod:
        nonempty = lengths > 0
        tokens = np.insert(tokens, np.cumsum(lengths)[nonempty], tokenizer.eod)
        lengths = lengths + nonempty
    return tokens, lengths


def _out_of_vocab_documents(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if not bad.any():
        return np.zeros(0, dtype=np.int64)
    document_of_token = np.repeat(np.arange(len(lengths)), lengths)
    return np.unique(document_of_token[bad])


class _PartWriter:
    """Token and length files of one part, one pair per JSON key, plus rejected lines."""

    def __init__(self, parts_dir: Path, stem: str, keys, dtype):
        self.dtype = dtype
        self.tokens = {key: open(parts_dir / f"{stem}.{key}.tokens", "wb") for key in keys}
        self.lengths = {key: open(parts_dir / f"{stem}.{key}.lengths", "wb") for key in keys}
        self.rejects = open(parts_dir / f"{stem}.rejects.jsonl", "w", encoding="utf-8")

    def reject(self, line: int, raw: bytes, error: InputError) -> None:
        record = {"line": line, "reason": error.message, "text": raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")}
        self.rejects.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens.astype(self.dtype).tofile(self.tokens[key])
        lengths.astype(np.int32).tofile(self.lengths[key])

    def close(self) -> None:
        for stream in [*self.tokens.values(), *self.lengths.values(), self.rejects]:
            stream.close()


def _convert_batch(batch: list[tuple[int, bytes]], part: Part, writer: _PartWriter, result: PartResult) -> None:
    options, tokenizer = _worker["options"], _worker["tokenizer"]
    lines, raws, texts = [], [], []
    for line, raw in batch:
        if not raw.strip():
            result.blank_lines += 1
            continue
        try:
            texts.append(_texts_of(parse_record(raw, part.path, line), options.json_keys, part.path, line))
        except InputError as error:
            if not options.skip_bad_lines:
                raise
            writer.reject(line, raw, error)
            result.rejected += 1
            continue
        lines.append(line)
        raws.append(raw)
    arrays = {}
    for column, key in enumerate(options.json_keys):
        ids = tokenizer.encode_batch([row[column] for row in texts])
        arrays[key] = _to_arrays(ids, tokenizer, options.append_eod)
    keep = np.ones(len(lines), dtype=bool)
    for key, (tokens, lengths) in arrays.items():
        for document in _out_of_vocab_documents(tokens, lengths, tokenizer.vocab_size):
            error = InputError(f"a token id of {key!r} is outside the vocabulary (size {tokenizer.vocab_size})",
                               part.path, lines[document],
                               fix="use the tokenizer whose vocabulary covers its own ids (check added tokens)")
            if not options.skip_bad_lines:
                raise error
            if keep[document]:
                writer.reject(lines[document], raws[document], error)
                result.rejected += 1
                keep[document] = False
    for key, (tokens, lengths) in arrays.items():
        if not keep.all():
            tokens, lengths = tokens[np.repeat(keep, lengths)], lengths[keep]
        writer.write(key, tokens, lengths)
        result.tokens[key] = result.tokens.get(key, 0) + int(lengths.sum())
    result.documents += int(keep.sum())


def _batches(part: Part):
    batch, size = [], 0
    for line, raw in enumerate(iter_lines(part.path, part.start, part.end), start=1):
        batch.append((line, raw))
        size += len(raw)
        if len(batch) >= BATCH_LINES or size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    yield batch, size


def _convert_part(job: tuple[Part, str]) -> PartResult:
    """Convert one part, in a worker. Bad input comes back in `error` (line numbers within the part)."""
    part, stem = job
    options, tokenizer = _worker["options"], _worker["tokenizer"]
    parts_dir = Path(options.parts_dir)
    result = PartResult(part.index, stem)
    writer = _PartWriter(parts_dir, stem, options.json_keys, tokenizer.dtype)
    try:
        for batch, size in _batches(part):
            _convert_batch(batch, part, writer, result)
            result.lines += len(batch)
            result.bytes += size
    except InputError as error:
        result.error = error
        return result
    finally:
        writer.close()
    marker = parts_dir / f"{stem}.done.json"
    marker.with_suffix(".tmp").write_text(json.dumps(asdict(result)))
    os.replace(marker.with_suffix(".tmp"), marker)  # a killed worker never leaves a half-written marker
    return result


# ---------------------------------------------------------------- main process


def plan_parts(files: list[Path], workers: int, max_part_bytes: int) -> list[Part]:
    """Cut plain files into byte ranges so that every worker has several parts to do."""
    plain_bytes = sum(f.stat().st_size for f in files if not is_compressed(f))
    # ~8 parts per worker: the last parts to finish leave little of the run to a single worker.
    part_bytes = min(max_part_bytes, max(MIN_PART_BYTES, math.ceil(plain_bytes / (8 * workers))))
    parts = []
    for file_index, path in enumerate(files):
        size = path.stat().st_size
        if is_compressed(path) or size <= part_bytes:
            ranges = [(0, None)]
        else:
            count = math.ceil(size / part_bytes)
            starts = sorted(set(line_starts(path, [size * i // count for i in range(count)])))
            starts = [s for s in starts if s < size]
            ranges = list(zip(starts, starts[1:] + [None]))
        for start, end in ranges:
            parts.append(Part(len(parts), file_index, str(path), start, end))
    return parts


def _input_bytes(part: Part) -> int:
    """Bytes of the input file (compressed, if it is) that the part covers."""
    return (part.end or os.path.getsize(part.path)) - part.start


def _run_parts(parts, stems, options: Options, workers: int) -> dict[int, PartResult]:
    """Convert the parts not already done by an earlier run; results keyed by part index."""
    parts_dir = Path(options.parts_dir)
    results = {}
    for part in parts:
        done = parts_dir / f"{stems[part.index]}.done.json"
        if done.is_file():
            results[part.index] = PartResult(**json.loads(done.read_text()))
    todo = [(part, stems[part.index]) for part in parts if part.index not in results]
    if results:
        print(f"resuming: {len(results)} of {len(parts)} parts were converted by an earlier run", file=sys.stderr)
    if not todo:
        return results
    from tqdm import tqdm

    total = sum(_input_bytes(part) for part, _ in todo)
    # An executor, not multiprocessing.Pool: a worker killed (say by the OOM killer) raises
    # BrokenProcessPool here instead of hanging the run forever.
    executor = ProcessPoolExecutor(min(workers, len(todo)), multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(options,))
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", disable=None, file=sys.stderr) as bar:
            for future in as_completed([executor.submit(_convert_part, job) for job in todo]):
                result = future.result()
                if result.error is not None:
                    error, part = result.error, parts[result.index]
                    line = count_lines_before(part.path, part.start) + error.line  # the worker counted from its part
                    raise InputError(error.message, error.path, line, error.fix)
                results[result.index] = result
                bar.update(_input_bytes(parts[result.index]))
    except BrokenProcessPool:
        raise InputError("a worker process died (out of memory?)", options.parts_dir,
                         fix="lower --workers or --max-part-mb and run the same command again: finished parts are reused"
                         ) from None
    except BaseException:
        for process in list(executor._processes.values()):  # stop now; unfinished parts are redone on resume
            process.terminate()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return results


def _merge_rejects(parts, stems, results, parts_dir: Path, destination: Path) -> None:
    """One rejects file for the whole run, with line numbers counted from the start of each input file."""
    temporary = destination.with_name(destination.name + ".tmp")
    lines_before, previous_path = 0, None
    with open(temporary, "w", encoding="utf-8") as out:
        for part in parts:  # in input order, so the lines of earlier parts of a file are known
            if part.path != previous_path:
                lines_before, previous_path = 0, part.path
            with open(parts_dir / f"{stems[part.index]}.rejects.jsonl", encoding="utf-8") as rejects:
                for row in rejects:
                    record = json.loads(row)
                    out.write(json.dumps({"file": part.path, "line": record["line"] + lines_before,
                                          "reason": record["reason"], "text": record["text"]},
                                         ensure_ascii=False) + "\n")
            lines_before += results[part.index].lines
    os.replace(temporary, destination)


def metadata_path(prefix) -> Path:
    return Path(f"{prefix}.json")


def recorded_tokenizer(prefix):
    """The tokenizer `preprocess` recorded beside a dataset, or None (e.g. made by Megatron-LM)."""
    meta = metadata_path(prefix)
    if not meta.is_file():
        return None
    recorded = json.loads(meta.read_text())["tokenizer"]
    return load_tokenizer(recorded["type"], recorded["model"])


def _commit_outputs(groups, stems, results, options: Options, tokenizer) -> list[dict]:
    parts_dir = Path(options.parts_dir)
    written = []
    for output_prefix, group in groups:
        for key in options.json_keys:
            prefix = f"{output_prefix}_{key}_document"
            files = [parts_dir / f"{stems[p.index]}.{key}" for p in group]
            commit_dataset(prefix, tokenizer.dtype, [Path(f"{f}.tokens") for f in files],
                           [Path(f"{f}.lengths") for f in files])
            summary = {
                "prefix": prefix,
                "documents": sum(results[p.index].documents for p in group),
                "tokens": sum(results[p.index].tokens.get(key, 0) for p in group),
                "inputs": sorted({p.path for p in group}),
                "json_key": key,
                "append_eod": options.append_eod,
                "dtype": np.dtype(tokenizer.dtype).name,
                "tokenizer": tokenizer.describe(),
                "created_by": f"megadoc-megatron {__version__}",
            }
            write_text_atomic(metadata_path(prefix), json.dumps(summary, indent=2) + "\n")
            written.append(summary)
    return written


def preprocess(inputs: list[str], output_prefix: str, tokenizer_type: str, tokenizer_model: str,
               json_keys=("text",), append_eod: bool = False, workers: int | None = None,
               skip_bad_lines: bool = False, merge: bool = True, max_part_mb: float = 256) -> dict:
    """Convert JSONL inputs into Megatron indexed datasets; returns counts and timings."""
    started = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    output_prefix = str(Path(output_prefix).expanduser().resolve())
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    parts_dir = Path(f"{output_prefix}.parts")
    parts_dir.mkdir(exist_ok=True)
    options = Options(tokenizer_type, str(tokenizer.model_path), tuple(json_keys), append_eod, skip_bad_lines,
                      str(parts_dir))
    parts = plan_parts(files, workers, int(max_part_mb * (1 << 20)))
    fingerprint = tokenizer.fingerprint()
    stems = {part.index: part.stem(options, fingerprint) for part in parts}
    results = _run_parts(parts, stems, options, workers)

    if merge:
        groups = [(output_prefix, parts)]
    else:
        width = len(str(len(files) - 1))
        groups = [(f"{output_prefix}_{i:0{width}d}", [p for p in parts if p.file_index == i]) for i in range(len(files))]
    datasets = _commit_outputs(groups, stems, results, options, tokenizer)
    rejected = sum(r.rejected for r in results.values())
    rejects_path = Path(f"{output_prefix}_rejected.jsonl")
    if rejected:
        _merge_rejects(parts, stems, results, parts_dir, rejects_path)
    else:
        rejects_path.unlink(missing_ok=True)  # from an earlier run of the same prefix
    shutil.rmtree(parts_dir)
    seconds = time.perf_counter() - started
    in_bytes = sum(r.bytes for r in results.values())
    return {
        "datasets": datasets,
        "files": len(files),
        "parts": len(parts),
        "lines": sum(r.lines for r in results.values()),
        "blank_lines": sum(r.blank_lines for r in results.values()),
        "documents": sum(r.documents for r in results.values()),
        "rejected": rejected,
        "rejects_file": str(rejects_path) if rejected else None,
        "tokens": sum(d["tokens"] for d in datasets),
        "bytes": in_bytes,
        "seconds": seconds,
    }


def format_summary(summary: dict) -> str:
    seconds = max(summary["seconds"], 1e-9)
    lines = [f"{d['prefix']}.bin/.idx: {d['documents']:,} documents, {d['tokens']:,} tokens ({d['dtype']})"
             for d in summary["datasets"]]
    lines.append(
        f"{summary['lines']:,} lines from {summary['files']} file(s) in {seconds:.1f} s: "
        f"{summary['documents'] / seconds:,.0f} docs/s, {summary['tokens'] / seconds:,.0f} tokens/s, "
        f"{summary['bytes'] / seconds / 1e6:.1f} MB/s")
    if summary["blank_lines"]:
        lines.append(f"{summary['blank_lines']:,} blank line(s) skipped")
    if summary["rejected"]:
        lines.append(f"{summary['rejected']:,} bad line(s) rejected, listed with their reasons in {summary['rejects_file']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("input data")
    data.add_argument("--input", nargs="+", required=True,
                      help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), globs or folders")
    data.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract, one dataset each")
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    tok.add_argument("--tokenizer-model", required=True,
                     help="local HF tokenizer folder (with tokenizer.json) or SentencePiece .model file")
    proc = parser.add_argument_group("tokenization process")
    proc.add_argument("--append-eod", action="store_true", help="append the EOD token to every non-empty document")
    proc.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    proc.add_argument("--skip-bad-lines", action="store_true",
                      help="write bad lines with their reason to PREFIX_rejected.jsonl and go on")
    proc.add_argument("--max-part-mb", type=float, default=256,
                      help="largest byte range of a plain input file given to one worker at a time")
    out = parser.add_argument_group("output data")
    out.add_argument("--output-prefix", required=True, help="outputs are PREFIX_{key}_document.bin/.idx")
    out.add_argument("--no-merge", dest="merge", action="store_false",
                     help="one dataset per input file, PREFIX_{i}_{key}_document, instead of one merged dataset")


def run(args: argparse.Namespace) -> dict:
    summary = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                         args.json_keys, args.append_eod, args.workers, args.skip_bad_lines, args.merge,
                         args.max_part_mb)
    print(format_summary(summary))
    return summary
