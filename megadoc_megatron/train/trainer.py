"""The training loop: pre-train the Llama-style GPT on a `megadoc blend` with megatron-core
(the `megadoc train` command is in command.py)."""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megadoc_megatron.blend.datasets import build_datasets, load_checked, run_tokenizer
from megadoc_megatron.distributed import initialize, launch_environment, shutdown
from megadoc_megatron.errors import InputError
from megadoc_megatron.model.build import build_model, resolve_backend
from megadoc_megatron.model.gpt import document_packing
from megadoc_megatron.train import checkpoint
from megadoc_megatron.train.config import TrainConfig
from megadoc_megatron.train.data import micro_batches
from megadoc_megatron.train.engines import build_engine, resolve_engine
from megadoc_megatron.train.engines.cuda_on_cpu import megatron_core_on_cpu
from megadoc_megatron.train.layout import memory_estimate_gb, plan_layout
from megadoc_megatron.train.metrics import (
    FLOPS_FORMULA,
    StepLogger,
    peak_tflops,
    resumed_metrics_file,
    training_flops,
)
from megadoc_megatron.train.stopping import StopRequests, stop_cause
from megadoc_megatron.train.validator import Validator


def masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Mean per-token loss of one micro-batch over the tokens the loss mask keeps."""
    mask = loss_mask.reshape(-1).float()
    loss = (output.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    # A copy: megatron-core's schedule divides the returned loss in place by the micro-batch count.
    return loss, {"lm loss": loss.clone().detach()}


def forward_step(data_iterator, model, device: torch.device, eod: int | None = None):
    """megatron-core's forward_step_func: (output, loss function of the output). With `eod` (document
    masking) the micro-batch goes in as one packed row, each document attending only to itself."""
    batch, packed = next(data_iterator), None
    if eod is not None:
        packed = document_packing(batch["tokens"], eod, device)
        batch = {key: value.reshape(1, -1) for key, value in batch.items()}
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
    return output, partial(masked_mean_loss, batch["loss_mask"])


def build_scheduler(optimizer, settings, train_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if settings.warmup_iters >= train_iters:
        raise InputError(f"optimizer.warmup_iters ({settings.warmup_iters}) must be below the "
                         f"{train_iters} training iterations", fix="lower optimizer.warmup_iters")
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_iters,
        lr_decay_steps=train_iters, lr_decay_style=settings.decay_style, start_wd=settings.weight_decay,
        end_wd=settings.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant")


def seed_everything(seed: int) -> None:
    """Megatron-LM's rule: each pipeline stage offsets the seed by 100 x its rank."""
    from megatron.core import parallel_state

    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def reduce_loss(reports: list[dict], device: torch.device) -> float:
    """Mean micro-batch loss of the global batch, known on every rank (0 reports on early stages)."""
    from megatron.core import parallel_state

    loss = torch.stack([r["lm loss"] for r in reports]).mean() if reports else torch.zeros((), device=device)
    loss = loss.float().reshape(1).clone()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    loss /= parallel_state.get_data_parallel_world_size()
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())  # only the last stage is non-zero
    return loss.item()


class Trainer:
    def __init__(self, config: TrainConfig, device: torch.device):
        self.config, self.device = config, device
        self.stops = StopRequests(config.exit, started=time.monotonic())
        self.engine_name = resolve_engine(config.engine, device)
        self.blend = load_checked(config.data.blend)
        self.seq_length, self.global_batch = self.blend.seq_length, self.blend.global_batch_size
        self.layout = plan_layout(config, dist.get_world_size(), self.global_batch, self.seq_length, config.data.blend)
        self.num_microbatches = self.layout.num_microbatches
        self.train_iters = config.train_iters or self.blend.train_iters
        if self.train_iters > self.blend.train_iters:
            raise InputError(f"train_iters {self.train_iters} is beyond the blend's {self.blend.train_iters} "
                             "iterations (its exact epochs)", config.data.blend,
                             fix="leave train_iters unset, or re-plan the blend with more epochs")
        data = config.data
        self.tokenizer = tokenizer = run_tokenizer(self.blend, data.tokenizer_type, data.tokenizer_model,
                                                   data.reset_attention_mask or data.eod_mask_loss)
        self.info = checkpoint.CheckpointInfo(
            self.seq_length, tokenizer.vocab_size, tokenizer.describe(), resolve_backend(config.model.backend),
            blend={"path": str(Path(config.data.blend).resolve()), "fingerprint": self.blend.fingerprint()})
        self.memory_gb = memory_estimate_gb(config, self.layout, self.seq_length, tokenizer.vocab_size,
                                            device.type)
        self.eod = tokenizer.eod if config.data.reset_attention_mask else None
        seed_everything(config.seed)
        self.model_config, chunks, self.padded_vocab = build_model(config, tokenizer.vocab_size, self.seq_length,
                                                                   device, self.engine_name)
        self.engine = build_engine(self.engine_name, chunks, self.model_config, config, self.info.backend)
        self.scheduler = build_scheduler(self.engine.optimizer, config.optimizer, self.train_iters)
        self.checkpointer = checkpoint.Checkpointer(config, self.engine, self.scheduler, self.info)
        self.flops_per_iteration = training_flops(self.model_config, self.padded_vocab, self.seq_length,
                                                  self.global_batch)
        self.peak = peak_tflops(config.logging.peak_tflops, config.precision.fp8)

    def batches(self, dataset, start: int, end: int, num_workers: int = 0):
        """This rank's micro-batches of samples [start, end), as the schedule takes them: one iterator,
        or with virtual pipeline stages one per model chunk (each chunk reads every micro-batch)."""
        iterators = [micro_batches(dataset, start, end, self.config.data.micro_batch_size, num_workers)
                     for _ in self.engine.model]
        return iterators[0] if len(iterators) == 1 else iterators

    def run_schedule(self, batches, forward_only: bool) -> list[dict]:
        for chunk in self.engine.chunks:
            chunk.train(not forward_only)
        micro_batch, seq_length = self.config.data.micro_batch_size, self.seq_length
        if self.eod is not None:  # packed: one row of all the micro-batch's tokens
            micro_batch, seq_length = 1, micro_batch * seq_length
        return self.engine.forward_backward(
            forward_step_func=partial(forward_step, device=self.device, eod=self.eod),
            data_iterator=batches, model=self.engine.model, num_microbatches=self.num_microbatches,
            seq_length=seq_length, micro_batch_size=micro_batch, forward_only=forward_only)

    def train_step(self, batches) -> tuple[float, float, float, bool]:
        """One iteration: (loss, learning rate used, gradient norm, whether the update was applied)."""
        lr = self.engine.optimizer.param_groups[0]["lr"]
        reports = self.run_schedule(batches, forward_only=False)
        updated, grad_norm, _ = self.engine.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        return reduce_loss(reports, self.device), lr, grad_norm, updated

    def datasets(self):
        """(train, valid or None) for this run's blend."""
        return build_datasets(self.blend, self.blend.train_samples,
                              self.config.logging.eval_iters * self.global_batch, self.config.data.eod_mask_loss,
                              self.tokenizer)

    def validation_loss(self, valid) -> float:
        samples = self.config.logging.eval_iters * self.global_batch
        batches = self.batches(valid, 0, samples)
        losses = []
        with torch.no_grad(), self.engine.params_synchronized():
            for _ in range(self.config.logging.eval_iters):
                losses.append(reduce_loss(self.run_schedule(batches, forward_only=True), self.device))
        return float(np.mean(losses))

    def train(self) -> dict:
        with self.stops.listening():
            return self._train()

    def _train(self) -> dict:
        config, rank0 = self.config, dist.get_rank() == 0
        start, consumed, note = self.checkpointer.start()
        train, valid = self.datasets()
        batches = self.batches(train, consumed, self.train_iters * self.global_batch, config.data.num_workers)
        validator = Validator(partial(self.validation_loss, valid) if valid is not None else None, config, start)
        dist.barrier()  # every rank has read the validation history before rank 0 cuts metrics.jsonl back
        logger = StepLogger(config.logging, resumed_metrics_file(config.checkpoint.dir, start), self.train_iters,
                            start, config.to_dict()) if rank0 else None
        if rank0:
            print(f"{note}\n{self.describe()}{self._memory_warning()}", flush=True)
        if validator.missed(start, start == self.train_iters):
            self._log_validation(logger, start, validator.validate(start))
        last_loss, timer, skips = None, StepTimer(self.device), SkipCounter(config.optimizer.max_skipped_in_a_row)
        iteration, stopped, stop = start, "plateau" if validator.plateaued() else "end", None
        while stopped == "end" and iteration < self.train_iters:
            iteration += 1
            last = iteration == self.train_iters
            last_loss, lr, grad_norm, updated = self.train_step(batches)
            consumed += self.global_batch
            timer.tick()
            skips.count(updated, iteration, grad_norm)
            stop = None if last else self.stops.agreed(self.device)  # a run that is done is not stopped
            if iteration % config.logging.log_interval == 0 or last or skips.exhausted or stop:
                self._log_training(logger, timer, skips, iteration, last_loss, lr, grad_norm)
            if skips.exhausted:
                raise skips.error(config.checkpoint.dir)
            saved = self._save(iteration, consumed, last, force=bool(stop))
            if stop:  # a validation due now runs first on resume (Validator.missed)
                stopped = stop.reason
                break
            validated = validator.should_validate(iteration, last)
            if validated:
                self._log_validation(logger, iteration, validator.validate(iteration))
                if validator.plateaued():
                    stopped = "plateau"
                    self._save(iteration, consumed, force=True)
            if saved or validated:
                timer.restart()  # not training time
        if rank0:
            if stopped == "plateau":
                print(validator.stop_note(iteration), flush=True)
            if stop:
                print(self._stop_note(stop, iteration), flush=True)
            logger.close()
        return {"iterations": iteration, "train_iters": self.train_iters, "final_loss": last_loss,
                "consumed_samples": consumed, "stopped": stopped, "signal": stop.signal if stop else None,
                "skipped_iterations": skips.total}

    def _save(self, iteration: int, consumed: int, last: bool = False, force: bool = False) -> bool:
        with self.stops.held():
            return self.checkpointer.save(iteration, consumed, last, force)

    def _stop_note(self, stop, iteration: int) -> str:
        saved = "checkpoint saved; run again to resume" if self.config.checkpoint.dir else \
            "nothing saved (checkpoint.dir is empty)"
        return f"stopped at iteration {iteration} of {self.train_iters} " \
               f"{stop_cause(stop, self.config.exit.duration_minutes)}: {saved}"

    @staticmethod
    def _log_validation(logger, iteration: int, valid_loss: float) -> None:
        if logger is not None:  # rank 0
            logger.log({"iteration": iteration, "valid_loss": valid_loss})

    def _log_training(self, logger, timer, skips, iteration, loss, lr, grad_norm) -> None:
        """Log the window since the last row (rank 0); every rank reads the timer (it synchronizes CUDA)."""
        seconds, warmup = timer.read()
        if logger is not None:
            logger.log(self._row(iteration, loss, lr, grad_norm, skips, seconds, warmup))
        skips.window = 0

    def _row(self, iteration, loss, lr, grad_norm, skips, seconds_per_iteration, warmup) -> dict:
        tflops = self.flops_per_iteration / seconds_per_iteration / dist.get_world_size() / 1e12
        return {"iteration": iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": self.global_batch * self.seq_length / seconds_per_iteration,
                "seconds_per_iteration": seconds_per_iteration, "tflops_per_device": tflops,
                "mfu": tflops / self.peak if self.peak else None, "warmup": warmup,
                "skipped": skips.window, "skipped_total": skips.total}

    def _memory_warning(self) -> str:
        if self.device.type != "cuda":
            return ""
        memory = torch.cuda.get_device_properties(self.device).total_memory / 2 ** 30
        return "" if self.memory_gb < 0.9 * memory else (
            f"\nwarning: this layout needs about {self.memory_gb:.0f} GB per GPU, near or above the {memory:.0f} GB "
            "it has: set model.recompute: full, or a smaller data.micro_batch_size")

    def describe(self) -> str:
        parameters = sum(p.numel() for chunk in self.engine.chunks for p in chunk.parameters())
        peak = f"{self.peak:.0f} TFLOP/s per device" if self.peak else "unknown (set logging.peak_tflops)"
        return (f"model {self.config.model.preset} ({self.info.backend} layers, "
                f"{parameters:,} parameters on this rank) | parallel {checkpoint.layout()} | "
                f"{self.train_iters} iterations x {self.global_batch} sequences x {self.seq_length} tokens "
                f"({self.num_microbatches} micro-batches of {self.config.data.micro_batch_size}) | "
                f"engine {self.engine_name} on {self.device.type} | "
                f"about {self.memory_gb:.1f} GB per rank (estimate) | peak for MFU {peak} | FLOPs: {FLOPS_FORMULA}")


class StepTimer:
    """Seconds per iteration over the iterations since the last reading. The first iteration
    (allocation, kernel selection, the data's first touch) is timed on its own and never mixed into
    a window. CUDA is synchronized at each reading, not at every step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()
        self.first_seconds = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def restart(self) -> None:
        self.start, self.iterations = self._now(), 0

    def tick(self) -> None:
        if self.first_seconds is None:
            self.first_seconds = self._now() - self.start
            self.restart()
        else:
            self.iterations += 1

    def read(self) -> tuple[float, bool]:
        """(seconds per iteration, whether that is the first iteration's warm-up time)."""
        if self.iterations == 0:
            return self.first_seconds, True
        seconds = (self._now() - self.start) / self.iterations
        self.restart()
        return seconds, False


class SkipCounter:
    """Updates skipped for non-finite gradients: in the logging window, in all, and in a row."""

    def __init__(self, limit: int):
        self.limit, self.window, self.total, self.in_a_row, self.last = limit, 0, 0, 0, None

    def count(self, updated: bool, iteration: int, grad_norm) -> None:
        self.in_a_row = 0 if updated else self.in_a_row + 1
        self.window += not updated
        self.total += not updated
        if not updated:
            self.last = (iteration, grad_norm)

    @property
    def exhausted(self) -> bool:
        return 0 < self.limit <= self.in_a_row

    def error(self, checkpoint_dir: str) -> InputError:
        iteration, norm = self.last
        return InputError(f"training diverged: the last {self.in_a_row} updates (to iteration {iteration}) "
                          f"were skipped because the gradient norm was not finite ({norm})", checkpoint_dir or None,
                          fix="lower optimizer.lr or lengthen optimizer.warmup_iters, then resume from the last "
                              "checkpoint (optimizer.max_skipped_in_a_row sets this limit)")


def train(config: TrainConfig, launch=None) -> dict:
    """Initialize the process groups, train, tear down."""
    launch = launch or launch_environment()
    blend = load_checked(config.data.blend)
    plan_layout(config, launch.world_size, blend.global_batch_size, blend.seq_length, config.data.blend)
    device = initialize(config.parallel, launch)
    try:
        with megatron_core_on_cpu() if resolve_engine(config.engine, device) == "megatron" else nullcontext():
            return Trainer(config, device).train()
    finally:
        shutdown()
