"""The seeds of each recipe as one row (mean, standard deviation, standard error), differences between
recipes judged against two standard errors, and the paragraph in which a report says which of the
papers' claims its numbers support, contradict or cannot resolve (published figures: METHOD.md)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Spread:
    """A metric over a recipe's seeds."""
    mean: float
    std: float | None        # None with one seed
    count: int

    @classmethod
    def of(cls, values) -> "Spread | None":
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    @property
    def error(self) -> float | None:
        """The standard error of the mean."""
        return None if self.std is None else self.std / math.sqrt(self.count)

    def cell(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b), and two standard errors of it (None when either side has one seed)."""
    value: float
    two_errors: float | None

    @classmethod
    def of(cls, a: Spread | None, b: Spread | None) -> "Difference | None":
        if a is None or b is None:
            return None
        errors = None if a.error is None or b.error is None else 2 * math.hypot(a.error, b.error)
        return cls(a.mean - b.mean, errors)

    @property
    def resolved(self) -> bool:
        """Larger than two standard errors: these seeds tell the two apart."""
        return self.two_errors is not None and abs(self.value) > self.two_errors

    def cell(self) -> str:
        if self.two_errors is None:
            return f"{self.value:+.4f}"
        return ("" if self.resolved else "≈ ") + f"{self.value:+.4f} ± {self.two_errors:.4f}"

    def words(self, lower: str, higher: str, same: str) -> str:
        """'LOWER by 0.0123 (± 0.0040)', or 'SAME within two standard errors (...)' when not resolved."""
        size = f"{abs(self.value):.4f}" + ("" if self.two_errors is None else f" (± {self.two_errors:.4f})")
        if self.two_errors is None:
            return f"{lower if self.value < 0 else higher} by {size}, one seed: noise unknown"
        if not self.resolved:
            return f"{same} within two standard errors ({self.value:+.4f} ± {self.two_errors:.4f})"
        return f"{lower if self.value < 0 else higher} by {size}"


@dataclass
class RecipeSummary:
    name: str
    runs: list                          # report.Run, one per seed
    iid: Spread | None
    long: Spread | None                 # long-context loss (the long set)
    beyond: Spread | None               # its loss at positions beyond the offset
    long_minus_iid: Spread | None       # beyond - iid per run: lower means larger long-context gains
    efficiency: float | None = None     # D(L) / D(L_real) at the mean i.i.d. loss; inf below the asymptote
    efficiency_range: tuple | None = None  # its 5th-95th percentiles over a bootstrap of seeds and baseline
    reference: "RecipeSummary | None" = None  # the real-only recipe on the same real data, whose mean is L_real
    asymptote_gap: float | None = None  # C - L when L lies at or below the baseline's asymptote C
    versus_real: Difference | None = None  # i.i.d. loss minus that of the real-only runs on the same real data
    tuning: "Tuning | None" = None      # the grid this recipe was kept from (its best point)
    equal_compute: "RecipeSummary | None" = None  # the real-only runs of as many steps on the same real data
    versus_equal_compute: Difference | None = None  # i.i.d. loss minus theirs

    @property
    def first(self):
        return self.runs[0]


@dataclass
class Tuning:
    """A recipe given as a grid (experiment/config.py): every point's summary, and the verdict of the
    local-optimum rule (evaluate/grids.py) over their mean i.i.d. losses; the best point is kept."""
    axes: dict                          # axis -> values
    points: list                        # RecipeSummary of each point, as trained
    verdict: object                     # grids.Verdict
    kept: str                           # the kept point's name

    @property
    def varied(self) -> list[str]:
        return [axis for axis, values in self.axes.items() if len(values) > 1]

    @property
    def at_largest_epochs(self) -> bool:
        """The best point has the grid's most epochs: more might keep helping (compute-limited)."""
        epochs = self.axes["epochs"]
        return "epochs" in self.verdict.edges and self.verdict.best.values[0] == epochs[-1]

    def words(self) -> str:
        """'E 32 of 8–64: a local optimum', or where it falls short of one."""
        from megadoc_megatron.evaluate.grids import AXES, SHORT

        setting = ", ".join(f"{SHORT[a]} {self.verdict.best.values[AXES.index(a)]:g} of "
                            f"{'/'.join(f'{v:g}' for v in self.axes[a])}" for a in self.varied)
        if not self.verdict.tuned:
            return f"{setting}: not tuned, {len(self.verdict.missing)} neighbour(s) of it not evaluated"
        if self.verdict.edges:
            return f"{setting}: at the grid's edge ({', '.join(SHORT[a] for a in self.verdict.edges)}), extend it"
        return f"{setting}: a local optimum"


def _long(run, key: str | None):
    long = run.long_context["long"] if run.long_context else {}
    return long.get("loss") if key is None else (long.get(key) or {}).get("loss")


def summarize(runs: list) -> list[RecipeSummary]:
    """One summary per recipe, in the order the runs come: the seeds of a run name together, and of a
    recipe given as a grid its best point (see Tuning); each compared with real-only on the same real
    data (tuned) and with real-only of as many training steps."""
    points = summarize_points(runs)
    summaries = keep_best_points(points)
    for summary in summaries:
        reference = same_data_real(summary, summaries)
        if reference is not None and reference is not summary:
            summary.versus_real = Difference.of(summary.iid, reference.iid)
        if summary.first.recipe != "real":
            summary.equal_compute = equal_compute_real(summary, points)
            if summary.equal_compute is not None:
                summary.versus_equal_compute = Difference.of(summary.iid, summary.equal_compute.iid)
    return summaries


def summarize_points(runs: list) -> list[RecipeSummary]:
    """One summary per run name (the seeds of a recipe, or of a grid point, share it)."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    summaries = []
    for name, members in groups.items():
        beyond_gap = [None if r.iid_loss is None or _long(r, "beyond_offset") is None
                      else _long(r, "beyond_offset") - r.iid_loss for r in members]
        summaries.append(RecipeSummary(name, members, Spread.of(r.iid_loss for r in members),
                                       Spread.of(_long(r, None) for r in members),
                                       Spread.of(_long(r, "beyond_offset") for r in members), Spread.of(beyond_gap)))
    return summaries


def keep_best_points(points: list[RecipeSummary]) -> list[RecipeSummary]:
    """The summaries with each grid's points replaced by its best one, named after the grid's recipe."""
    grids: dict[str, list] = {}
    for summary in points:
        if summary.first.grid:
            grids.setdefault(summary.first.grid["recipe"], []).append(summary)
    kept, done = [], set()
    for summary in points:
        grid = summary.first.grid
        if grid is None:
            kept.append(summary)
        elif grid["recipe"] not in done:
            done.add(grid["recipe"])
            kept.append(_best_point(grid["recipe"], grids[grid["recipe"]]))
    return kept


def _best_point(recipe: str, points: list[RecipeSummary]) -> RecipeSummary:
    from megadoc_megatron.evaluate.grids import AXES, Point, local_optimum

    # the grid is what was trained: each axis's values over the points given
    axes = {a: sorted({s.first.grid["point"][a] for s in points}, key=lambda v: (v is None, v)) for a in AXES}

    def point(summary) -> Point:
        values = tuple(summary.first.grid["point"][a] for a in AXES)
        return Point(tuple(axes[a].index(v) for a, v in zip(AXES, values)), values)

    verdict = local_optimum(axes, {point(s): s.iid.mean for s in points if s.iid is not None})
    if verdict.best is None:  # nothing evaluated yet: the first point, without losses
        return replace(points[0], name=recipe)
    best = next(s for s in points if point(s) == verdict.best)
    return replace(best, name=recipe, tuning=Tuning(axes, points, verdict, best.name))


def equal_compute_real(summary: RecipeSummary, points: list[RecipeSummary]) -> RecipeSummary | None:
    """Real-only runs on the same real data that trained as many steps (within 3%), any grid point."""
    steps = summary.first.iterations
    found = [p for p in points if p.first.recipe == "real" and p.iid is not None and steps
             and p.first.real_tokens == summary.first.real_tokens and p.first.iterations
             and abs(p.first.iterations - steps) <= 0.03 * steps]
    return min(found, key=lambda p: abs(p.first.iterations - steps), default=None)


def same_data_real(summary: RecipeSummary, summaries: list[RecipeSummary]) -> RecipeSummary | None:
    """The real-only recipe trained on the real data `summary` used (the first, if several)."""
    return next((s for s in summaries if s.first.recipe == "real" and s.iid is not None
                 and s.first.real_tokens == summary.first.real_tokens), None)


# The papers' figures the claims are read against (METHOD.md; 300M models, i.i.d. loss).
PUBLISHED = {
    "synthetic": "300M: real-only 3.554; simple G=2 3.462, stitched G=2 3.456; data efficiency at G=32 1.48x "
                 "(simple) and 1.80x (megadocs)",
    "stitch_vs_simple": "stitched below simple by 0.006 at G=2, 0.010 at G=4, 0.012 at G=8, 0.019 at G=16 "
                        "and 0.026 at G=32",
    "long_context": "the gain of megadocs over simple rephrasing is largest on long-context loss",
}


def _verdict(supported: int, contradicted: int, unresolved: int) -> str:
    if supported and not contradicted and not unresolved:
        return "supports"
    if contradicted and not supported and not unresolved:
        return "contradicts"
    if supported or contradicted:
        return "partly supports" if supported >= contradicted else "partly contradicts"
    return "cannot resolve at this scale"


def _compute_caveat(synthetic: list[RecipeSummary], summaries: list[RecipeSummary]) -> str:
    """What the comparison leaves open: recipes with no real-only run of as many steps, an untuned real-only."""
    caveats = []
    unmatched = [s for s in synthetic if s.equal_compute is None]
    if unmatched:
        caveats.append(f"No real-only run on the same real data trained as many steps as "
                       f"{', '.join(s.name for s in unmatched)}, so part of their gain may be compute (give the real "
                       "recipe's epochs a grid that includes their steps).")
    untuned = sorted({r.name for s in synthetic for r in [same_data_real(s, summaries)] if r and not r.tuning})
    if untuned:
        caveats.append(f"Real-only ({', '.join(untuned)}) was trained at one E, not tuned (the papers tune E for "
                       "every recipe: give its epochs a list).")
    return " ".join(caveats) + (" " if caveats else "")


def _versus_equal_compute(summary: RecipeSummary) -> str:
    """'simple_g2 (134 steps) lower than real-only of as many steps (real-E32) by 0.1 (± 0.01)'."""
    who = f"{summary.name} ({summary.first.iterations} steps)"
    return summary.versus_equal_compute.words(
        f"{who} lower than real-only of as many steps ({summary.equal_compute.name})",
        f"{who} higher than real-only of as many steps ({summary.equal_compute.name})",
        f"{who} and real-only of as many steps ({summary.equal_compute.name}) agree")


def _says(verdict: str) -> str:
    return "cannot resolve the claim at this scale" if verdict.startswith("cannot") else f"{verdict} the claim"


def _count_verdict(differences: list[Difference]) -> str:
    """supports when every difference is resolved and negative (the claim's direction)."""
    return _verdict(sum(d.resolved and d.value < 0 for d in differences),
                    sum(d.resolved and d.value > 0 for d in differences),
                    sum(not d.resolved for d in differences))


def _efficiency_words(summary: RecipeSummary) -> str:
    """', data efficiency 1.23x (p05–p95 1.10x–1.40x)', or beyond the baseline's reach with the gap."""
    if summary.efficiency is None:
        return ""
    low_high = summary.efficiency_range
    if math.isinf(summary.efficiency):
        bound = (f"; the bootstrap supports at least {_times(low_high[0])}" if low_high and not math.isinf(low_high[0])
                 else "")
        return (f", beyond the baseline's reach ({summary.asymptote_gap:.4f} below its asymptote C, "
                f"so no amount of real data gives that loss on this fit{bound})")
    spread = f" (p05–p95 {_times(low_high[0])}–{_times(low_high[1])})" if low_high else ""
    return f", data efficiency {_times(summary.efficiency)}{spread}"


def _times(value: float) -> str:
    """1.23x; 3 significant digits from 100x on; 'beyond reach' for inf."""
    if math.isinf(value):
        return "beyond reach"
    return f"{value:.2f}x" if value < 100 else f"{value:.3g}x"


def claims(summaries: list[RecipeSummary]) -> list[dict]:
    """The three claims of the megadocs paper, each with a verdict and the sentence that gives it."""
    found = []
    synthetic = [s for s in summaries if s.first.recipe != "real" and s.versus_real is not None]
    if synthetic:
        # compute held equal where a real-only run of as many steps exists: the data effect alone
        verdict = _count_verdict([s.versus_equal_compute or s.versus_real for s in synthetic])
        same_steps = "; ".join(_versus_equal_compute(s) for s in synthetic if s.versus_equal_compute is not None)
        details = "; ".join(s.versus_real.words(f"{s.name} lower", f"{s.name} higher", f"{s.name} and real-only agree")
                            + _efficiency_words(s) for s in synthetic)
        found.append({"claim": "synthetic data beats real-only training on the same real data", "verdict": verdict,
                      "text": "Synthetic data vs. real-only on the same real data (i.i.d. loss): this run "
                              f"{_says(verdict)}. "
                              + (f"At the same number of training steps (compute held equal): {same_steps}. "
                                 if same_steps else "")
                              + "Against the real-only recipe (data efficiency D(L) / D(L_real), the paper's "
                              f"definition: L_real is real-only's loss on the same real data): {details}. "
                              f"{_compute_caveat(synthetic, summaries)}Published: {PUBLISHED['synthetic']}."})
    pairs = _stitch_simple_pairs(summaries)
    if pairs:
        gaps = {g: Difference.of(stitch.iid, simple.iid) for g, (stitch, simple) in pairs.items()}
        verdict = _count_verdict(list(gaps.values()))
        text = "; ".join(f"G={g}: {d.words('stitched lower', 'stitched higher', 'stitched and simple agree')}"
                         for g, d in gaps.items())
        trend = _trend(gaps)
        parts = [verdict, trend[0] if trend else "cannot resolve at this scale"]
        verdict = _verdict(parts.count("supports"), parts.count("contradicts"),
                           sum(p not in ("supports", "contradicts") for p in parts))
        found.append({"claim": "stitched megadocs beat simple rephrases, more so as G grows", "verdict": verdict,
                      "text": f"Stitched vs. simple rephrases at the same G (i.i.d. loss): this run "
                              f"{_says(verdict)}: {text}. "
                              + (trend[1] if trend else f"Only G={next(iter(gaps))} has both, so this run cannot "
                                 "say whether the gap grows with G. ")
                              + f"Published: {PUBLISHED['stitch_vs_simple']}."})
    long_pairs = _megadoc_simple_pairs(summaries)
    differences = {f"{m.name} vs. {s.name}": Difference.of(m.long_minus_iid, s.long_minus_iid) for m, s in long_pairs}
    differences = {k: d for k, d in differences.items() if d is not None}
    if differences:
        verdict = _count_verdict(list(differences.values()))
        text = "; ".join(f"{k}: " + d.words("the gain on long-context loss is larger than on i.i.d. loss",
                                             "the gain on long-context loss is smaller than on i.i.d. loss",
                                             "the gains on long-context and on i.i.d. loss agree")
                         for k, d in differences.items())
        found.append({"claim": "megadocs' gains over simple rephrases are largest on long-context loss",
                      "verdict": verdict,
                      "text": f"Megadocs' gains on long documents (the loss beyond the offset on long held-out "
                              f"documents minus the i.i.d. loss, per run): this run {_says(verdict)}: {text}. "
                              f"Published: {PUBLISHED['long_context']}."})
    return found


def _stitch_simple_pairs(summaries) -> dict:
    """G -> (stitched, simple) recipes trained at that G on the same real data (first of each)."""
    pairs = {}
    for stitch in (s for s in summaries if s.first.recipe == "stitch" and s.iid is not None):
        simple = next((s for s in summaries if s.first.recipe == "simple" and s.iid is not None
                       and s.first.generations == stitch.first.generations
                       and s.first.real_tokens == stitch.first.real_tokens), None)
        if simple is not None:
            pairs.setdefault(stitch.first.generations, (stitch, simple))
    return dict(sorted(pairs.items()))


def _megadoc_simple_pairs(summaries) -> list[tuple]:
    """(megadoc recipe, simple recipe) pairs at the same G on the same real data."""
    return [(m, s) for m in summaries if m.first.recipe in ("stitch", "stretch")
            for s in summaries if s.first.recipe == "simple" and s.first.generations == m.first.generations
            and s.first.real_tokens == m.first.real_tokens]


def _trend(gaps: dict) -> tuple[str, str] | None:
    """Whether stitching's lead at the largest G exceeds the lead at the smallest, beyond two standard errors."""
    if len(gaps) < 2:
        return None
    (small, first), (large, last) = list(gaps.items())[0], list(gaps.items())[-1]
    growth = Difference(last.value - first.value, None if first.two_errors is None or last.two_errors is None
                        else math.hypot(first.two_errors, last.two_errors))
    verdict = _count_verdict([growth])
    return verdict, (f"From G={small} to G={large} the difference changes by {growth.value:+.4f}"
                     + ("" if growth.two_errors is None else f" (± {growth.two_errors:.4f})") + ": "
                     + {"supports": "the lead grows. ", "contradicts": "the lead shrinks. "}.get(
                         verdict, "not resolved by these seeds. "))
