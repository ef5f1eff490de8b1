"""Trial vocabulary shared by the batch and the reports: OA stage groups and visit order."""

from __future__ import annotations

import re

__all__ = ["stage_group", "is_baseline_name", "timepoint_sort_key"]

_BASELINE_WORDS = {"baseline", "bl", "base", "screening", "pre", "preop"}


def stage_group(kl: int | None) -> str:
    """``early`` (KL I-II), ``late`` (KL III-IV) or ``unknown`` (KL 0 or not given)."""
    if kl in (1, 2):
        return "early"
    if kl in (3, 4):
        return "late"
    return "unknown"


def is_baseline_name(timepoint: str) -> bool:
    """``baseline``, ``bl``, ``screening``... or a name numbered 0 (``m0``, ``0m``, ``week0``)."""
    t = timepoint.strip().lower()
    if t in _BASELINE_WORDS:
        return True
    return re.fullmatch(r"[a-z_.-]*0+[a-z_.-]*", t) is not None


def timepoint_sort_key(timepoint: str) -> tuple[int, float, str]:
    """Natural visit order: baseline first, then by the number in the name, then by name."""
    t = timepoint.strip().lower()
    if is_baseline_name(t):
        return (0, 0.0, t)
    m = re.search(r"\d+(?:\.\d+)?", t)
    if m:
        return (1, float(m.group()), t)
    return (2, 0.0, t)
