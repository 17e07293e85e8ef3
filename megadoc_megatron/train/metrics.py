"""Per-step numbers: model FLOPs by Megatron-LM's formula, MFU, and where the numbers go
(a progress line, `metrics.jsonl`, TensorBoard, Weights & Biases)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic
from megadoc_megatron.progress import duration

# Dense peak TFLOP/s per device (NVIDIA datasheets, without sparsity): (BF16, FP8), matched against
# torch.cuda.get_device_name() in this order (the first part whose words all appear wins).
PEAK_TFLOPS = [
    ("H100 NVL", (835.0, 1671.0)), ("H100 PCIe", (756.0, 1513.0)), ("H100", (989.0, 1979.0)),  # SXM: "H100 80GB HBM3"
    ("H200 NVL", (835.0, 1671.0)), ("H200", (989.0, 1979.0)), ("GH200", (989.0, 1979.0)),
    ("B200", (2250.0, 4500.0)), ("GB200", (2500.0, 5000.0)), ("A100", (312.0, None)),
]

FLOPS_FORMULA = "Megatron-LM core_v0.16.1 num_floating_point_operations (dense GQA, SwiGLU, causal attention halved)"


def training_flops(config, padded_vocab: int, seq_length: int, batch_size: int) -> float:
    """Model FLOPs of one forward+backward over `batch_size` sequences (Megatron-LM's formula:
    3 x 2 x the GEMM multiply-adds of QKV, attention, output projection, SwiGLU MLP and logits;
    the causal attention counts half of the s x s scores)."""
    hidden, layers = config.hidden_size, config.num_layers
    kv_channels = config.kv_channels or hidden // config.num_attention_heads
    query = kv_channels * config.num_attention_heads
    key_value = kv_channels * (config.num_query_groups or config.num_attention_heads)
    ffn_factor = 3 if config.gated_linear_unit else 2
    attention = hidden * (query + 2 * key_value) + query * seq_length + query * hidden
    mlp = hidden * config.ffn_hidden_size * ffn_factor
    per_token = 6 * (layers * (attention + mlp) + hidden * padded_vocab)
    return float(batch_size * seq_length * per_token)


def device_peak_tflops(device_name: str, fp8: str | None) -> float | None:
    """The dense peak of a part at the precision its matrix multiplies run in (FP8 when on)."""
    words = set(device_name.replace("-", " ").split())
    for part, (bf16, fp8_peak) in PEAK_TFLOPS:
        if set(part.split()) <= words:
            return fp8_peak if fp8 else bf16
    return None


def peak_tflops(configured: float | None, fp8: str | None = None) -> float | None:
    """logging.peak_tflops, else this GPU's datasheet peak for the precision; None on CPU."""
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        return device_peak_tflops(torch.cuda.get_device_name(), fp8)
    return None


def metric_rows(checkpoint_dir) -> list[tuple[str, dict]]:
    """(line, row) of metrics.jsonl beside the checkpoints. A last line without its newline was cut
    short by a crash while it was appended (each row is one append): it is left out; a damaged line
    before it is an error."""
    path = Path(checkpoint_dir) / "metrics.jsonl"
    *whole, last = path.read_text().split("\n") if path.is_file() else [""]
    rows = []
    for number, line in enumerate(whole, start=1):
        if line.strip():
            try:
                rows.append((line, json.loads(line)))
            except json.JSONDecodeError:
                raise InputError("this line is not JSON", path, number,
                                 fix="restore metrics.jsonl, or remove the line") from None
    return rows


def resumed_metrics_file(checkpoint_dir: str, resumed_at: int) -> Path | None:
    """metrics.jsonl beside the checkpoints, cut back to the resumed iteration (and rid of a torn last line)."""
    if not checkpoint_dir:
        return None
    path = Path(checkpoint_dir) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line, row in metric_rows(checkpoint_dir) if row["iteration"] <= resumed_at] if resumed_at else []
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return path


class StepLogger:
    """Prints a progress line with the rate, elapsed time and ETA; appends every logged step to
    `metrics.jsonl`; mirrors to TensorBoard and W&B when configured. Only the process that calls it
    logs (rank 0)."""

    def __init__(self, settings, metrics_path: Path | None, total_iters: int, start_iter: int, config: dict,
                 clock=time.monotonic):
        self.total, self.start_iter, self.clock = total_iters, start_iter, clock
        self.start_time = clock()
        self.metrics_path = metrics_path
        self.tensorboard = self.wandb = None
        if settings.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(settings.tensorboard_dir)
        if settings.wandb_project:
            import wandb

            self.wandb = wandb.init(project=settings.wandb_project, config=config, resume="allow")

    def log(self, row: dict) -> None:
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as out:
                out.write(json.dumps(row) + "\n")
        step = row["iteration"]
        for key, value in row.items():
            if key != "iteration" and isinstance(value, (int, float)) and self.tensorboard:
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(row, step=step)
        print(self.line(row), flush=True)

    def line(self, row: dict) -> str:
        step = row["iteration"]
        if "valid_loss" in row:
            return f"iteration {step:>6}/{self.total} | validation loss {row['valid_loss']:.4f}"
        done = step - self.start_iter
        elapsed = self.clock() - self.start_time
        eta = duration(elapsed / done * (self.total - step)) if done else "?"
        parts = [f"iteration {step:>6}/{self.total}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.3e}",
                 f"grad norm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s",
                 f"{row['tflops_per_device']:.2f} TFLOP/s/device"]
        if row.get("mfu") is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("warmup"):
            parts.append("first iteration (warm-up)")
        if row.get("skipped"):
            parts.append(f"{row['skipped']} update(s) skipped (non-finite gradients), {row['skipped_total']} in all")
        parts.append(f"elapsed {duration(elapsed)}, ETA {eta}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
