"""`megadoc sweep CONFIG --preset mixture`: the synthetic-mixture study of "Demystifying synthetic
data" (Kang et al., 2025): the synthetic share w of a token budget, at several budgets, per data
type; a scaling fit L(D) = A / D^B + C over the budget D for each (type, w); the best w per budget.

The config's `mixture` section:

    mixture:
      data:                                   # the data types: recipes without E, w or budget
        - {name: hq, kind: simple, generations: 4, styles: [wikipedia]}
        - {name: qa, kind: simple, generations: 4, styles: [qa]}
        - {name: textbook, kind: textbook, generations: 4}
      synthetic_weight: [0, 0.1667, 0.3333, 0.5, 0.6667, 1]
      train_tokens: [1.0e+8, 2.0e+8, 4.0e+8, 8.0e+8]

Every point is a recipe with `train_tokens` (the blend's budget mode, see `megadoc blend`); w = 0
is one real-only run per budget, shared by every data type, and w = 1 trains on synthetic data
only. Results: WORK/mixture/mixture.md, mixture.json and mixture.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megadoc_megatron.errors import InputError

SECTION = "mixture"


@dataclass(frozen=True)
class MixturePoint:
    data: str           # the data type's name; "real" when weight is 0
    weight: float       # w: the synthetic share of the budget
    budget: int         # D: training tokens

    @property
    def name(self) -> str:
        return f"{self.data}-w{self.weight:.3g}-D{self.budget:g}" if self.weight else f"real-D{self.budget:g}"


def parse_mixture(experiment):
    """(data recipes by name, weights, budgets) from the config's mixture section."""
    from megadoc_megatron.config import build_dataclass
    from megadoc_megatron.experiment.config import Recipe, check_recipe

    section, source = experiment.mixture, experiment.source
    if not isinstance(section, dict):
        raise InputError("the config has no mixture section", source,
                         fix="add `mixture: {data: [...], synthetic_weight: [...], train_tokens: [...]}`")
    unknown = sorted(set(section) - {"data", "synthetic_weight", "train_tokens"})
    if unknown:
        raise InputError(f"mixture.{unknown[0]} is unknown", source, fix="use data, synthetic_weight, train_tokens")
    weights, budgets = (_numbers(section, name, source) for name in ("synthetic_weight", "train_tokens"))
    if not all(0 <= w <= 1 for w in weights) or not all(b > 0 for b in budgets):
        raise InputError("mixture: synthetic weights lie in [0, 1] and budgets are positive", source,
                         fix="e.g. synthetic_weight: [0, 0.3333, 1], train_tokens: [1.0e+8, 2.0e+8]")
    entries = section.get("data")
    if not isinstance(entries, list) or not entries:
        raise InputError("mixture.data: give a list of data types", source,
                         fix="e.g. `data: [{name: hq, kind: simple, generations: 4}]`")
    data = {}
    for i, entry in enumerate(entries):
        where = f"mixture.data[{i}]"
        if not isinstance(entry, dict) or {"epochs", "train_tokens", "synthetic_weight"} & set(entry):
            raise InputError(f"{where}: a data type has no epochs, train_tokens or synthetic_weight "
                             "(the study sets them)",
                             source, fix="give name, kind, generations and optionally styles and train")
        recipe = build_dataclass(Recipe, {**entry, "train_tokens": int(budgets[0]), "synthetic_weight": 1.0},
                                 where, source)
        if recipe.kind == "real" or recipe.name == "real":
            raise InputError(f"{where}: the real-only runs (w = 0) are part of the study", source,
                             fix="list synthetic data types only, and not under the name real")
        data[recipe.name] = check_recipe(recipe, where, source)
    if len(data) != len(entries):
        raise InputError("mixture.data: two data types share a name", source, fix="give each its own name")
    return data, weights, [int(b) for b in budgets]


def _numbers(section: dict, name: str, source) -> list[float]:
    values = section.get(name)
    if not isinstance(values, list) or not values or any(not isinstance(v, (int, float)) for v in values) \
            or len(set(values)) != len(values):
        raise InputError(f"mixture.{name} must be a list of distinct numbers, not {values!r}", source,
                         fix=(f"e.g. {name}: [0, 0.5, 1]" if name == "synthetic_weight"
                              else f"e.g. {name}: [1.0e+8, 2.0e+8]"))
    return sorted(float(v) for v in values)


def point_recipe(data, point: MixturePoint, real_train: dict):
    from dataclasses import replace

    from megadoc_megatron.experiment.config import Recipe

    if not point.weight:
        return Recipe(name=point.name, kind="real", train_tokens=point.budget, train=real_train)
    return replace(data, name=point.name, epochs=None, train_tokens=point.budget, synthetic_weight=point.weight)


def mixture_summary(points: list[MixturePoint], data_names: list[str], losses: dict) -> dict:
    """Per data type: the fit over budget for each w, and the best w at each budget."""
    from megadoc_megatron.evaluate.report import fit_or_reason

    weights = sorted({p.weight for p in points})
    budgets = sorted({p.budget for p in points})
    summary = {}
    for data in data_names:
        def loss(weight, budget):
            return losses.get(MixturePoint("real" if not weight else data, weight, budget))

        fits = {}
        for weight in weights:
            found = [(b, loss(weight, b)) for b in budgets if loss(weight, b) is not None]
            fit, note = fit_or_reason(found, f"budgets (w={weight:.3g})")
            fits[f"{weight:.4g}"] = {"fit": fit.as_dict() if fit else None, "note": note,
                                     "losses": {str(b): v for b, v in found}}
        best = {}
        for budget in budgets:
            found = {w: loss(w, budget) for w in weights if loss(w, budget) is not None}
            best[str(budget)] = min(found, key=found.get) if found else None
        summary[data] = {"fits": fits, "best_weight": best}
    return summary


def format_summary(summary: dict, budgets: list[int]) -> str:
    lines = []
    for data, result in summary.items():
        lines += [f"### {data}", "", "| w | " + " | ".join(f"D={b:g}" for b in budgets) + " | fit L(D) = A/D^B + C |",
                  "|---|" + "---|" * (len(budgets) + 1)]
        for weight, entry in result["fits"].items():
            cells = [f"{entry['losses'][str(b)]:.4f}" if str(b) in entry["losses"] else "—" for b in budgets]
            fit = entry["fit"]
            law = f"A={fit['A']:.3g}, B={fit['B']:.3g}, C={fit['C']:.4f}" if fit else \
                (f"no fit: {entry['note']}" if entry["losses"] else "—")
            lines.append(f"| {weight} | " + " | ".join(cells) + f" | {law} |")
        best = ", ".join(f"D={int(b):g}: w={w:.3g}" for b, w in result["best_weight"].items() if w is not None)
        lines += ["", f"lowest loss: {best or 'no finished runs yet'}", ""]
    return "\n".join(lines)


def plot_mixture(summary: dict, folder: Path) -> Path:
    """Top row: loss vs. budget, a line (and fit) per w. Bottom row: loss vs. w, a line per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from megadoc_megatron.evaluate.fits import PowerLaw

    figure, panels = plt.subplots(2, len(summary), figsize=(5.5 * len(summary), 8), squeeze=False)
    for column, (data, result) in enumerate(summary.items()):
        top, bottom = panels[0][column], panels[1][column]
        weights = list(result["fits"])
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(weights)))
        budgets = sorted({int(b) for entry in result["fits"].values() for b in entry["losses"]})
        for color, weight in zip(colors, weights):
            entry = result["fits"][weight]
            xs = sorted(int(b) for b in entry["losses"])
            top.plot(xs, [entry["losses"][str(b)] for b in xs], "o", color=color, label=f"w={float(weight):.3g}")
            if entry["fit"]:
                grid = np.geomspace(min(xs), max(xs), 100)
                top.plot(grid, PowerLaw(**entry["fit"]).loss(grid), color=color, linewidth=1)
        top.set(xscale="log", xlabel="training tokens (budget D)", ylabel="i.i.d. loss",
                title=f"{data}: loss vs. budget")
        top.legend(fontsize="small")
        for color, budget in zip(plt.cm.plasma(np.linspace(0, 0.85, len(budgets))), budgets):
            points = [(float(w), result["fits"][w]["losses"][str(budget)]) for w in weights
                      if str(budget) in result["fits"][w]["losses"]]
            bottom.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=f"D={budget:g}")
        bottom.set(xlabel="synthetic share w", ylabel="i.i.d. loss", title=f"{data}: loss vs. w per budget")
        bottom.legend(fontsize="small")
    figure.tight_layout()
    path = folder / "mixture.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_mixture_report(work_dir: Path, summary: dict, budgets: list[int]) -> Path:
    from megadoc_megatron.files import write_text_atomic

    folder = work_dir / "mixture"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "mixture.json", json.dumps(summary, indent=2) + "\n")
    plot = plot_mixture(summary, folder)
    text = ("# Synthetic-mixture study\n\ni.i.d. loss per synthetic share w (rows) and token budget D (columns), "
            "with the scaling fit over D for each w.\n\n" + format_summary(summary, budgets)
            + f"\n![loss vs. budget per w, and vs. w per budget]({plot.name})\n")
    write_text_atomic(folder / "mixture.md", text)
    return folder / "mixture.md"
