"""Sample size of a two-arm trial: knees per arm for a given power (``cartiq power``).

Two-sided two-sample t test with equal group sizes and a common SD: the power of ``n`` knees
per arm comes from the noncentral t distribution (``scipy.stats.nct``), and the smallest
``n`` reaching the wanted power is found by search.  The published effects the demo trial
plants (:mod:`cartiq.demo`) are in :data:`PUBLISHED_EFFECTS`.

Usage::

    knees_per_arm(effect=0.09, sd=0.12)                  # 80% power, alpha 0.05 -> 30
    power_rows([("thickness", 0.09, 0.12, "mm")], powers=(0.8, 0.9))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from cartiq.errors import InputError

__all__ = ["PublishedEffect", "PUBLISHED_EFFECTS", "knees_per_arm", "power_of", "power_rows",
           "check_outcome", "MAX_KNEES"]

MAX_KNEES = 100_000


@dataclass(frozen=True)
class PublishedEffect:
    """An effect from the MSC literature, as a difference between arms at 12 months."""

    value: float
    unit: str  # "%" = relative to the baseline value
    source: str


PUBLISHED_EFFECTS: dict[str, PublishedEffect] = {
    "thickness": PublishedEffect(0.09, "mm", "placebo loses up to 0.17-0.18 mm of femorotibial "
                                 "cartilage in two years (progressor cohorts): half of it a year"),
    "denuded_area": PublishedEffect(5.9, "%", "full-thickness defect size -5.9% (five years)"),
    "bml_area": PublishedEffect(33.2, "mm2", "BML area 123.5 -> 90.3 mm2 a year after MSC"),
    "bml_volume": PublishedEffect(26.9, "%", "BML area -26.9% (123.5 -> 90.3 mm2), taken for "
                                  "the volume"),
    "mocart_total": PublishedEffect(9.2, "points", "MOCART 52.9 -> 62.1 a year after MSC (early, "
                                    "KL II); 46.5 -> 57.1 (+10.6) in late knees"),
}


def check_outcome(name: str) -> PublishedEffect:
    """The published effect of ``name``; one clear error for an unknown name."""
    if name not in PUBLISHED_EFFECTS:
        raise InputError(f"unknown outcome {name!r}; choose one of "
                         f"{', '.join(PUBLISHED_EFFECTS)}")
    return PUBLISHED_EFFECTS[name]


def _check(effect: float, sd: float, alpha: float, power: float) -> None:
    if not (math.isfinite(sd) and sd > 0):
        raise InputError(f"SD must be a positive number, got {sd:g}")
    if not (math.isfinite(effect) and effect != 0):
        raise InputError(f"effect must be a non-zero number, got {effect:g}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be between 0 and 1, got {alpha:g}")
    if not 0 < power < 1:
        raise InputError(f"power must be between 0 and 1, got {power:g}")


def power_of(n: int, effect: float, sd: float, alpha: float = 0.05) -> float:
    """Power of a two-sided two-sample t test with ``n`` knees per arm."""
    from scipy import stats

    df = 2 * n - 2
    nc = abs(effect) / sd * math.sqrt(n / 2.0)
    t = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(t, df, nc) + stats.nct.cdf(-t, df, nc))


def knees_per_arm(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Smallest knees per arm whose power reaches ``power`` (two-sided, equal arms)."""
    _check(effect, sd, alpha, power)
    lo, hi = 2, 4
    while power_of(hi, effect, sd, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_KNEES:
            raise InputError(f"more than {MAX_KNEES} knees per arm needed (effect {effect:g}, "
                             f"SD {sd:g})")
    while lo < hi:  # power rises with n
        mid = (lo + hi) // 2
        if power_of(mid, effect, sd, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def power_rows(items: Iterable[tuple[str, float, float, str]], alpha: float = 0.05,
               powers: tuple[float, ...] = (0.8, 0.9)) -> list[dict[str, object]]:
    """One row per (outcome, effect, sd, unit): standardized effect and knees per arm."""
    rows = []
    for name, effect, sd, unit in items:
        row: dict[str, object] = {"outcome": name, "unit": unit, "effect": effect, "sd": sd,
                                  "effect_size_d": abs(effect) / sd if sd > 0 else math.nan,
                                  "alpha": alpha}
        for p in powers:
            row[f"knees_per_arm_{round(p * 100)}pct_power"] = knees_per_arm(effect, sd, alpha, p)
        rows.append(row)
    return rows
