"""`megadoc report`: arguments -> build_report, its markdown printed."""

from __future__ import annotations

import argparse

from megadoc_megatron.evaluate.report import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="checkpoint.dir of each run (with RUN/eval/ from `megadoc eval`)")
    parser.add_argument("--output-dir", dest="output", required=True,
                        help="folder for report.md, report.html, report.json and PNGs")
    parser.add_argument("--eval-name", help="the held-out set to report (the --eval-name of `megadoc eval`), "
                                            "when there are several")


def run(args: argparse.Namespace) -> dict:
    report = build_report(args.runs, args.output, args.eval_name)
    print(report["markdown"])
    return report
