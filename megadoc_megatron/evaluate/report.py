"""`megadoc report RUNS...`: recipes against their losses and data efficiency, as Markdown, HTML and PNG plots.

A run is the checkpoint.dir of `megadoc train`, with the results of `megadoc eval` in RUN/eval/.
Its settings come from the checkpoint (lr, weight decay), its blend.json (E, w, real tokens), and
RUN/recipe.json when present ({"name": "stitch_g8", "recipe": "stitch", "generations": 8}; `megadoc run`
writes it).
Data efficiency, the paper's definition: D(L) / D(L_real), where D(·) inverts the baseline's fit
L(D) = A / D^B + C (real-only runs at four or more amounts of real data), L is a recipe's mean
i.i.d. loss and L_real the mean loss of the real-only recipe on the same real data, so real-only is
1.00x by construction. Without a real recipe on all the data there is none. Runs of one name are
the seeds of one recipe: the table shows their mean and standard deviation, and marks differences
within two standard errors (evaluate/summary.py, which also writes the paragraph on the papers'
claims).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.evaluate.results import latest_result
from megadoc_megatron.evaluate.summary import Difference, Spread, claims, summarize
from megadoc_megatron.files import write_text_atomic

RECIPES = ("real", "simple", "stitch", "stretch")


@dataclass
class RunLabel:
    """RUN/recipe.json beside a run's checkpoints: what `megadoc run` trained there (the report's labels).
    Written by hand it may hold any of the fields."""
    name: str | None = None
    recipe: str = "unknown"            # real | simple | stitch | stretch | textbook
    generations: int | None = None     # G
    round: int | None = None           # the refresh round, for refresh recipes
    seed: int | None = None            # the training seed's number (2, 3, ...; none: the first)
    grid: dict | None = None           # a grid point's {recipe, point: {axis: value}} (experiment/config.py)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items()
                           if v is not None or k not in ("round", "seed", "grid")})

    @classmethod
    def load(cls, run_dir: Path) -> "RunLabel":
        path = run_dir / "recipe.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()


@dataclass
class Run:
    name: str
    path: Path
    recipe: str
    generations: int | None
    epochs: float | None
    synthetic_weight: float | None
    lr: float | None
    weight_decay: float | None
    real_tokens: int | None
    iid_loss: float | None = None
    long_context: dict | None = None     # the "long" set of the long-context evaluator
    downstream: dict = field(default_factory=dict)
    efficiency: float | None = None
    parameters: int | None = None        # of the model, from its preset and vocabulary
    ensemble: list[dict] | None = None   # [{"members": K, "loss"}] of this run's largest ensemble result
    seed: int = 1                        # the training seed's number among the runs of its name
    iterations: int | None = None        # training steps (of its latest checkpoint)
    grid: dict | None = None             # a grid point's {recipe, point: {axis: value}}


def load_run(path: Path, eval_name: str | None = None) -> Run:
    from megadoc_megatron.train import checkpoint

    iteration = checkpoint.latest_iteration(path)
    if iteration is None:
        raise InputError("not a `megadoc train` checkpoint folder", path, fix="pass checkpoint.dir of each run")
    common = _checkpoint_common(checkpoint.iteration_dir(path, iteration))
    config = common["config"]
    blend = _blend(config["data"]["blend"])
    label = RunLabel.load(path)
    real_tokens = blend.real_tokens if blend else None
    name = label.name or (path.name if path.name != "ckpt" else path.parent.name)
    run = Run(name, path, label.recipe, label.generations, blend.epochs if blend else None,
              blend.synthetic_weight_requested if blend else None, config["optimizer"]["lr"],
              config["optimizer"]["weight_decay"], real_tokens)
    iid = latest_result(path, "loss", eval_name)
    run.iid_loss = iid.metrics["loss"] if iid else None
    long = latest_result(path, "long-context", eval_name)
    run.long_context = long.metrics if long else None
    # results of one `megadoc run` share a name; results made by hand are called lm-eval
    downstream = (eval_name and latest_result(path, "downstream", eval_name)) or latest_result(path, "downstream")
    run.downstream = downstream.metrics.get("accuracy", {}) if downstream else {}
    info = checkpoint.CheckpointInfo.of(common)
    run.parameters = _parameters(config["model"], info.vocab_size if info else None)
    run.ensemble = _largest_ensemble(path, eval_name)
    run.seed = label.seed or 1
    run.iterations = iteration  # trained, which train.train_iters may cap below the blend's
    run.grid = label.grid
    return run


def _checkpoint_common(source: Path) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(source))


def _parameters(model: dict, vocab_size: int | None) -> int | None:
    from megadoc_megatron.model.presets import PRESETS, padded_vocab_size, parameter_count

    if vocab_size is None or model["preset"] not in PRESETS:
        return None
    preset = PRESETS[model["preset"]]
    sizes = {k: v for k, v in (model.get("overrides") or {}).items() if k in preset.__dataclass_fields__}
    return parameter_count(replace(preset, **sizes), padded_vocab_size(vocab_size))


def _largest_ensemble(run_dir: Path, eval_name: str | None) -> list[dict] | None:
    """The ensemble result (`megadoc eval ensemble`, written beside its first member) with most members."""
    sizes = {int(p.name.split(".")[0][len("ensemble-"):]) for p in (run_dir / "eval").glob("ensemble-*.iter_*.json")}
    for size in sorted(sizes, reverse=True):
        found = latest_result(run_dir, f"ensemble-{size}", eval_name)
        if found:
            return found.metrics["ensembles"]
    return None


def _blend(path: str | None):
    from megadoc_megatron.blend.weights import Blend

    return Blend.load(path) if path and Path(path).is_file() else None


def fit_or_reason(points: list[tuple[float, float]], what: str):
    """The power-law fit of (x, loss) points, or (None, why not)."""
    from megadoc_megatron.evaluate.fits import fit_power_law

    points = sorted(points)
    try:
        return fit_power_law([p[0] for p in points], [p[1] for p in points], what, bootstrap=200), None
    except InputError as error:
        return None, error.message


def baseline_points(summaries: list) -> list[tuple[int, float]]:
    """(unique real tokens, i.i.d. loss) of every run of the real-only recipes (of a grid, the kept
    point's): the baseline's points."""
    return [(r.real_tokens, r.iid_loss) for s in summaries if s.first.recipe == "real" for r in s.runs
            if r.iid_loss and r.real_tokens]


def baseline_fit(summaries: list):
    """The fit of the real-only recipes over real tokens, or (None, why not)."""
    return fit_or_reason(baseline_points(summaries), "real-only data amounts")


@dataclass
class Asymptote:
    over: str                 # "ensemble members" or "parameters"
    subject: str              # the run, or the recipe and G
    points: list[tuple]       # (x, loss)
    fit: object               # PowerLaw or None
    note: str | None          # why there is no fit


def asymptotes(runs: list[Run]) -> list[Asymptote]:
    """L(x) = A / x^B + C over each run's ensemble members, and over model size for each recipe
    and G trained at several sizes: C is the loss as that kind of compute grows without bound."""
    found = []
    for run in runs:
        if run.ensemble:
            points = [(e["members"], e["loss"]) for e in run.ensemble]
            found.append(Asymptote("ensemble members", run.name, points,
                                   *fit_or_reason(points, f"{run.name}'s ensemble members")))
    groups: dict[tuple, list] = {}
    for run in runs:
        if run.parameters and run.iid_loss is not None:
            groups.setdefault((run.recipe, run.generations), []).append((run.parameters, run.iid_loss))
    for (recipe, generations), points in groups.items():
        if len({p[0] for p in points}) > 1:
            subject = recipe + (f" G={generations}" if generations else "")
            found.append(Asymptote("parameters", subject, sorted(points),
                                   *fit_or_reason(points, f"{subject} model sizes")))
    return found


def _cell(value, spec: str = "g") -> str:
    """Settings as short numbers (`g`), losses with four decimals (`.4f`), missing values as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _order(summary) -> tuple:
    run = summary.first
    return (RECIPES.index(run.recipe) if run.recipe in RECIPES else 9, run.generations or 0,
            run.real_tokens or 0)


def _efficiency_cell(summary) -> str:
    """'1.23x (1.10x–1.40x)'; 'beyond the baseline's reach (0.0123 below C; ≥ 2.10x)' below the asymptote."""
    from megadoc_megatron.evaluate.summary import _times

    if summary.efficiency is None:
        return "—"
    if summary.reference is summary:
        return "1.00x (by definition)"
    low_high = summary.efficiency_range
    if math.isinf(summary.efficiency):
        bound = f"; ≥ {_times(low_high[0])}" if low_high and not math.isinf(low_high[0]) else ""
        return f"beyond the baseline's reach ({summary.asymptote_gap:.4f} below C{bound})"
    if low_high is None:
        return _times(summary.efficiency)
    return f"{_times(summary.efficiency)} ({_times(low_high[0])}–{_times(low_high[1])})"


def _spread_cell(value) -> str:
    """A Spread or a Difference as its cell; a dash when missing."""
    return value.cell() if value is not None else "—"


def table_rows(summaries: list) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({task for summary in summaries for run in summary.runs for task in run.downstream})
    header = ["run", "recipe", "G", "E", "w", "lr", "wd", "tuned", "steps", "seeds", "i.i.d. loss", "vs. real only",
              "vs. real only, same steps", "long-context loss", "beyond offset", *tasks, "data efficiency"]
    rows = []
    for summary in sorted(summaries, key=_order):
        run = summary.first
        accuracy = {task: Spread.of(r.downstream.get(task) for r in summary.runs) for task in tasks}
        rows.append([summary.name, run.recipe, _cell(run.generations), _cell(run.epochs),
                     _cell(run.synthetic_weight), _cell(run.lr), _cell(run.weight_decay),
                     summary.tuning.words() if summary.tuning else "—", _cell(run.iterations),
                     str(len(summary.runs)), _spread_cell(summary.iid), _spread_cell(summary.versus_real),
                     _equal_compute_cell(summary), _spread_cell(summary.long), _spread_cell(summary.beyond),
                     *[_cell(a.cell(3) if a else None) for a in accuracy.values()],
                     _efficiency_cell(summary)])
    return header, rows


def _equal_compute_cell(summary) -> str:
    if summary.versus_equal_compute is None:
        return "—"
    return f"{summary.versus_equal_compute.cell()} ({summary.equal_compute.name})"


def tuning_rows(summaries: list) -> tuple[list[str], list[list[str]]]:
    """Every point of every grid, with its mean loss; the kept one marked."""
    header = ["recipe", "point", "E", "w", "lr", "wd", "steps", "seeds", "i.i.d. loss", ""]
    rows = []
    for summary in sorted((s for s in summaries if s.tuning), key=_order):
        for point in summary.tuning.points:
            run = point.first
            rows.append([summary.name, point.name, _cell(run.epochs), _cell(run.synthetic_weight), _cell(run.lr),
                         _cell(run.weight_decay), _cell(run.iterations), str(len(point.runs)),
                         _spread_cell(point.iid), "kept" if point.name == summary.tuning.kept else ""])
    return header, rows


TABLE_NOTE = ("Losses: mean ± standard deviation over the seeds. vs. real only: the difference from the real-only "
              "runs on the same real data ± two standard errors; ≈ marks a difference within two standard errors, "
              "which these seeds cannot tell from noise. Data efficiency: D(L) / D(L_real) at the mean loss (the "
              "paper's definition, below), with its 5th–95th percentiles over a bootstrap that refits the baseline "
              "and resamples the seeds of the recipe and of the real-only recipe; a real-only recipe is 1.00x by "
              "definition. \"Beyond the baseline's reach\": the loss lies below the baseline's asymptote C by the "
              "gap shown, so no amount of real data reaches it on this fit; ≥ gives the bootstrap's 5th percentile "
              "where it is finite. tuned: for a recipe given as a grid, the point kept (lowest mean i.i.d. loss; "
              "every point in the Tuning table) and whether it is a local optimum: every neighbour one step away "
              "on each axis trained and worse. steps: training iterations. vs. real only, same steps: the "
              "difference from the real-only runs on the same real data that trained as many steps (any point "
              "of its grid; named), which holds compute equal.")


def asymptote_rows(found: list[Asymptote]) -> tuple[list[str], list[list[str]]]:
    header = ["over", "run / recipe", "points", "loss at the largest", "asymptote C", "C p05–p95", "note"]
    rows = []
    for item in found:
        spread = (item.fit.bootstrap or {}).get("C") if item.fit else None
        rows.append([item.over, item.subject, str(len(item.points)), _cell(item.points[-1][1], ".4f"),
                     _cell(item.fit.C if item.fit else None, ".4f"),
                     f"{spread['p05']:.4f}–{spread['p95']:.4f}" if spread else "—", item.note or ""])
    return header, rows


def plot_all(summaries: list, fit, folder: Path, found: list[Asymptote] = ()) -> list[tuple[str, str]]:
    """PNG plots: (file name, caption). Error bars: the standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context({"font.size": 12, "legend.fontsize": 10}):  # legible at the docs' width
        plots = [_plot_generations(summaries, folder), _plot_positions(summaries, folder),
                 _plot_fit(summaries, fit, folder), _plot_asymptotes(found, folder)]
    return [p for p in plots if p is not None]


def _plot_asymptotes(found: list[Asymptote], folder):
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    kinds = [k for k in ("ensemble members", "parameters") if any(a.over == k for a in found)]
    if not kinds:
        return None
    figure, panels = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for axes, kind in zip(panels[0], kinds):
        for number, item in enumerate(a for a in found if a.over == kind):
            color = f"C{number}"
            xs = [p[0] for p in item.points]
            axes.scatter(xs, [p[1] for p in item.points], color=color, zorder=3, label=item.subject)
            if item.fit:
                grid = np.geomspace(min(xs), max(xs) * 4, 100)
                axes.plot(grid, item.fit.loss(grid), color=color, linewidth=1)
                axes.axhline(item.fit.C, color=color, linestyle=":", linewidth=1, label=f"asymptote {item.fit.C:.3f}")
        axes.set(xscale="log", xlabel=kind, ylabel="i.i.d. loss" if kind == "parameters" else "ensemble loss",
                 title=f"Loss vs. {kind}")
        axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
        if kind == "ensemble members":
            axes.set_xticks(sorted({p[0] for a in found if a.over == kind for p in a.points}))
            axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.legend(fontsize="small")
    return _save(figure, folder / "asymptotes.png", "L(x) = A / x^B + C over ensemble members and over model size; "
                                                    "dotted: the asymptote C")


def _std(spread) -> float:
    return spread.std or 0.0


def _plot_generations(summaries, folder):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from megadoc_megatron.evaluate.summary import same_data_real

    by_recipe: dict[str, list] = {}
    for summary in summaries:
        if summary.first.generations and summary.iid is not None:
            by_recipe.setdefault(summary.first.recipe, []).append((summary.first.generations, summary.iid))
    if not by_recipe:
        return None
    figure, axes = plt.subplots(figsize=(8, 5))
    for recipe, points in sorted(by_recipe.items()):
        points.sort(key=lambda p: p[0])
        axes.errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[_std(p[1]) for p in points],
                      marker="o", capsize=3, label=recipe)
    references = {id(r): r for s in summaries if s.first.recipe != "real"
                  for r in [same_data_real(s, summaries)] if r is not None}
    for reference in references.values():
        axes.axhline(reference.iid.mean, color="grey", linestyle="--", linewidth=1,
                     label=f"real only ({reference.name})")
        if reference.iid.std:
            axes.axhspan(reference.iid.mean - reference.iid.std, reference.iid.mean + reference.iid.std,
                         color="grey", alpha=0.15)
    generations = sorted({g for points in by_recipe.values() for g, _ in points})
    axes.set(xscale="log", xlabel="generations per document (G)", ylabel="i.i.d. loss", title="Loss vs. generations")
    axes.set_xticks(generations)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, folder / "loss_vs_generations.png", "i.i.d. loss against G per recipe, mean ± standard "
                                                             "deviation over seeds (dashed and shaded: real-only "
                                                             "runs on the same real data)")


def _position_curve(summary) -> dict[float, list[float]]:
    """Bucket middle -> the loss of each seed there, over the buckets every seed has."""
    measured = [run for run in summary.runs if run.long_context]
    curves = [run.long_context["long"]["buckets"] for run in measured]
    return {(b["start"] + b["end"]) / 2: [c[i]["loss"] for c in curves] for i, b in enumerate(curves[0])
            if all(c[i]["loss"] is not None for c in curves)}


def _plot_positions(summaries, folder):
    """Each recipe's loss by position minus that of real-only on the same real data: one line per recipe
    near zero reads where six overlapping loss curves do not."""
    import matplotlib.pyplot as plt

    from megadoc_megatron.evaluate.summary import same_data_real

    pairs = [(s, same_data_real(s, summaries)) for s in summaries if s.long is not None and s.first.recipe != "real"]
    pairs = [(s, r) for s, r in pairs if r is not None and r.long is not None]
    if not pairs:
        return None
    figure, axes = plt.subplots(figsize=(9, 5))
    for number, (summary, real) in enumerate(pairs):
        recipe, reference = _position_curve(summary), _position_curve(real)
        middles = [m for m in recipe if m in reference]
        gaps = [Difference.of(Spread.of(recipe[m]), Spread.of(reference[m])) for m in middles]
        values = [g.value for g in gaps]
        axes.plot(middles, values, marker="o", color=f"C{number % 10}", label=summary.name)
        if all(g.two_errors is not None for g in gaps):
            axes.fill_between(middles, [g.value - g.two_errors for g in gaps],
                              [g.value + g.two_errors for g in gaps], color=f"C{number % 10}", alpha=0.12)
    axes.axhline(0, color="grey", linestyle="--", linewidth=1.2, label=f"real only ({pairs[0][1].name})")
    axes.set(xlabel="token position in the document (bucket middle)", ylabel="loss minus real-only's",
             title="Long held-out documents: loss by position vs. real-only")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    return _save(figure, folder / "loss_vs_position.png",
                 "loss by token position on long held-out documents, each recipe minus real-only on the same "
                 "real data (mean over seeds; shaded: ± two standard errors; below zero: better than real-only)")


def _plot_fit(summaries, fit, folder):
    """The baseline's points and fit over the real data it spans; each recipe a horizontal line at its
    mean loss, marked where it meets the fit (at D(L)) when that lies on the plot."""
    import matplotlib.pyplot as plt
    import numpy as np

    if fit is None:
        return None
    base = sorted((s.first.real_tokens, s.iid) for s in summaries
                  if s.first.recipe == "real" and s.iid is not None and s.first.real_tokens)
    reference = reference_recipe(summaries)
    recipes = [s for s in summaries if s.iid is not None and s.first.recipe != "real"]
    left, right = base[0][0] / 1.5, base[-1][0] * 4  # the baseline's span: no recipe stretches the axis
    figure, axes = plt.subplots(figsize=(9, 5))
    xs = np.geomspace(left, right, 200)
    axes.plot(xs, fit.loss(xs), color="black", linewidth=1.5,
              label=f"fit: {fit.A:.3g} / (D / {fit.x_unit:.3g})^{fit.B:.3g} + {fit.C:.3f}")
    axes.errorbar([p[0] for p in base], [p[1].mean for p in base], yerr=[_std(p[1]) for p in base],
                  color="black", fmt="o", capsize=3, zorder=4, label="real-only runs (mean ± std)")
    axes.axhline(fit.C, color="black", linestyle=":", linewidth=1.2, label=f"asymptote C = {fit.C:.3f}")
    if reference is not None:
        axes.axhline(reference.iid.mean, color="grey", linestyle="--", linewidth=1.5,
                     label=f"L_real: {reference.name} {reference.iid.mean:.4f} (1.00x)")
        if reference.iid.mean > fit.C and left <= fit.inverse(reference.iid.mean) <= right:
            axes.plot([fit.inverse(reference.iid.mean)], [reference.iid.mean], marker="s", color="grey", zorder=5)
    for number, summary in enumerate(recipes):
        color, loss = f"C{number % 10}", summary.iid.mean
        axes.axhline(loss, color=color, linewidth=1.5, label=f"{summary.name} {loss:.4f}: "
                                                              f"{_plot_efficiency(summary)}")
        if summary.iid.std:
            axes.axhspan(loss - summary.iid.std, loss + summary.iid.std, color=color, alpha=0.12)
        worth = fit.inverse(loss)
        if left <= worth <= right:
            axes.plot([worth], [loss], marker="o", color=color, zorder=5)
    losses = [p[1].mean for p in base] + [s.iid.mean for s in recipes]
    span = max(losses) - min(losses) or 1.0
    if fit.C > min(losses) - span:  # an asymptote far below the points would flatten them into one line
        losses.append(fit.C)
    margin = 0.06 * (max(losses) - min(losses))
    axes.set_ylim(min(losses) - margin, max(losses) + margin)
    axes.set_xlim(left, right)
    axes.set(xscale="log", xlabel="unique real tokens D", ylabel="i.i.d. loss",
             title="Real-only baseline and the recipes' losses")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return _save(figure, folder / "scaling_fit.png",
                 "the real-only baseline: its runs (mean ± standard deviation over seeds), the fit "
                 "L(D) = A / D^B + C and its asymptote C (dotted); each recipe a horizontal line at its mean "
                 "loss (shaded: ± standard deviation), marked where it meets the fit, at D(L); dashed: L_real, "
                 "the real-only recipe on all the real data. Data efficiency = D(L) / D(L_real); a line "
                 "below C is beyond the baseline's reach")


def _plot_efficiency(summary) -> str:
    if summary.efficiency is None:
        return "no efficiency"
    if math.isinf(summary.efficiency):
        return f"beyond reach ({summary.asymptote_gap:.3f} below C)"
    from megadoc_megatron.evaluate.summary import _times

    return _times(summary.efficiency)


def _save(figure, path: Path, caption: str) -> tuple[str, str]:
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name, caption


def _markdown_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


CLAIMS_TITLE = "What this run says about the papers' claims"
TUNING_NOTE = ("Every point of the recipes given as grids, mean ± standard deviation over its seeds; the kept point "
               "(lowest mean i.i.d. loss) stands for its recipe above.")


def markdown(header, rows, plots, notes: list[str], paragraph: str, asymptote_table=None,
             tuning_table=None) -> str:
    lines = ["# megadoc report", "", *_markdown_table(header, rows), ""]
    for note in notes:
        lines += [note, ""]
    if paragraph:
        lines += [f"## {CLAIMS_TITLE}", "", paragraph, ""]
    if tuning_table and tuning_table[1]:
        lines += ["## Tuning", "", TUNING_NOTE, "", *_markdown_table(*tuning_table), ""]
    if asymptote_table and asymptote_table[1]:
        lines += ["## Asymptotes", "", *_markdown_table(*asymptote_table), ""]
    for name, caption in plots:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


EFFICIENCY_DEFINITION = "D(L) / D(L_real)"


def _fit_sentence(fit, note, summaries) -> str:
    if fit is None:
        return f"No data efficiency: {note}."
    law = (f"Baseline: L(D) = {fit.A:.4g} / (D / {fit.x_unit:.4g})^{fit.B:.4g} + {fit.C:.4f} "
           f"over {fit.points} real-only runs (rmse {fit.rmse:.2g}). ")
    if fit.C <= 1e-9:  # the fit's bound: the points bend too little to place an asymptote
        largest = max(s.first.real_tokens or 0 for s in summaries)
        law += (f"C sits at its bound 0: these points do not flatten, so the asymptote is not measured, and D(L) "
                f"past the largest real-only amount ({_count(largest)} tokens) extrapolates the fitted curve. ")
    why_not = efficiency_status(summaries, fit)
    if why_not is not None:
        return law + f"No data efficiency: {why_not}."
    reference = reference_recipe(summaries)
    seeds = f"mean of {reference.iid.count} seeds" if reference.iid.count > 1 else "one seed"
    return law + _edges_sentence(summaries) + (
                  f"Data efficiency (the paper's definition) = D(L) / D(L_real): D(·) inverts this fit, "
                  f"D(L) = {fit.x_unit:.4g} · ({fit.A:.4g} / (L - {fit.C:.4f}))^(1/{fit.B:.4g}); L is a recipe's "
                  f"mean i.i.d. loss and L_real the real-only recipe's on the same real data. Reference: "
                  f"{reference.name}, real-only on all {_count(reference.first.real_tokens)} real tokens, "
                  f"L_real = {reference.iid.mean:.4f} ({seeds}), which the fit reaches at "
                  f"D(L_real) = {_count(fit.inverse(reference.iid.mean))} tokens; real-only is 1.00x by "
                  f"construction. A recipe at 1.5x reaches the loss real-only training would reach on 1.5 times "
                  f"the real data; one below the asymptote C is beyond the baseline's reach."
                  + _without_reference(summaries))


def _edges_sentence(summaries) -> str:
    """' Real-only runs at their grid's edge: ...' (the fit's points that may not be their best), or ''."""
    edges = [f"{s.name} ({s.tuning.words()})" for s in summaries
             if s.first.recipe == "real" and s.tuning and (s.tuning.verdict.edges or not s.tuning.verdict.tuned)]
    return (f"Real-only points not at a local optimum of their grid, so perhaps above their best loss: "
            f"{'; '.join(edges)}. " if edges else "")


def _without_reference(summaries) -> str:
    """' No data efficiency for X, Y: no real-only recipe on their real data.', or ''."""
    from megadoc_megatron.evaluate.summary import same_data_real

    missing = [s.name for s in summaries if s.iid is not None and same_data_real(s, summaries) is None]
    return (f" No data efficiency for {', '.join(missing)}: no real-only recipe was trained on the same real "
            "data, so there is no L_real for them." if missing else "")


def claims_paragraph(found: list[dict], summaries: list, no_efficiency: str | None = None) -> str:
    """The claims' sentences as one paragraph, after the scale they were measured at (and why there is
    no data efficiency, where the baseline cannot give one)."""
    if not found:
        return ""
    largest = max(summaries, key=lambda s: s.first.real_tokens or 0).first
    scale = (f"These runs train {_count(largest.parameters)}-parameter models on up to "
             f"{_count(largest.real_tokens)} unique real tokens; the" if largest.parameters and largest.real_tokens
             else "The")
    return (f"{scale} papers' figures come from 300M-parameter models on 204M real tokens, so they are given for "
            "reference, not as a target. " + (f"This run claims no data efficiency: {no_efficiency}. "
                                              if no_efficiency else "")
            + " ".join(claim["text"] for claim in found))


def _count(value: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.4g}"


def _html_table(header, rows) -> str:
    cells = lambda tag, values: "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values)  # noqa: E731
    return "".join([f"<table><tr>{cells('th', header)}</tr>", *[f"<tr>{cells('td', row)}</tr>" for row in rows],
                    "</table>"])


def html_page(header, rows, plots, notes: list[str], paragraph: str, asymptote_table=None,
              tuning_table=None) -> str:
    body = [_html_table(header, rows), *[f"<p>{html.escape(note)}</p>" for note in notes]]
    if paragraph:
        body += [f"<h2>{html.escape(CLAIMS_TITLE)}</h2>", f"<p>{html.escape(paragraph)}</p>"]
    if tuning_table and tuning_table[1]:
        body += ["<h2>Tuning</h2>", f"<p>{html.escape(TUNING_NOTE)}</p>", _html_table(*tuning_table)]
    if asymptote_table and asymptote_table[1]:
        body += ["<h2>Asymptotes</h2>", _html_table(*asymptote_table)]
    body += [f'<figure><img src="{name}"><figcaption>{html.escape(caption)}</figcaption></figure>'
             for name, caption in plots]
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>megadoc report</title><style>{style}</style>" \
           f"</head><body><h1>megadoc report</h1>{''.join(body)}</body></html>\n"


def build_report(run_dirs: list[str], output, eval_name: str | None = None) -> dict:
    return write_report([load_run(Path(d), eval_name) for d in run_dirs], output)


def reference_recipe(summaries: list):
    """The real-only recipe on all the real data (the most real tokens any run used), or None: its mean
    i.i.d. loss is L_real, the denominator's loss of the paper's data efficiency."""
    largest = max((s.first.real_tokens or 0 for s in summaries), default=0)
    return next((s for s in summaries if s.first.recipe == "real" and s.iid is not None and largest
                 and s.first.real_tokens == largest), None)


def efficiency_status(summaries: list, fit) -> str | None:
    """Why the report prints no data efficiency although the baseline fits, or None when it can."""
    reference = reference_recipe(summaries)
    if reference is None:
        largest = max((s.first.real_tokens or 0 for s in summaries), default=0)
        return (f"no real-only recipe was trained on all the real data ({_count(largest)} tokens), so there is no "
                "L_real to measure D(L) / D(L_real) against; train the real recipe on all the documents")
    if reference.tuning and reference.tuning.at_largest_epochs:
        return (f"real-only is compute-limited here: {reference.name} did best at the most epochs of its grid "
                f"(E {reference.first.epochs:g}), so more epochs may keep helping and L_real is not the "
                "data-limited loss the definition needs; extend the real recipe's epochs grid (or change the "
                "scale: fewer tokens, a smaller model, a longer schedule) until the best E is interior")
    if reference.iid.mean <= fit.C:
        return (f"the real-only recipe {reference.name}'s loss L_real = {reference.iid.mean:.4f} is at or below the "
                f"baseline fit's asymptote C = {fit.C:.4f}, so D(L_real) is undefined; the baseline needs more "
                "(or less noisy) points")
    return None


def add_efficiency(summaries: list, fit) -> None:
    """Each recipe's data efficiency, the paper's definition: D(L) / D(L_real) at its mean loss L, D
    inverting the baseline fit and L_real the mean loss of the real-only recipe on the same real data
    (so real-only is 1.00x), with a bootstrap range that refits the baseline and inverts both (fits.py)."""
    from megadoc_megatron.evaluate.fits import baseline_bootstrap, efficiency_range
    from megadoc_megatron.evaluate.summary import same_data_real

    if efficiency_status(summaries, fit) is not None:
        return
    baseline: dict[int, list[float]] = {}
    for tokens, loss in baseline_points(summaries):
        baseline.setdefault(tokens, []).append(loss)
    refits = baseline_bootstrap(baseline)
    for summary in summaries:
        reference = same_data_real(summary, summaries)
        if summary.iid is None or reference is None or reference.iid.mean <= fit.C:
            continue
        summary.reference = reference
        real_tokens = fit.inverse(reference.iid.mean)
        for run in summary.runs:
            if run.iid_loss is not None:
                run.efficiency = fit.inverse(run.iid_loss) / real_tokens
        if reference is summary:
            summary.efficiency, summary.efficiency_range = 1.0, (1.0, 1.0)
            continue
        summary.efficiency = fit.inverse(summary.iid.mean) / real_tokens
        if summary.iid.mean <= fit.C:
            summary.asymptote_gap = fit.C - summary.iid.mean
        losses = [r.iid_loss for r in summary.runs if r.iid_loss is not None]
        reference_losses = [r.iid_loss for r in reference.runs if r.iid_loss is not None]
        summary.efficiency_range = efficiency_range(refits, losses, reference_losses) if refits else None


def _summary_json(summary) -> dict:
    def spread(value):
        return None if value is None else {"mean": value.mean, "std": value.std, "seeds": value.count}

    difference = summary.versus_real
    return {"name": summary.name, "recipe": summary.first.recipe, "generations": summary.first.generations,
            "real_tokens": summary.first.real_tokens, "seeds": [r.seed for r in summary.runs],
            "iid_loss": spread(summary.iid), "long_context_loss": spread(summary.long),
            "beyond_offset_loss": spread(summary.beyond),
            "versus_real": None if difference is None else {"difference": difference.value,
                                                            "two_standard_errors": difference.two_errors,
                                                            "resolved": difference.resolved},
            "efficiency": summary.efficiency, "efficiency_p05_p95": summary.efficiency_range,
            "efficiency_reference": None if summary.reference is None else {
                "recipe": summary.reference.name, "loss": summary.reference.iid.mean},
            "below_asymptote_by": summary.asymptote_gap, "iterations": summary.first.iterations,
            "equal_compute": None if summary.versus_equal_compute is None else {
                "real_run": summary.equal_compute.name, "iterations": summary.equal_compute.first.iterations,
                "difference": summary.versus_equal_compute.value,
                "two_standard_errors": summary.versus_equal_compute.two_errors,
                "resolved": summary.versus_equal_compute.resolved},
            "tuning": None if summary.tuning is None else {
                "axes": summary.tuning.axes, "kept": summary.tuning.kept, "tuned": summary.tuning.verdict.tuned,
                "edges": summary.tuning.verdict.edges, "verdict": summary.tuning.words(),
                "points": {p.name: spread(p.iid) for p in summary.tuning.points}}}


def write_report(runs: list[Run], output) -> dict:
    """The report of loaded runs: each one's data efficiency against the real-only baseline fit (where
    there are enough real-only runs), a row per recipe over its seeds, the claims paragraph, tables,
    plots and report.json."""
    summaries = summarize(runs)
    fit, note = baseline_fit(summaries)
    efficiency_note, reference_json = None, None
    if fit is not None:
        add_efficiency(summaries, fit)
        efficiency_note = efficiency_status(summaries, fit)
        reference = reference_recipe(summaries)
        if efficiency_note is None:
            reference_json = {"recipe": reference.name, "loss": reference.iid.mean, "seeds": reference.iid.count,
                              "real_tokens": reference.first.real_tokens,
                              "tokens_on_fit": fit.inverse(reference.iid.mean)}
    found_claims = claims(summaries)
    paragraph = claims_paragraph(found_claims, summaries, efficiency_note)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(summaries)
    found = asymptotes(runs)
    plots = plot_all(summaries, fit, folder, found)
    asymptote_table, tuning_table = asymptote_rows(found), tuning_rows(summaries)
    notes = [TABLE_NOTE, _fit_sentence(fit, note, summaries)]
    text = markdown(header, rows, plots, notes, paragraph, asymptote_table, tuning_table)
    write_text_atomic(folder / "report.md", text + "\n")
    write_text_atomic(folder / "report.html", html_page(header, rows, plots, notes, paragraph, asymptote_table,
                                                        tuning_table))
    summary = {"runs": [{k: v for k, v in vars(r).items() if k != "path"} for r in runs],
               "recipes": [_summary_json(s) for s in summaries], "claims": found_claims,
               "baseline_fit": fit.as_dict() if fit else None, "baseline_note": note,
               "efficiency_definition": EFFICIENCY_DEFINITION, "efficiency_note": efficiency_note,
               "reference": reference_json, "plots": [p[0] for p in plots],
               "asymptotes": [{"over": a.over, "subject": a.subject, "points": a.points,
                               "fit": a.fit.as_dict() if a.fit else None, "note": a.note} for a in found]}
    write_text_atomic(folder / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    return {"markdown": text, **summary}
