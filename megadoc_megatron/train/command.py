"""`megadoc train CONFIG`: pre-train the Llama-style GPT on a `megadoc blend` with megatron-core.

Launch: `megadoc train cfg.yaml` (one process), `torchrun --nproc-per-node 8 -m megadoc_megatron.cli
train cfg.yaml` (one node) or `srun megadoc train cfg.yaml` (SLURM; see examples/slurm/train.sbatch).
World size = tensor x pipeline x data parallel; the data-parallel size is what is left over.
`--dry-run` tells, without starting anything, whether a launch of that size can run the config.
Stopped by a signal or its time budget (the config's `exit` section), it exits with status 75 once the
checkpoint is saved: run the same command again to resume.
Kept apart from trainer.py so that building the CLI does not import torch (2-3 s).
"""

from __future__ import annotations

import argparse

from megadoc_megatron.errors import InputError, Interrupted
from megadoc_megatron.train.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see examples/repro_300m/train.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optimizer.lr=1e-3 (repeatable)")
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="resume although the blend or the sequence length differs from the checkpoint's "
                             "(what changed is printed); same as --set checkpoint.allow_changed_data=true")
    parser.add_argument("--dry-run", action="store_true",
                        help="only check that --world-size processes can run this config (batch, tensor/pipeline/data "
                             "split, heads, layers, vocabulary) and print the layout; starts nothing")
    parser.add_argument("--world-size", type=int, help="with --dry-run: processes (default: as launched, else 1)")
    parser.add_argument("--global-batch-size", type=int, help="with --dry-run: instead of the blend's")
    parser.add_argument("--seq-length", type=int, help="with --dry-run: instead of the blend's")


def run(args: argparse.Namespace) -> dict:
    overrides = [*args.overrides, *(["checkpoint.allow_changed_data=true"] if args.allow_changed_data else [])]
    config = load_config(args.config, overrides)
    if args.dry_run:
        return check(config, args)
    from megadoc_megatron.train.trainer import train

    result = train(config)
    if result["stopped"] in ("signal", "time budget"):
        raise stopped_error(result, config, args.config)
    return result


def stopped_error(result: dict, config, config_path) -> InputError:
    """Interrupted (exit status 75: run again) when the stop saved a checkpoint to resume from."""
    from megadoc_megatron.train.stopping import Stop, stop_cause

    where = f"stopped at iteration {result['iterations']} of {result['train_iters']} " \
            f"{stop_cause(Stop(result['stopped'], result['signal']), config.exit.duration_minutes)}"
    if not config.checkpoint.dir:
        return InputError(f"training {where} with nothing saved (checkpoint.dir is empty)", config_path,
                          fix="set checkpoint.dir, so that a stopped run can resume from its checkpoint")
    return Interrupted(f"training {where} and saved a checkpoint in {config.checkpoint.dir}",
                       fix="run the same command again: it resumes from that checkpoint")


def check(config, args: argparse.Namespace) -> dict:
    from megadoc_megatron.distributed import launch_environment
    from megadoc_megatron.train.layout import memory_estimate, plan_layout

    batch, length, vocab = args.global_batch_size, args.seq_length, None
    if batch is None or length is None:
        from megadoc_megatron.blend.datasets import load_checked, run_tokenizer

        blend = load_checked(config.data.blend)
        batch, length = batch or blend.global_batch_size, length or blend.seq_length
        vocab = run_tokenizer(blend, config.data.tokenizer_type, config.data.tokenizer_model).vocab_size
    world_size = args.world_size or launch_environment().world_size
    layout = plan_layout(config, world_size, batch, length, args.config)
    memory = f"; about {memory_estimate(config, layout, length, vocab).describe()} per GPU (estimate)" if vocab else ""
    print(f"ok: {layout.describe()} (global batch {batch} x {length} tokens){memory}")
    return {"layout": layout.__dict__}
