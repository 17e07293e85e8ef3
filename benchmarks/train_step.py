#!/usr/bin/env python3
"""Training-step overhead of `megadoc train` against a bare megatron-core step, in the same run.

  python benchmarks/train_step.py [--preset tiny] [--seq-length 256] [--global-batch 16] \
      [--micro-batch 4] [--steps 10] [--rounds 3] [--bf16] [--work DIR]

Both loops train the same model object with the same optimizer; rounds alternate between them.
- ours: `Trainer.train_step`: the data loader over megatron-core's blended GPTDataset, the
  engine's schedule (megatron-core's on GPU, the portable one on CPU), gradient finalization,
  clipping, the optimizer with its non-finite check, the LR scheduler and the loss reduction.
- bare: the model's forward/backward over the same number of micro-batches already in memory,
  the same gradient finalization and megatron-core's own `optimizer.step()`: nothing but what
  any step must do.
Prints median step times, tokens/s, model TFLOP/s (Megatron-LM's formula) and ours/bare.

Data: Python's standard-library docstrings and a SentencePiece tokenizer made by
examples/tiny_cpu/make_corpus.py (kept in --work between runs; benchmarks/stdlib_data.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from stdlib_data import stdlib_blend


def bare_step(trainer, microbatches: list[dict]) -> None:
    """Forward/backward of every micro-batch, the engine's gradient finalization, megatron-core's
    own optimizer step (the portable engine's on that engine)."""
    from megadoc_megatron.train.engines.plain_torch import finalize_grads, flag_first_microbatch

    engine = trainer.engine
    (model,) = engine.model
    model.train()
    megatron = engine.name == "megatron"
    if megatron:
        model.zero_grad_buffer()
    engine.optimizer.zero_grad()
    flag_first_microbatch(model)  # FP8 weights quantized afresh each step, as megatron-core's schedules do
    for batch in microbatches:
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()
        (loss / len(microbatches)).backward()
    if megatron:
        model.finish_grad_sync()
        engine.optimizer.optimizer.step()  # megatron-core's, without our non-finite check
    else:
        finalize_grads(engine.chunks)
        engine.optimizer.step()


def timed(step, count: int, device) -> list[float]:
    times = []
    for _ in range(count):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def compare_steps(trainer, warmup: int, steps: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per step of (ours, bare), in alternating rounds after `warmup` steps of each (the
    first ones allocate, select kernels and touch the data)."""
    train, _ = trainer.datasets()
    total = trainer.train_iters * trainer.global_batch
    stream = trainer.batches(train, 0, total, trainer.config.data.num_workers)
    first_batch = trainer.batches(train, 0, total)
    in_memory = [{k: v.to(trainer.device) for k, v in next(first_batch).items()}
                 for _ in range(trainer.num_microbatches)]
    for _ in range(warmup):
        trainer.train_step(stream)
        bare_step(trainer, in_memory)
    ours, bare = [], []
    for _ in range(rounds):
        ours += timed(lambda: trainer.train_step(stream), steps, trainer.device)
        bare += timed(lambda: bare_step(trainer, in_memory), steps, trainer.device)
    return ours, bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/megadoc-bench-train"))
    args = parser.parse_args()

    from megadoc_megatron.distributed import initialize, shutdown
    from megadoc_megatron.train.config import load_config
    from megadoc_megatron.train.trainer import Trainer

    args.work.mkdir(parents=True, exist_ok=True)
    blend_json = stdlib_blend(args.work, args.seq_length, args.global_batch, 2 + args.rounds * args.steps * 2)
    config_path = args.work / "bench.yaml"
    config_path.write_text(json.dumps({
        "data": {"blend": blend_json, "micro_batch_size": args.micro_batch}, "model": {"preset": args.preset},
        "precision": {"bf16": args.bf16}, "optimizer": {"lr": 1.0e-4},
        "train_iters": 1 + args.rounds * args.steps * 2}))  # the schedule must not end mid-benchmark
    config = load_config(config_path)
    device = initialize(config.parallel)
    try:
        trainer = Trainer(config, device)
        ours, bare = compare_steps(trainer, 1, args.steps, args.rounds)
    finally:
        shutdown()
    tokens = trainer.global_batch * trainer.seq_length
    for name, times in (("bare megatron-core step", bare), ("megadoc train step", ours)):
        median = statistics.median(times)
        tflops = trainer.flops_per_iteration / median / 1e12
        print(f"{name:<24} median {median * 1e3:9.1f} ms  {tokens / median:12,.0f} tok/s  {tflops:8.3f} TFLOP/s"
              + (f"  MFU {100 * tflops / trainer.peak:.1f}%" if trainer.peak else ""))
    print(f"ours / bare step time: {statistics.median(ours) / statistics.median(bare):.3f} "
          f"(target <= 1.03; {args.rounds} alternating rounds of {args.steps} steps, {device.type}, "
          f"preset {args.preset}, {trainer.num_microbatches} micro-batches of {args.micro_batch} x {args.seq_length})")


if __name__ == "__main__":
    main()
