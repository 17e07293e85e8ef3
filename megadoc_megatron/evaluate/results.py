"""The file every evaluator writes, CHECKPOINT_DIR/eval/EVALUATOR.NAME.iter_XXXXXXX.json beside the
checkpoints it measures, and the report's way of finding the latest one."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.files import write_text_atomic

SCHEMA = "megadoc-eval/1"


@dataclass
class EvalResult:
    schema: str
    evaluator: str             # loss | long-context | ensemble-K | downstream
    checkpoints: list[dict]    # [{"path": iteration folder, "iteration": N}], one per ensemble member
    dataset: str               # the held-out dataset prefix, or "lm-eval"
    seq_length: int
    settings: dict
    metrics: dict
    wall_seconds: float
    created: str

    @classmethod
    def measured(cls, evaluator: str, checkpoints: list, dataset: str, settings: dict, metrics: dict,
                 seconds: float) -> "EvalResult":
        """A result of `checkpoints` (LoadedModel of evaluate/losses.py), stamped now."""
        return cls(SCHEMA, evaluator, [{"path": str(c.checkpoint), "iteration": c.iteration} for c in checkpoints],
                   dataset, checkpoints[0].seq_length, settings, metrics, round(seconds, 3),
                   datetime.datetime.now(datetime.timezone.utc).isoformat())

    def path(self, name: str) -> Path:
        """Where it is kept: in eval/ beside the (first) checkpoint's iteration folder."""
        iteration_dir = Path(self.checkpoints[0]["path"])
        return iteration_dir.parent / "eval" / f"{self.evaluator}.{name}.{iteration_dir.name}.json"

    def save(self, name: str) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "EvalResult":
        return cls(**json.loads(Path(path).read_text()))


def latest_result(run_dir: Path, evaluator: str, name: str | None = None) -> EvalResult | None:
    """The result of an evaluator at the run's highest evaluated iteration, for held-out set `name`
    (any, when the run has results for only one)."""
    found = {}
    for path in (run_dir / "eval").glob(f"{evaluator}.{name or '*'}.iter_*.json"):
        result_name, iteration = path.name[len(evaluator) + 1:-len(".json")].rsplit(".", 1)
        found.setdefault(iteration, {})[result_name] = path
    if not found:
        return None
    latest = found[max(found)]
    if len(latest) > 1:
        raise InputError(f"{evaluator} results for several held-out sets ({', '.join(sorted(latest))})",
                         run_dir / "eval",
                         fix="pick one with --eval-name")
    return EvalResult.load(next(iter(latest.values())))
