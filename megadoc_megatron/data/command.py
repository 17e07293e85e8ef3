"""`megadoc preprocess`: arguments -> PreprocessConfig -> preprocess, summarized."""

from __future__ import annotations

import argparse
import os

from megadoc_megatron.data.preprocess import PreprocessConfig, PreprocessSummary, preprocess
from megadoc_megatron.data.preprocess.parts import GIGATOKEN
from megadoc_megatron.data.tokenizer import TOKENIZER_TYPES


def format_summary(summary: PreprocessSummary) -> str:
    seconds = max(summary.seconds, 1e-9)
    lines = [f"{d.prefix}.bin/.idx: {d.documents:,} documents, {d.tokens:,} tokens ({d.dtype})"
             for d in summary.datasets]
    lines.append(
        f"{summary.lines:,} lines from {summary.files} file(s) in {seconds:.1f} s: "
        f"{summary.documents / seconds:,.0f} docs/s, {summary.tokens / seconds:,.0f} tokens/s, "
        f"{summary.bytes / seconds / 1e6:.1f} MB/s")
    if summary.tokenized_with == GIGATOKEN:
        lines.append(f"tokenized by gigatoken, checked against tokenizers; {summary.parts_read_in_rust} of "
                     f"{summary.parts} part(s) clean JSONL read in Rust, the others line by line")
    if summary.blank_lines:
        lines.append(f"{summary.blank_lines:,} blank line(s) skipped")
    if summary.rejected:
        lines.append(f"{summary.rejected:,} bad line(s) rejected, listed with their reasons in {summary.rejects_file}")
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
    proc.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    proc.add_argument("--skip-bad-lines", action="store_true",
                      help="write bad lines with their reason to PREFIX_rejected.jsonl and go on")
    proc.add_argument("--max-part-mb", type=float, default=64,
                      help="largest byte range of a plain input file given to one worker at a time")
    proc.add_argument("--no-gigatoken", dest="fast_tokenizer", action="store_false",
                      help="tokenize with tokenizers only (by default gigatoken does, where it gives the same ids)")
    proc.add_argument("--shard", type=_shard_argument, metavar="I/N",
                      help="be task I of an array of N (0-based, e.g. $SLURM_ARRAY_TASK_ID/16; N stays the array's "
                           "size when one task is rerun): convert that share into PREFIX_shardIofN; join the shards "
                           "with `megadoc merge`")
    out = parser.add_argument_group("output data")
    out.add_argument("--output-prefix", required=True, help="outputs are PREFIX_{key}_document.bin/.idx")
    out.add_argument("--no-merge", dest="merge", action="store_false",
                     help="one dataset per input file, PREFIX_{i}_{key}_document, instead of one merged dataset")


def _shard_argument(value: str) -> tuple[int, int]:
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and int(count) > 0):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 3/16, not {value!r}")
    return int(index), int(count)


def run(args: argparse.Namespace) -> PreprocessSummary:
    summary = preprocess(PreprocessConfig(
        args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model, tuple(args.json_keys),
        args.append_eod, args.workers or os.cpu_count(), args.skip_bad_lines, args.merge, args.max_part_mb,
        args.fast_tokenizer, args.shard))
    print(format_summary(summary))
    return summary
