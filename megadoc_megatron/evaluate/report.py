"""`megadoc report RUNS...`: recipes against their losses and data efficiency, as Markdown, HTML and PNG plots.

A run is the checkpoint.dir of `megadoc train`, with the results of `megadoc eval` in RUN/eval/.
Its settings come from the checkpoint (lr, weight decay), its blend.json (E, w, real tokens), and
RUN/recipe.json when present ({"name": "stitch_g8", "recipe": "stitch", "generations": 8}; `megadoc run`
writes it).
Data efficiency needs a baseline: real-only runs at four or more amounts of real data, fitted
with L(D) = A / D^B + C and inverted at each run's loss.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from megadoc_megatron.errors import InputError
from megadoc_megatron.evaluate.results import latest_result
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

    def to_json(self) -> str:
        values = asdict(self)
        if values["round"] is None:
            del values["round"]
        return json.dumps(values)

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


def baseline_fit(runs: list[Run]):
    """The fit of real-only runs over real tokens, or (None, why not)."""
    return fit_or_reason([(r.real_tokens, r.iid_loss) for r in runs
                          if r.recipe == "real" and r.iid_loss and r.real_tokens],
                "real-only data amounts")


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


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({task for run in runs for task in run.downstream})
    header = ["run", "recipe", "G", "E", "w", "lr", "wd", "i.i.d. loss", "long-context loss", "beyond offset",
              *tasks, "data efficiency"]
    rows = []
    for run in sorted(runs, key=lambda r: (RECIPES.index(r.recipe) if r.recipe in RECIPES else 9, r.generations or 0)):
        long = run.long_context["long"] if run.long_context else {}
        rows.append([run.name, run.recipe, _cell(run.generations), _cell(run.epochs), _cell(run.synthetic_weight),
                     _cell(run.lr), _cell(run.weight_decay), _cell(run.iid_loss, ".4f"), _cell(long.get("loss"), ".4f"),
                     _cell((long.get("beyond_offset") or {}).get("loss"), ".4f"),
                     *[_cell(run.downstream.get(task), ".3f") for task in tasks],
                     f"{run.efficiency:.2f}x" if run.efficiency and not math.isinf(run.efficiency)
                     else _cell(run.efficiency)])
    return header, rows


def asymptote_rows(found: list[Asymptote]) -> tuple[list[str], list[list[str]]]:
    header = ["over", "run / recipe", "points", "loss at the largest", "asymptote C", "C p05–p95", "note"]
    rows = []
    for item in found:
        spread = (item.fit.bootstrap or {}).get("C") if item.fit else None
        rows.append([item.over, item.subject, str(len(item.points)), _cell(item.points[-1][1], ".4f"),
                     _cell(item.fit.C if item.fit else None, ".4f"),
                     f"{spread['p05']:.4f}–{spread['p95']:.4f}" if spread else "—", item.note or ""])
    return header, rows


def plot_all(runs: list[Run], fit, folder: Path, found: list[Asymptote] = ()) -> list[tuple[str, str]]:
    """PNG plots: (file name, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    plots = [_plot_generations(runs, folder), _plot_positions(runs, folder), _plot_fit(runs, fit, folder),
             _plot_asymptotes(found, folder)]
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


def _same_data_real_runs(runs: list[Run]) -> list[Run]:
    """Real-only runs on the amount of real data the synthetic recipes used (their reference)."""
    amounts = {r.real_tokens for r in runs if r.recipe != "real"}
    return [r for r in runs if r.recipe == "real" and r.iid_loss is not None and r.real_tokens in amounts]


def _plot_generations(runs, folder):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    by_recipe: dict[str, list] = {}
    for run in runs:
        if run.generations and run.iid_loss is not None:
            by_recipe.setdefault(run.recipe, []).append((run.generations, run.iid_loss))
    if not by_recipe:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for recipe, points in sorted(by_recipe.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=recipe)
    for run in _same_data_real_runs(runs):
        axes.axhline(run.iid_loss, color="grey", linestyle="--", linewidth=1, label=f"real only ({run.name})")
    generations = sorted({g for points in by_recipe.values() for g, _ in points})
    axes.set(xscale="log", xlabel="generations per document (G)", ylabel="i.i.d. loss", title="Loss vs. generations")
    axes.set_xticks(generations)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.legend(fontsize="small")
    return _save(figure, folder / "loss_vs_generations.png", "i.i.d. loss against G per recipe (dashed: real-only "
                                                             "runs on the same real data)")


def _plot_positions(runs, folder):
    import matplotlib.pyplot as plt

    with_positions = [r for r in runs if r.long_context]
    if not with_positions:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for run in with_positions:
        buckets = [b for b in run.long_context["long"]["buckets"] if b["loss"] is not None]
        axes.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o",
                  label=f"{run.name} ({run.recipe})")
    axes.set(xlabel="token position (bucket middle)", ylabel="loss", title="Long-document loss by position")
    axes.legend(fontsize="small")
    return _save(figure, folder / "loss_vs_position.png", "loss by token position on long held-out documents")


def _plot_fit(runs, fit, folder):
    import matplotlib.pyplot as plt
    import numpy as np

    if fit is None:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    base = sorted((r.real_tokens, r.iid_loss) for r in runs if r.recipe == "real" and r.iid_loss and r.real_tokens)
    recipes = [r for r in runs if r.recipe != "real" and r.iid_loss is not None and r.efficiency
               and not math.isinf(r.efficiency)]
    right = max([base[-1][0]] + [r.efficiency * r.real_tokens for r in recipes]) * 2
    xs = np.geomspace(base[0][0] / 2, right, 200)
    axes.plot(xs, fit.loss(xs), color="black",
              label=f"real only: {fit.A:.3g} / (D / {fit.x_unit:.3g})^{fit.B:.3g} + {fit.C:.3f}")
    axes.scatter([p[0] for p in base], [p[1] for p in base], color="black", zorder=3)
    axes.axhline(fit.C, color="black", linestyle=":", linewidth=1, label=f"asymptote {fit.C:.3f}")
    colors: dict[str, str] = {}
    for run in recipes:  # a recipe's loss, read off the baseline: the real data it is worth
        first = run.recipe not in colors
        color = colors.setdefault(run.recipe, f"C{len(colors)}")
        worth = run.efficiency * run.real_tokens
        axes.plot([run.real_tokens, worth], [run.iid_loss] * 2, color=color, linewidth=1, alpha=0.6)
        axes.scatter([worth], [run.iid_loss], color=color, zorder=3, label=run.recipe if first else None)
    axes.set(xscale="log", xlabel="unique real tokens D", ylabel="i.i.d. loss",
             title="Baseline scaling fit; recipes at the real data they are worth")
    axes.legend(fontsize="small")
    return _save(figure, folder / "scaling_fit.png", "the real-only scaling law and its asymptote; each recipe's loss "
                                                     "is drawn from the real tokens it used to the real tokens the "
                                                     "baseline needs for that loss (the ratio is its data efficiency)")


def _save(figure, path: Path, caption: str) -> tuple[str, str]:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path.name, caption


def _markdown_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def markdown(header, rows, plots, fit, fit_note, asymptote_table=None) -> str:
    lines = ["# megadoc report", "", *_markdown_table(header, rows), "", _fit_sentence(fit, fit_note), ""]
    if asymptote_table and asymptote_table[1]:
        lines += ["## Asymptotes", "", *_markdown_table(*asymptote_table), ""]
    for name, caption in plots:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _fit_sentence(fit, note) -> str:
    if fit is None:
        return f"No data efficiency: {note}."
    return (f"Baseline: L(D) = {fit.A:.4g} / (D / {fit.x_unit:.4g})^{fit.B:.4g} + {fit.C:.4f} "
            f"over {fit.points} real-only runs (rmse {fit.rmse:.2g}); "
            "data efficiency = D(recipe loss) / real tokens used.")


def _html_table(header, rows) -> str:
    cells = lambda tag, values: "".join(f"<{tag}>{html.escape(v)}</{tag}>" for v in values)  # noqa: E731
    return "".join([f"<table><tr>{cells('th', header)}</tr>", *[f"<tr>{cells('td', row)}</tr>" for row in rows],
                    "</table>"])


def html_page(header, rows, plots, fit, fit_note, asymptote_table=None) -> str:
    body = [_html_table(header, rows), f"<p>{html.escape(_fit_sentence(fit, fit_note))}</p>"]
    if asymptote_table and asymptote_table[1]:
        body += ["<h2>Asymptotes</h2>", _html_table(*asymptote_table)]
    body += [f'<figure><img src="{name}"><figcaption>{html.escape(caption)}</figcaption></figure>'
             for name, caption in plots]
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>megadoc report</title><style>{style}</style>" \
           f"</head><body><h1>megadoc report</h1>{''.join(body)}</body></html>\n"


def build_report(run_dirs: list[str], output, eval_name: str | None = None) -> dict:
    return write_report([load_run(Path(d), eval_name) for d in run_dirs], output)


def write_report(runs: list[Run], output) -> dict:
    """The report of loaded runs: each one's data efficiency against the real-only baseline fit (where
    there are enough real-only runs), tables, plots and report.json."""
    fit, note = baseline_fit(runs)
    if fit is not None:
        for run in runs:
            if run.iid_loss is not None and run.real_tokens:
                run.efficiency = fit.inverse(run.iid_loss) / run.real_tokens
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(runs)
    found = asymptotes(runs)
    plots = plot_all(runs, fit, folder, found)
    asymptote_table = asymptote_rows(found)
    text = markdown(header, rows, plots, fit, note, asymptote_table)
    write_text_atomic(folder / "report.md", text + "\n")
    write_text_atomic(folder / "report.html", html_page(header, rows, plots, fit, note, asymptote_table))
    summary = {"runs": [{k: v for k, v in vars(r).items() if k != "path"} for r in runs],
               "baseline_fit": fit.as_dict() if fit else None, "baseline_note": note, "plots": [p[0] for p in plots],
               "asymptotes": [{"over": a.over, "subject": a.subject, "points": a.points,
                               "fit": a.fit.as_dict() if a.fit else None, "note": a.note} for a in found]}
    write_text_atomic(folder / "report.json", json.dumps(summary, indent=2, default=str) + "\n")
    return {"markdown": text, **summary}
