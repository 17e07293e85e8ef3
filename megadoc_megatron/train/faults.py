"""Faults injected on purpose, to prove that training survives them (tests, benchmarks/gpu_check.py)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def nan_loss_at(iterations: set[int]):
    """Within: the loss, and so every gradient, of these iterations (counted from 1 in each run) is
    NaN, as after an overflow. The update must be skipped and reported, not applied."""
    from megadoc_megatron.train import trainer

    counter = []
    real_train, real_step, real_loss = trainer.Trainer.train, trainer.Trainer.train_step, trainer.masked_mean_loss

    def train(self):
        counter.clear()
        return real_train(self)

    def train_step(self, batches):
        counter.append(1)
        return real_step(self, batches)

    def masked_mean_loss(loss_mask, output):
        poisoned = len(counter) in iterations and output.requires_grad
        return real_loss(loss_mask, output * float("nan") if poisoned else output)

    trainer.Trainer.train, trainer.Trainer.train_step, trainer.masked_mean_loss = train, train_step, masked_mean_loss
    try:
        yield
    finally:
        trainer.Trainer.train, trainer.Trainer.train_step, trainer.masked_mean_loss = real_train, real_step, real_loss
