"""`megadoc run CONFIG`: the whole method from one experiment config, each stage cached and resumable.

Outputs: WORK/stages/NAME.KEY/ (one folder per stage and settings), WORK/runs/RECIPE -> its
(last) training stage (checkpoints in ckpt/, evaluation results in ckpt/eval/), WORK/report -> the
report stage (report.md, report.html, PNG plots), and for refresh recipes WORK/lineage/RECIPE.json:
every round's generator, synthetic data and checkpoint, and how its training ended.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment config (see examples/tiny_cpu/experiment.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set work_dir=/scratch/run1 (repeatable)")
    parser.add_argument("--recipes", nargs="+", metavar="NAME", help="run only these recipes (and what they need)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="stop before the report")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each stage, whether it is done, and its commands, then what each synth and "
                             "train stage costs in GPU-hours")
    parser.add_argument("--execute", choices=("local", "slurm"), default="local",
                        help="run the stages here one after another, or submit each as a SLURM job chained by "
                             "dependencies (resources: the config's launch.slurm); with --dry-run, print the jobs")
    parser.add_argument("--stage", dest="only_stage", help=argparse.SUPPRESS)  # what each SLURM job runs
    parser.add_argument("--array-task", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--array-size", type=int, default=0, help=argparse.SUPPRESS)
    cost = parser.add_argument_group("cost (with --dry-run)")
    cost.add_argument("--tokens-per-second", type=float, metavar="X",
                      help="generation: output tokens/s per GPU of the generator (none: token counts only)")
    cost.add_argument("--mfu", type=float, default=0.4, help="training: model FLOPs utilization")
    cost.add_argument("--gpu-tflops", type=float, default=989.0,
                      help="training: peak TFLOP/s per GPU (989: H100 SXM dense BF16)")


def run(args: argparse.Namespace) -> dict:
    from megadoc_megatron.experiment.config import load_experiment
    from megadoc_megatron.experiment.runner import run_experiment, run_one_stage, select_recipes

    experiment = select_recipes(load_experiment(Path(args.config), args.overrides), args.recipes)
    if args.only_stage:
        return {args.only_stage: run_one_stage(experiment, args.only_stage, args.array_task, args.array_size)}
    cost = {"tokens_per_second": args.tokens_per_second, "mfu": args.mfu, "gpu_tflops": args.gpu_tflops}
    slurm_argv = None
    if args.execute == "slurm":  # each job repeats this run's config, overrides and recipes
        slurm_argv = ["run", str(Path(args.config).resolve()), *[f"--set={o}" for o in args.overrides],
                      *(["--recipes", *args.recipes] if args.recipes else []),
                      *([] if args.report else ["--no-report"])]
    return run_experiment(experiment, args.report, args.dry_run, cost, slurm_argv)
