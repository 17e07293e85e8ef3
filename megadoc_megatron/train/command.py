"""`megadoc train CONFIG`: pre-train the Llama-style GPT on a `megadoc blend` with megatron-core.

Launch: `megadoc train cfg.yaml` (one process), `torchrun --nproc-per-node 8 -m megadoc_megatron.cli
train cfg.yaml` (one node) or `srun megadoc train cfg.yaml` (SLURM; see examples/slurm/train.sbatch).
World size = tensor x pipeline x data parallel; the data-parallel size is what is left over.
Kept apart from trainer.py so that building the CLI does not import torch (2-3 s).
"""

from __future__ import annotations

import argparse

from megadoc_megatron.train.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see examples/repro_300m/train.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optimizer.lr=1e-3 (repeatable)")


def run(args: argparse.Namespace) -> dict:
    from megadoc_megatron.train.trainer import train

    return train(load_config(args.config, args.overrides))
