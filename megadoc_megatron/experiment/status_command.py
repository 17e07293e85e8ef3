"""`megadoc status WORK`: arguments -> read_status, printed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from megadoc_megatron.experiment.status import format_status, read_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="the work folder of `megadoc run` (its work_dir)")
    parser.add_argument("--json", action="store_true", help="print the states as JSON")


def run(args: argparse.Namespace) -> list:
    states = read_status(args.work)
    print(json.dumps([asdict(s) for s in states], indent=2) if args.json else format_status(states))
    return states
