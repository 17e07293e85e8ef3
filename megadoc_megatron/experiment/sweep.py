"""`megadoc sweep CONFIG`: a grid over (E, w, lr, wd) around one recipe, and the local-optimum check
(`--preset mixture`: the synthetic-mixture study instead, see mixture.py).

The config's `sweep` section names the recipe and the values of each axis:

    sweep:
      recipe: stitch_g8
      epochs: [4, 8, 16]
      synthetic_weight: [0.5, 0.75, 0.9]
      lr: [1.0e-3, 3.0e-3]
      weight_decay: [0.1, 0.4, 0.8, 1.6]

Each point is that recipe with those settings, run as `megadoc run` would (the data stages are
shared and cached). A point is tuned when every neighbour one step away on each axis has run
and none has a lower i.i.d. loss; at the edge of an axis there is no neighbour, and the table
says to extend the grid. `--mode neighbours` (default) asks only for what the check needs:
the neighbours of the best point so far (the start point first); `--mode grid` for every point.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.evaluate.grids import AXES, Point, grid, local_optimum
from megadoc_megatron.train.config import OptimizerConfig


def parse_sweep(experiment) -> tuple[object, dict[str, list]]:
    """(the base recipe, axis -> values); a missing axis keeps the recipe's own value."""
    sweep, source = experiment.sweep, experiment.source
    if not isinstance(sweep, dict) or "recipe" not in sweep:
        raise InputError("the config has no sweep section naming a recipe", source,
                         fix="add `sweep: {recipe: NAME, epochs: [...], synthetic_weight: [...], "
                             "lr: [...], weight_decay: [...]}`")
    unknown = sorted(set(sweep) - {"recipe", "start", *AXES})
    if unknown:
        raise InputError(f"sweep.{unknown[0]} is unknown", source, fix=f"use recipe, start, {', '.join(AXES)}")
    recipes = {r.name: r for r in experiment.recipes}
    if any(r.grid and r.grid["recipe"] == sweep["recipe"] for r in experiment.recipes):
        raise InputError(f"sweep.recipe {sweep['recipe']!r} gives a grid already, which `megadoc run` trains and "
                         "tunes", source, fix="sweep a recipe of single values, or run the grid with megadoc run")
    if sweep["recipe"] not in recipes:
        raise InputError(f"sweep.recipe {sweep['recipe']!r} is not a recipe of the config", source,
                         fix=f"choose from {', '.join(recipes)}")
    base = recipes[sweep["recipe"]]
    if base.epochs is None:
        raise InputError(f"sweep.recipe {base.name!r} has a token budget, not epochs", source,
                         fix="sweep a recipe with epochs; for budgets and shares use --preset mixture")
    optimizer = {**experiment.train.get("optimizer", {}), **base.train.get("optimizer", {})}
    own = {"epochs": base.epochs, "synthetic_weight": base.synthetic_weight,
           "lr": optimizer.get("lr", OptimizerConfig.lr),
           "weight_decay": optimizer.get("weight_decay", OptimizerConfig.weight_decay)}
    axes = {}
    for axis in AXES:
        values = sweep.get(axis, [own[axis]])
        if not isinstance(values, list) or not values or any(not isinstance(v, (int, float)) for v in values) \
                or len(set(values)) != len(values):
            raise InputError(f"sweep.{axis} must be a list of distinct numbers, not {values!r}", source,
                             fix=f"e.g. {axis}: [{own[axis]}]")
        axes[axis] = sorted(float(v) if axis != "epochs" else int(v) for v in values)
    return base, axes


def start_point(sweep: dict, base, axes: dict[str, list], points: list[Point]) -> Point:
    """sweep.start, else the recipe's own settings where they are on the grid, else the middle value."""
    wanted = sweep.get("start") or {}
    indices = []
    for axis in AXES:
        value = wanted.get(axis, {"epochs": base.epochs, "synthetic_weight": base.synthetic_weight}.get(axis))
        values = axes[axis]
        indices.append(values.index(value) if value in values else (len(values) - 1) // 2)
    return next(p for p in points if p.indices == tuple(indices))


def point_recipe(base, point: Point):
    optimizer = {**base.train.get("optimizer", {}), "lr": point.values[2], "weight_decay": point.values[3]}
    return replace(base, name=point.name(base.name), epochs=point.values[0], synthetic_weight=point.values[1],
                   train={**base.train, "optimizer": optimizer})


class Study:
    """Runs of one experiment config that vary a recipe: each point is a recipe, run as `megadoc run`
    would (the data stages are shared and cached)."""

    def __init__(self, config: str, overrides: list[str]):
        from megadoc_megatron.experiment.config import load_experiment

        self.config, self.overrides = config, overrides
        self.experiment = load_experiment(Path(config), overrides)
        self.points: list = []
        self.recipes: dict = {}   # point -> Recipe

    def point_name(self, point) -> str:
        return self.recipes[point].name

    def with_recipes(self, points: list):
        return replace(self.experiment, recipes=[self.recipes[p] for p in points])

    def losses(self) -> dict:
        """The i.i.d. loss of every point whose evaluations have finished (the mean over its seeds)."""
        from megadoc_megatron.evaluate.results import latest_result
        from megadoc_megatron.experiment.plan import build_graph

        plan = build_graph(self.with_recipes(self.points))
        found = {}
        for point in self.points:
            runs = plan.runs_of[self.recipes[point].name]
            if all(plan.evals[run].done for run in runs):
                losses = [latest_result(plan.trains[run].folder / "ckpt", "loss", plan.eval_name).metrics["loss"]
                          for run in runs]
                found[point] = sum(losses) / len(losses)
        return found

    def run_point(self, point) -> None:
        from megadoc_megatron.experiment.runner import run_experiment

        run_experiment(self.with_recipes([point]), report=False)

    def job_command(self, point, preset: str | None = None) -> str:
        sets = [item for override in self.overrides for item in ("--set", override)]
        return shlex.join(["megadoc", "sweep", str(Path(self.config).resolve()), *sets,
                           *(["--preset", preset] if preset else []), "--point", self.point_name(point)])


class Sweep(Study):
    """The grid around one recipe, and the local-optimum check."""

    def __init__(self, config: str, overrides: list[str]):
        from megadoc_megatron.experiment.config import check_recipe

        super().__init__(config, overrides)
        self.base, self.axes = parse_sweep(self.experiment)
        self.points = grid(self.axes)
        self.start = start_point(self.experiment.sweep, self.base, self.axes, self.points)
        self.recipes = {p: check_recipe(point_recipe(self.base, p), f"sweep point {p.name(self.base.name)}",
                                        self.experiment.source)
                        for p in self.points}

    def needed(self, losses: dict[Point, float], mode: str) -> list[Point]:
        if mode == "grid":
            return [p for p in self.points if p not in losses]
        verdict = local_optimum(self.axes, losses)
        return [self.start] if verdict.best is None else verdict.missing

    def table(self, losses: dict[Point, float], needed: list[Point]) -> str:
        verdict = local_optimum(self.axes, losses)
        lines = [f"{'point':<44} {'E':>4} {'w':>6} {'lr':>9} {'wd':>7} {'i.i.d. loss':>12}  status"]
        for point in self.points:
            status = ("best" if point == verdict.best
                      else ("needed" if point in needed else ("done" if point in losses else "")))
            loss = f"{losses[point]:.4f}" if point in losses else "—"
            e, w, lr, wd = point.values
            lines.append(f"{point.name(self.base.name):<44} {e:>4} {w:>6g} {lr:>9g} {wd:>7g} {loss:>12}  {status}")
        if verdict.best is None:
            lines.append("no point has finished yet; start: " + self.start.name(self.base.name))
        elif verdict.tuned:
            lines.append(f"tuned: {verdict.best.name(self.base.name)} beats every neighbour one step away on each axis"
                         + (f"; it sits at the edge of the grid on {', '.join(verdict.edges)}: extend those axes "
                            "to be sure" if verdict.edges else ""))
        else:
            lines.append(f"not tuned yet: {len(verdict.missing)} neighbour(s) of the best point "
                         f"{verdict.best.name(self.base.name)} still to run")
        return "\n".join(lines)

    def report(self, losses: dict[Point, float]) -> None:
        from megadoc_megatron.experiment.runner import run_experiment

        if losses:
            run_experiment(self.with_recipes([p for p in self.points if p in losses]))

    def outcome(self, losses: dict[Point, float]) -> dict:
        verdict = local_optimum(self.axes, losses)
        return {"tuned": verdict.tuned, "best": verdict.best.name(self.base.name) if verdict.best else None}


class MixtureStudy(Study):
    """The `mixture` preset: every (data type, w, budget) point; see mixture.py."""

    def __init__(self, config: str, overrides: list[str]):
        from megadoc_megatron.experiment.config import check_recipe
        from megadoc_megatron.experiment.mixture import MixturePoint, parse_mixture, point_recipe

        super().__init__(config, overrides)
        self.data, weights, self.budgets = parse_mixture(self.experiment)
        first = next(iter(self.data.values()))
        if any(d.train != first.train for d in self.data.values()):
            raise InputError("mixture.data: the data types must share their train overrides (the real-only runs "
                             "use them too)", self.experiment.source, fix="move them to the train section")
        for data in self.data:
            for weight in weights:
                for budget in self.budgets:
                    point = MixturePoint("real" if not weight else data, weight, budget)
                    self.recipes[point] = check_recipe(point_recipe(self.data[data], point, first.train),
                                                       f"mixture point {point.name}", self.experiment.source)
        self.points = list(self.recipes)

    def needed(self, losses: dict, mode: str) -> list:
        return [p for p in self.points if p not in losses]

    def summary(self, losses: dict) -> dict:
        from megadoc_megatron.experiment.mixture import mixture_summary

        return mixture_summary(self.points, list(self.data), losses)

    def table(self, losses: dict, needed: list) -> str:
        from megadoc_megatron.experiment.mixture import format_summary

        return (format_summary(self.summary(losses), self.budgets)
                + f"\n{len(losses)} of {len(self.points)} points finished, {len(needed)} needed")

    def report(self, losses: dict) -> None:
        from megadoc_megatron.experiment.mixture import write_mixture_report

        path = write_mixture_report(Path(self.experiment.work_dir), self.summary(losses), self.budgets)
        print(f"mixture report: {path} (and mixture.json, mixture.png)")

    def outcome(self, losses: dict) -> dict:
        return {"best_weight": {data: result["best_weight"] for data, result in self.summary(losses).items()}}


@dataclass
class SweepConfig:
    """The settings of `megadoc sweep`."""
    config: str                        # YAML experiment config with a sweep (or mixture) section
    overrides: list[str] = field(default_factory=list)  # SECTION.FIELD=VALUE, passed on to SLURM jobs
    mode: str = "neighbours"           # neighbours | grid: which runs are needed
    execute: str | None = None         # local | slurm | None (only print the table)
    sbatch_args: str = ""              # slurm: options for sbatch
    dry_run: bool = False              # slurm: print the sbatch commands instead of running them
    point: str | None = None           # run just this point (what each SLURM job does)
    preset: str | None = None          # mixture: the synthetic-mixture study instead of the sweep


def run_sweep(options: SweepConfig) -> dict:
    study = (MixtureStudy(options.config, options.overrides) if options.preset == "mixture"
             else Sweep(options.config, options.overrides))
    if options.point:
        point = next((p for p in study.points if study.point_name(p) == options.point), None)
        if point is None:
            raise InputError(f"no sweep point named {options.point!r}", study.experiment.source,
                             fix="use a name from the table of `megadoc sweep CONFIG`")
        study.run_point(point)
        return {"ran": options.point}
    losses = study.losses()
    needed = study.needed(losses, options.mode)
    while options.execute == "local" and needed:
        for point in needed:
            print(f"megadoc sweep: running {study.point_name(point)}", flush=True)
            study.run_point(point)
        losses = study.losses()
        needed = study.needed(losses, options.mode)
    if options.execute == "slurm":
        for point in needed:
            command = ["sbatch", "--job-name", study.point_name(point), *shlex.split(options.sbatch_args),
                       "--wrap", study.job_command(point, options.preset)]
            print(shlex.join(command), flush=True)
            if not options.dry_run:
                subprocess.run(command, check=True)
    if options.execute == "local":
        study.report(losses)
    print(study.table(losses, needed))
    return {"losses": {study.point_name(p): v for p, v in losses.items()},
            "needed": [study.point_name(p) for p in needed], **study.outcome(losses)}
