"""`megadoc sweep CONFIG`: arguments -> SweepConfig -> run_sweep."""

from __future__ import annotations

import argparse
import dataclasses

from megadoc_megatron.experiment.sweep import SweepConfig, run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment config with a sweep section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable; passed on to SLURM jobs)")
    parser.add_argument("--mode", choices=("neighbours", "grid"), default="neighbours",
                        help="which runs are needed: the neighbours of the best point so far, or the whole grid")
    parser.add_argument("--execute", choices=("local", "slurm"),
                        help="run the needed points here one after another (repeating until tuned), or submit "
                             "one SLURM job each; default: only print the table")
    parser.add_argument("--sbatch-args", default="", help='slurm: options for sbatch, '
                                                          'e.g. "--nodes 1 --gres gpu:8 --time 4:00:00"')
    parser.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch commands "
                                                               "instead of running them")
    parser.add_argument("--point", help="run just this point (what each SLURM job does)")
    parser.add_argument("--preset", choices=("mixture",),
                        help="mixture: the synthetic-mixture study of the config's mixture section (w x budget x "
                             "data type; always the whole grid), instead of the sweep section")


def run(args: argparse.Namespace) -> dict:
    return run_sweep(SweepConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig)}))
