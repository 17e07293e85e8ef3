"""Validation during training: when (every logging.eval_interval iterations and at the last one),
the held-out losses so far (a resumed run's from its metrics.jsonl), and early stopping once
`patience` validations in a row found no new best loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from megadoc_megatron.train.metrics import metric_rows

if TYPE_CHECKING:
    from megadoc_megatron.train.config import TrainConfig


def plateaued(losses: list[float], patience: int) -> bool:
    """Whether none of the last `patience` validation losses beat the best one before them."""
    return 0 < patience < len(losses) and min(losses[-patience:]) >= min(losses[:-patience])


def validation_history(checkpoint_dir: str, up_to: int) -> dict[int, float]:
    """iteration -> validation loss of what a resumed run had logged (metrics.jsonl beside the checkpoints)."""
    if not checkpoint_dir or not up_to:
        return {}
    rows = [row for _, row in metric_rows(checkpoint_dir)]
    return {row["iteration"]: row["valid_loss"] for row in rows if "valid_loss" in row and row["iteration"] <= up_to}


class Validator:
    """`loss` computes the held-out loss (None: the run has no held-out data and never validates).
    Made before rank 0 cuts metrics.jsonl back to the resumed iteration: it reads the history there."""

    def __init__(self, loss: Callable[[], float] | None, config: TrainConfig, resumed_at: int):
        self.loss, self.interval, self.patience = loss, config.logging.eval_interval, config.patience
        self.history = validation_history(config.checkpoint.dir, resumed_at)

    @property
    def losses(self) -> list[float]:
        return list(self.history.values())

    def should_validate(self, iteration: int, last: bool) -> bool:
        return self.loss is not None and (last or bool(self.interval) and iteration % self.interval == 0)

    def missed(self, iteration: int, last: bool) -> bool:
        """Whether a resumed run's checkpoint iteration was due a validation it never logged: a run killed
        during validation (the checkpoint is saved before it) validates that iteration first on resume."""
        return iteration > 0 and self.should_validate(iteration, last) and iteration not in self.history

    def validate(self, iteration: int) -> float:
        self.history[iteration] = self.loss()
        return self.history[iteration]

    def plateaued(self) -> bool:
        return plateaued(self.losses, self.patience)

    def stop_note(self, iteration: int) -> str:
        return (f"stopped at iteration {iteration}: the validation loss has not improved on "
                f"{min(self.losses):.4f} in {self.patience} validations (patience)")
