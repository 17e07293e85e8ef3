"""Grids of training settings and the papers' local-optimum rule: a point is tuned when every
neighbour one step away on each axis has run and none has a lower i.i.d. loss. Used by recipes given
as grids (`megadoc run`, experiment/config.py), by `megadoc sweep` and by the report."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

AXES = ("epochs", "synthetic_weight", "lr", "weight_decay")
SHORT = {"epochs": "E", "synthetic_weight": "w", "lr": "lr", "weight_decay": "wd"}


@dataclass(frozen=True)
class Point:
    indices: tuple[int, ...]   # position on each axis
    values: tuple               # the settings, in AXES order

    def name(self, recipe: str) -> str:
        return recipe + "".join(f"-{SHORT[a]}{v:g}" for a, v in zip(AXES, self.values))


def suffix(axes: dict[str, list], values: tuple) -> str:
    """'-E16-w0.75': the settings of a point on the axes that have more than one value."""
    return "".join(f"-{SHORT[a]}{v:g}" for a, v in zip(AXES, values) if len(axes[a]) > 1)


def grid(axes: dict[str, list]) -> list[Point]:
    ranges = [range(len(axes[a])) for a in AXES]
    return [Point(indices, tuple(axes[a][i] for a, i in zip(AXES, indices))) for indices in itertools.product(*ranges)]


def neighbours(point: Point, axes: dict[str, list]) -> list[Point]:
    found = []
    for position, axis in enumerate(AXES):
        for step in (-1, 1):
            index = point.indices[position] + step
            if 0 <= index < len(axes[axis]):
                indices = point.indices[:position] + (index,) + point.indices[position + 1:]
                found.append(Point(indices, tuple(axes[a][i] for a, i in zip(AXES, indices))))
    return found


@dataclass
class Verdict:
    best: Point | None
    tuned: bool
    missing: list[Point]        # neighbours of the best that have not run
    edges: list[str]            # axes on which the best sits at the end of the grid (more than one value)


def local_optimum(axes: dict[str, list], losses: dict[Point, float]) -> Verdict:
    if not losses:
        return Verdict(None, False, [], [])
    best = min(losses, key=losses.get)
    around = neighbours(best, axes)
    missing = [p for p in around if p not in losses]
    edges = [a for i, a in enumerate(AXES) if len(axes[a]) > 1 and best.indices[i] in (0, len(axes[a]) - 1)]
    return Verdict(best, not missing, missing, edges)
