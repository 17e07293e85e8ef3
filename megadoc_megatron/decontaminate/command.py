"""`megadoc decontaminate`: arguments -> DecontaminateConfig -> decontaminate, summarized."""

from __future__ import annotations

import argparse
import dataclasses

from megadoc_megatron.data.overlap import NGRAM, THRESHOLD
from megadoc_megatron.decontaminate.scan import DecontaminateConfig, DecontaminationSummary, decontaminate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="synthetic JSONL (megadocs or generation records): files, globs "
                                                  "or folders")
    parser.add_argument("--held-out", nargs="+", required=True, help="the held-out JSONL")
    parser.add_argument("--report", required=True, help="JSON file for the report")
    parser.add_argument("--output", help="JSONL file for the records that are not contaminated (unchanged)")
    parser.add_argument("--tasks", nargs="+", help="lm-eval tasks whose documents count as held out too (read from "
                                                   "the local datasets cache or --include-path)")
    parser.add_argument("--include-path", help="a folder of lm-eval task YAMLs (they can run code: trusted files only)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--held-out-text-key", default="text")
    parser.add_argument("--id-key", default="id", help="names records and documents in the report")
    parser.add_argument("--overlap-ngram", type=int, default=NGRAM, help="n-gram length in words")
    parser.add_argument("--overlap-threshold", type=float, default=THRESHOLD,
                        help="a record is contaminated when it and a reference document share this fraction of the "
                             "smaller one's n-grams (1.0: one holds the other whole)")


def format_summary(summary: DecontaminationSummary) -> str:
    lines = [f"{summary.contaminated:,} of {summary.records:,} records quote held-out text "
             f"({summary.overlap_ngram}-gram overlap >= {summary.overlap_threshold:.0%} against "
             f"{summary.references:,} reference documents)"]
    if summary.by_reference:
        top = sorted(summary.by_reference.items(), key=lambda item: -item[1])[:5]
        lines.append("most quoted: " + ", ".join(f"{name} ({count})" for name, count in top))
    for example in summary.examples[:3]:
        lines.append(f"  {example['record']} ~ {example['reference']} ({example['overlap']:.0%}): "
                     f"\"{example['quote']}\"")
    if summary.output:
        lines.append(f"kept {summary.records - summary.contaminated:,} records -> {summary.output}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> DecontaminationSummary:
    config = DecontaminateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DecontaminateConfig)})
    summary = decontaminate(config)
    print(format_summary(summary))
    print(f"report: {config.report}")
    return summary
