"""`megadoc megadocs`: arguments -> MegadocsConfig -> build_megadocs, summarized."""

from __future__ import annotations

import argparse
import dataclasses

from megadoc_megatron.data.tokenizer import TOKENIZER_TYPES
from megadoc_megatron.megadocs.assemble import KINDS, MegadocsConfig, MegadocsSummary, build_megadocs


def format_summary(summary: MegadocsSummary) -> str:
    lines = [f"{summary.kind}: {summary.documents:,} documents from {summary.sources:,} sources and "
             f"{summary.generations:,} generations (G = {summary.generations_per_document}) -> {summary.output}",
             f"originals make up {summary.original_chars / max(summary.chars, 1):.1%} of the characters"]
    for unit in ("tokens", "chars"):
        stats = getattr(summary, f"{unit}_per_document")
        if stats:
            lines.append(f"{unit}/document: min {stats['min']:,}  mean {stats['mean']:,.0f}  "
                         f"median {stats['median']:,.0f}  "
                         f"p90 {stats['p90']:,.0f}  max {stats['max']:,}  (total {stats['total']:,})")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--input", dest="real", nargs="+", required=True,
                        help="real documents: JSONL files, globs or folders")
    parser.add_argument("--generation-records", dest="generations", nargs="+", required=True,
                        help="what `megadoc synth` wrote: its --output-dir, or shard files")
    parser.add_argument("--output", required=True, help="output JSONL file (a .summary.json is written beside it)")
    parser.add_argument("--original", choices=("back", "front", "none"), default="back",
                        help="stitch: where the original goes; simple: 'none' leaves it out, "
                             "else it is its own document")
    parser.add_argument("--separator", default="\n\n", help="stitch: text between the parts")
    parser.add_argument("--order", choices=("index", "shuffle"), default="index", help="stitch: order of the rephrases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think-open", default="<think>")
    parser.add_argument("--think-close", default="</think>")
    parser.add_argument("--max-generations", type=int,
                        help="simple/stitch: use only generations with index below this (the first N of each document; "
                             "the same texts as `megadoc synth -G N`)")
    parser.add_argument("--allow-uneven", action="store_true",
                        help="accept documents with other numbers of generations")
    parser.add_argument("--id-key", default="id")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="report token lengths with this tokenizer")
    parser.add_argument("--tokenizer-model")


def run(args: argparse.Namespace) -> MegadocsSummary:
    config = MegadocsConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MegadocsConfig)})
    summary = build_megadocs(config)
    print(format_summary(summary))
    return summary
