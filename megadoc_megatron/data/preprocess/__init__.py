"""JSONL (plain, .gz, .zst) -> Megatron indexed datasets, byte-identical to Megatron-LM's
`tools/preprocess_data.py` (default tokenizer system, no sentence splitting).

How it scales: the inputs are cut into parts (whole compressed files; byte ranges of
plain files, cut at line starts). Worker processes, forked from the process that loaded
the tokenizer, each read a part themselves and write its tokens plus one int32 length per
document to a part folder, so no token crosses a process boundary. The parts are then
assembled in input order into one dataset (or one per input file with `--no-merge`). A
part that finished survives an interrupted run and is reused when the same command runs
again; the part folder is removed once the outputs are complete.

How it is fast: a HuggingFace tokenizer is run by gigatoken (Rust), which reads a clean
JSONL part and tokenizes it in one call (`worker._convert_whole`); other parts go line by line
with Python's json (`worker._convert_batch`). gigatoken's ids are checked against the reference
tokenizer (`tokenizers`), which loads and answers in a process of its own: a probe of texts
and each part's first documents. Any difference makes the run say so and use the reference.

The steps, one module each: `parts` (plan the parts, find those an earlier run finished),
`worker` (convert one part, in a worker process), `reference` (the checks of gigatoken),
`convert` (run the parts on a pool of workers), `commit` (assemble and commit the outputs).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megadoc_megatron.data.dataset_info import DatasetInfo
from megadoc_megatron.data.preprocess.commit import commit_outputs, merge_rejects
from megadoc_megatron.data.preprocess.convert import convert_parts
from megadoc_megatron.data.preprocess.parts import Options, cut_into_parts, shard_parts
from megadoc_megatron.data.preprocess.reference import backend_for
from megadoc_megatron.data.tokenizer import tokenizer_path
from megadoc_megatron.errors import InputError
from megadoc_megatron.jsonl import expand_inputs


@dataclass
class PreprocessConfig:
    """The settings of `megadoc preprocess`."""
    inputs: list[str]                   # JSONL files (.jsonl, .jsonl.gz, .jsonl.zst), globs or folders
    output_prefix: str                  # outputs are PREFIX_{key}_document.bin/.idx
    tokenizer_type: str
    tokenizer_model: str                # local HF tokenizer folder or SentencePiece .model file
    json_keys: tuple[str, ...] = ("text",)  # keys to extract, one dataset each
    append_eod: bool = False            # the EOD token after every non-empty document
    workers: int | None = None          # worker processes (None: all cores)
    skip_bad_lines: bool = False        # write bad lines to PREFIX_rejected.jsonl and go on
    merge: bool = True                  # False: one dataset per input file, PREFIX_{i}_{key}_document
    max_part_mb: float = 64             # largest byte range of a plain input file given to one worker at a time
    fast_tokenizer: bool = True         # gigatoken where it gives the same ids
    shard: tuple[int, int] | None = None  # (i, n): array task i of n writes PREFIX_shard{i}of{n}


@dataclass
class PreprocessSummary:
    datasets: list[DatasetInfo]
    files: int
    parts: int
    tokenized_with: str                 # gigatoken | reference
    parts_read_in_rust: int
    lines: int
    blank_lines: int
    documents: int
    rejected: int
    rejects_file: str | None
    tokens: int
    bytes: int
    seconds: float


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Convert JSONL inputs into Megatron indexed datasets; returns counts and timings.

    With `shard=(i, n)` this is array task i of n: it converts its share of the corpus into
    `{output_prefix}_shard{i}of{n}`, and `merge_datasets` joins the n shards in order into what
    one run over the whole corpus writes."""
    started = time.perf_counter()
    inputs, output_prefix, tokenizer_type, json_keys = (config.inputs, config.output_prefix, config.tokenizer_type,
                                                        config.json_keys)
    append_eod, skip_bad_lines, merge, shard = config.append_eod, config.skip_bad_lines, config.merge, config.shard
    workers = config.workers or os.cpu_count() or 1
    _check_shard(workers, shard, merge)
    files = expand_inputs(inputs)
    model_path = tokenizer_path(tokenizer_type, config.tokenizer_model)
    output_prefix = str(Path(output_prefix).expanduser().resolve())
    if shard is not None:
        output_prefix = shard_prefix(output_prefix, *shard)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    parts_dir = Path(f"{output_prefix}.parts")
    parts_dir.mkdir(exist_ok=True)
    options = Options(tokenizer_type, str(model_path), tuple(json_keys), append_eod, skip_bad_lines, str(parts_dir),
                      backend_for(tokenizer_type, config.fast_tokenizer))
    # The parts depend on the corpus, --workers and the shard count only: every array task computes the same.
    all_parts = cut_into_parts(files, workers * (shard[1] if shard else 1), int(config.max_part_mb * (1 << 20)))
    parts = shard_parts(all_parts, shard)
    if merge:
        groups = [(output_prefix, parts)]
    else:
        width = len(str(len(files) - 1))
        groups = [(f"{output_prefix}_{i:0{width}d}", [p for p in parts if p.file_index == i])
                  for i in range(len(files))]
    # tokenizer: its description
    results, options, tokenizer, assemblers = convert_parts(parts, groups, options, workers)
    if not sum(r.documents for r in results.values()) and shard is None:
        for assembler in assemblers.values():
            assembler.abort()
        shutil.rmtree(parts_dir)  # nothing in it worth resuming from
        raise InputError("the input holds no documents", ", ".join(map(str, files)),
                         fix="check the --input paths and --json-keys; blank and rejected lines are not documents")
    datasets = commit_outputs(groups, assemblers, results, options, tokenizer)
    rejected = sum(r.rejected for r in results.values())
    rejects_path = Path(f"{output_prefix}_rejected.jsonl")
    if rejected:
        merge_rejects(parts, results, parts_dir, rejects_path)
    else:
        rejects_path.unlink(missing_ok=True)  # from an earlier run of the same prefix
    shutil.rmtree(parts_dir)
    seconds = time.perf_counter() - started
    in_bytes = sum(r.bytes for r in results.values())
    return PreprocessSummary(
        datasets=datasets, files=len(files), parts=len(parts), tokenized_with=options.backend,
        parts_read_in_rust=sum(r.read_in_rust for r in results.values()),
        lines=sum(r.lines for r in results.values()), blank_lines=sum(r.blank_lines for r in results.values()),
        documents=sum(r.documents for r in results.values()), rejected=rejected,
        rejects_file=str(rejects_path) if rejected else None, tokens=sum(d.tokens for d in datasets),
        bytes=in_bytes, seconds=seconds)


def _check_shard(workers: int, shard, merge: bool) -> None:
    if workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    if shard is None:
        return
    index, count = shard
    if not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: the task index must be in [0, {count})",
                         fix="pass --shard $SLURM_ARRAY_TASK_ID/N from a job submitted with --array=0-(N-1)")
    if not merge:
        raise InputError("--shard and --no-merge do not go together",
                         fix="--no-merge already writes one dataset per input file: give each task its own files")


def shard_prefix(output_prefix: str, index: int, count: int) -> str:
    return f"{output_prefix}_shard{index:05d}of{count:05d}"
