"""Scaling fits `L(x) = A / x^B + C` with A, B, C >= 0, and the data efficiency they imply.

x is unique real tokens, parameters or ensemble members; C is the asymptote, the loss as x goes to
infinity. x is fitted in units of its first point, which keeps A of order one whatever the scale.
Uncertainty: a bootstrap over the points (resampled with replacement, refitted), reported as the
standard deviation and the 5th-95th percentiles of each parameter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from megadoc_megatron.errors import InputError

MIN_POINTS = 4  # more points than the three parameters, or the fit says nothing


@dataclass(frozen=True)
class PowerLaw:
    A: float
    B: float
    C: float
    x_unit: float          # x is divided by this before the power (the first point's x)
    points: int
    rmse: float
    bootstrap: dict | None = None  # parameter -> {"std", "p05", "p95"}

    def loss(self, x) -> np.ndarray:
        return self.A / (np.asarray(x, dtype=float) / self.x_unit) ** self.B + self.C

    def inverse(self, loss: float) -> float:
        """The x at which the law reaches `loss`; inf at or below the asymptote."""
        if loss <= self.C:
            return math.inf
        return self.x_unit * (self.A / (loss - self.C)) ** (1.0 / self.B)

    def as_dict(self) -> dict:
        return asdict(self)


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import curve_fit

    def law(x, A, B, C):
        return A / x ** B + C

    start = [max(y[0] - y[-1], 1e-3), 0.3, max(y[-1] * 0.8, 0.0)]
    parameters, _ = curve_fit(law, x, y, p0=start, bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, np.inf]), maxfev=20000)
    return parameters


def fit_power_law(x, y, what: str = "points", bootstrap: int = 1000, seed: int = 0) -> PowerLaw:
    """Fit L(x) = A / x^B + C; refuses too few points and curves that do not go down."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if len(np.unique(x)) < MIN_POINTS:
        raise InputError(f"a scaling fit over {what} needs at least {MIN_POINTS} distinct x values, "
                         f"got {len(np.unique(x))}",
                         fix=f"train at more {what} values")
    if np.any(x <= 0) or not np.all(np.isfinite(y)):
        raise InputError(f"scaling-fit {what} must have positive x and finite losses", fix="drop the bad points")
    if y[-1] >= y[0]:
        raise InputError(f"loss does not decrease over {what} ({y[0]:.4f} at {x[0]:g}, {y[-1]:.4f} at {x[-1]:g})",
                         fix="check the runs; a power law with a floor only fits a decreasing curve")
    unit = x[0]
    A, B, C = _least_squares(x / unit, y)
    rmse = float(np.sqrt(np.mean((A / (x / unit) ** B + C - y) ** 2)))
    spread = _bootstrap(x / unit, y, bootstrap, seed) if bootstrap else None
    return PowerLaw(float(A), float(B), float(C), float(unit), len(x), rmse, spread)


def _refits(x: np.ndarray, y: np.ndarray, rounds: int, seed: int, within_x: bool = False) -> np.ndarray | None:
    """[n, 3] fits of A, B, C to resamples of the points: of all of them (a resample needs 3 distinct x),
    or, `within_x`, of the points at each x (the seeds of each amount). None when fewer than 10 converge."""
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(x == value) for value in np.unique(x)]
    found = []
    for _ in range(rounds):
        if within_x:
            pick = np.concatenate([rng.choice(points, len(points)) for points in strata])
        else:
            pick = rng.integers(0, len(x), len(x))
            if len(np.unique(x[pick])) < 3:
                continue
        try:
            found.append(_least_squares(x[pick], y[pick]))
        except RuntimeError:  # no convergence on this resample
            continue
    return np.array(found) if len(found) >= 10 else None


def _bootstrap(x: np.ndarray, y: np.ndarray, rounds: int, seed: int) -> dict | None:
    values = _refits(x, y, rounds, seed)
    if values is None:
        return None
    return {name: {"std": float(values[:, i].std()), "p05": float(np.percentile(values[:, i], 5)),
                   "p95": float(np.percentile(values[:, i], 95))} for i, name in enumerate("ABC")}


def baseline_bootstrap(baseline: dict, rounds: int = 300, seed: int = 0) -> tuple[float, np.ndarray] | None:
    """(x unit, [n, 3] refits of A, B, C) over resamples of the baseline's runs: its seeds within each
    amount of data, or its points when each amount has one run. `baseline`: unique real tokens -> the
    losses of the real-only runs there. None when too few refits converge."""
    amounts = sorted(baseline)
    x = np.array([amount for amount in amounts for _ in baseline[amount]], dtype=float)
    y = np.array([loss for amount in amounts for loss in baseline[amount]], dtype=float)
    refits = _refits(x / x[0], y, rounds, seed, within_x=any(len(baseline[a]) > 1 for a in amounts))
    return None if refits is None else (float(x[0]), refits)


def efficiency_range(bootstrap: tuple[float, np.ndarray], losses: list[float], reference_losses: list[float],
                     seed: int = 0, same: bool = False) -> tuple[float, float] | None:
    """The 5th and 95th percentiles of a recipe's data efficiency D(L) / D(L_real) (the paper's definition):
    each baseline refit inverted at a resampled mean of the recipe's seeds' losses (L) and at one of the
    reference real-only recipe's seeds' losses (L_real; the same resample when `same`, the recipe being
    its own reference). inf where L is at or below the refit's asymptote; a refit whose asymptote lies at
    or above L_real measures nothing and is left out. None when fewer than 10 refits measure."""
    unit, fits = bootstrap
    rng = np.random.default_rng(seed)
    found = []
    for A, B, C in fits:
        loss = float(np.mean(rng.choice(losses, len(losses))))
        reference = loss if same else float(np.mean(rng.choice(reference_losses, len(reference_losses))))
        if B == 0 or reference <= C:
            continue
        found.append(math.inf if loss <= C else ((reference - C) / (loss - C)) ** (1.0 / B))
    if len(found) < 10:
        return None
    return float(np.percentile(found, 5, method="lower")), float(np.percentile(found, 95, method="higher"))


def data_efficiency(baseline: PowerLaw, loss: float, real_tokens: float | None = None,
                    reference_loss: float | None = None) -> dict:
    """The data efficiency of a recipe at `loss`. With `reference_loss` (L_real, the real-only recipe's loss
    on the same real data), the paper's definition: D(L) / D(L_real), D inverting the baseline, so real-only
    is 1.00x. With `real_tokens`, the tokens-based form: D(L) / the real tokens the recipe used."""
    if (real_tokens is None) == (reference_loss is None):
        raise InputError("data efficiency needs exactly one of reference_loss and real_tokens",
                         fix="pass --reference-loss L_real (the paper's definition) or --real-tokens")
    if reference_loss is not None and reference_loss <= baseline.C:
        raise InputError(f"the reference loss {reference_loss} is at or below the baseline's asymptote "
                         f"{baseline.C:.4f}: the fit never reaches it, so D(L_real) is undefined",
                         fix="check the reference loss, or add baseline points that bring the fit below it")
    needed = baseline.inverse(loss)
    used = real_tokens if real_tokens is not None else baseline.inverse(reference_loss)
    result = {"definition": "D(L) / D(L_real)" if reference_loss is not None else "D(L) / real tokens used",
              "loss": loss, "tokens_needed": needed, "tokens_used": used, "efficiency": needed / used}
    if reference_loss is not None:
        result["reference_loss"] = reference_loss
    if math.isinf(needed):
        result["note"] = (f"beyond the baseline's reach: loss {loss} is {baseline.C - loss:.4f} below (or at) the "
                          f"baseline's asymptote C = {baseline.C:.4f}; no finite amount of real data reaches it")
    return result
