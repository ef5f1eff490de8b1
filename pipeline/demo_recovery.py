"""What a simulated trial's cohort tables recovered, against what :mod:`cartiq.demo` planted.

Reads ``OUT/truth.csv`` (planted per knee) and the batch's ``change.csv``, ``mocart.csv`` and
``measurements.csv`` (recovered per knee: follow-up minus baseline), and writes

``planted_vs_recovered.csv``  per outcome x arm x stage group: n, planted mean change,
    recovered mean change, its SD and SRM, the error and its tolerance; and per outcome x
    stage group a row ``arm = MSC - placebo``: the planted and recovered differences between
    the arms' mean changes and the recovered difference's 95% CI (Welch t, ``scipy.stats``;
    a single point when neither arm's changes spread, as with categorical MOCART points)
``sample_size.csv``  per outcome x stage group: knees per arm for 80% and 90% power
    (two-sided alpha 0.05) to detect the published effect, with the SD of change the trial
    recovered (between knees, pooled over the arms) and cartiq's precision on it (SD of the
    per-knee error recovered - planted)
``planted_vs_recovered.png``  the figure of ``cohort.html``'s simulated-trial section

Tolerance of a mean change: 10% of the planted mean, or the outcome's absolute tolerance
(:data:`ABS_TOLERANCE`) when that is larger.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cartiq.power import PUBLISHED_EFFECTS, knees_per_arm

__all__ = ["recovered_per_knee", "recovery_table", "sample_size_table", "write_recovery",
           "ABS_TOLERANCE", "TABLE_COLUMNS"]

log = logging.getLogger(__name__)

ABS_TOLERANCE = {"mm": 0.05, "mm2": 5.0, "mm3": 25.0, "points": 2.0}
REL_TOLERANCE = 0.10
DIFF_ARM = "MSC - placebo"
TABLE_COLUMNS = ["outcome", "structure", "unit", "arm", "stage_group", "n",
                 "planted_mean_change", "recovered_mean_change", "recovered_sd_change", "srm",
                 "error", "tolerance", "within_tolerance", "sign_ok", "ci95_low", "ci95_high",
                 "ci_covers_planted"]


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame()


def recovered_per_knee(batch_out: Path) -> pd.DataFrame:
    """subject_id, outcome, structure, recovered_change (follow-up minus baseline)."""
    rows = []
    change = _read(batch_out / "change.csv")
    if len(change):
        c = change.copy()
        c["change"] = pd.to_numeric(c["change"], errors="coerce")
        for outcome, structure, region, metric in (
                ("thickness", "femoral_cartilage", "all", "thickness_mean"),
                ("thickness", "medial_tibial_cartilage", "all", "thickness_mean"),
                ("thickness", "lateral_tibial_cartilage", "all", "thickness_mean"),
                ("denuded_area", "femoral_cartilage", "all", "denuded_area"),
                ("bml_volume", "bone_marrow_lesion", "all", "volume"),
                ("bml_area", "bone_marrow_lesion", "femur", "max_slice_area")):
            sel = c[(c["structure"] == structure) & (c["region"].astype(str) == region)
                    & (c["metric"] == metric)]
            label = "femur" if outcome == "bml_area" else structure
            rows += [{"subject_id": r.subject_id, "outcome": outcome, "structure": label,
                      "recovered_change": r.change} for r in sel.itertuples()]
    mocart = _read(batch_out / "mocart.csv")
    if len(mocart):
        tot = mocart[mocart["item"].astype(str) == "total"].copy()
        tot["points"] = pd.to_numeric(tot["points"], errors="coerce")
        per = tot.groupby(["subject_id", "timepoint"])["points"].mean().unstack()
        if {"baseline", "m12"} <= set(per.columns):
            for sid, v in (per["m12"] - per["baseline"]).items():
                rows.append({"subject_id": sid, "outcome": "mocart_total",
                             "structure": "repair_sites", "recovered_change": v})
    return pd.DataFrame(rows, columns=["subject_id", "outcome", "structure", "recovered_change"])


def _tolerance(planted_mean: float, unit: str) -> float:
    return max(REL_TOLERANCE * abs(planted_mean), ABS_TOLERANCE.get(unit, 0.0))


def recovery_table(truth: pd.DataFrame, recovered: pd.DataFrame) -> pd.DataFrame:
    """Planted vs recovered mean change per outcome x arm x stage group (+ arm differences)."""
    from scipy import stats

    knees = truth.merge(recovered, on=["subject_id", "outcome", "structure"], how="left")
    rows = []
    keys = ["outcome", "structure", "unit"]
    order = {(o, s): i for i, (o, s) in enumerate(truth[["outcome", "structure"]]
                                                  .drop_duplicates().itertuples(index=False))}
    for (outcome, structure, unit), g in sorted(knees.groupby(keys, sort=False),
                                                key=lambda kv: order[kv[0][:2]]):
        for group in ("early", "late"):
            arms = {}
            for arm in ("MSC", "placebo"):
                k = g[(g["arm"] == arm) & (g["stage_group"] == group)]
                x = k["recovered_change"].astype(float).dropna().to_numpy()
                planted = float(k["planted_change"].mean())
                mean = float(x.mean()) if len(x) else math.nan
                sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
                tol = _tolerance(planted, unit)
                arms[arm] = (x, planted)
                rows.append({"outcome": outcome, "structure": structure, "unit": unit,
                             "arm": arm, "stage_group": group, "n": len(x),
                             "planted_mean_change": planted, "recovered_mean_change": mean,
                             "recovered_sd_change": sd,
                             "srm": mean / sd if len(x) > 1 and sd > 0 else math.nan,
                             "error": mean - planted, "tolerance": tol,
                             "within_tolerance": bool(abs(mean - planted) <= tol),
                             "sign_ok": (bool(np.sign(mean) == np.sign(planted))
                                         if abs(planted) > tol else None)})
            (xm, pm), (xp, pp) = arms["MSC"], arms["placebo"]
            diff, planted_diff = float(xm.mean() - xp.mean()), pm - pp
            lo = hi = math.nan
            if len(xm) > 1 and len(xp) > 1 and (np.ptp(xm) > 0 or np.ptp(xp) > 0):
                ci = stats.ttest_ind(xm, xp, equal_var=False).confidence_interval(0.95)
                lo, hi = float(ci.low), float(ci.high)
            elif len(xm) > 1 and len(xp) > 1:  # no spread in either arm: the interval is a point
                lo = hi = diff
            tol = _tolerance(planted_diff, unit)
            rows.append({"outcome": outcome, "structure": structure, "unit": unit,
                         "arm": DIFF_ARM, "stage_group": group, "n": len(xm) + len(xp),
                         "planted_mean_change": planted_diff, "recovered_mean_change": diff,
                         "error": diff - planted_diff, "tolerance": tol,
                         "within_tolerance": bool(abs(diff - planted_diff) <= tol),
                         "sign_ok": (bool(np.sign(diff) == np.sign(planted_diff))
                                     if abs(planted_diff) > tol else None),
                         "ci95_low": lo, "ci95_high": hi,
                         "ci_covers_planted": (bool(lo - 1e-9 <= planted_diff <= hi + 1e-9)
                                               if math.isfinite(lo) else None)})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _published(outcome: str, structure: str, group: str, baseline_mean: float) -> float:
    e = PUBLISHED_EFFECTS[outcome]
    if outcome == "mocart_total" and group == "late":
        return 10.6
    return e.value / 100.0 * baseline_mean if e.unit == "%" else e.value


def sample_size_table(truth: pd.DataFrame, recovered: pd.DataFrame) -> pd.DataFrame:
    """Knees per arm for the published effects, from the recovered SD and precision."""
    knees = truth.merge(recovered, on=["subject_id", "outcome", "structure"], how="left")
    knees["error"] = knees["recovered_change"] - knees["planted_change"]
    rows = []
    for (outcome, structure, unit, group), g in knees.groupby(
            ["outcome", "structure", "unit", "stage_group"], sort=False):
        arms = [a["recovered_change"].dropna().to_numpy(float) for _, a in g.groupby("arm")]
        dof = sum(len(a) - 1 for a in arms)
        sd = math.sqrt(sum(((a - a.mean()) ** 2).sum() for a in arms) / dof) if dof > 0 else math.nan
        effect = _published(outcome, structure, group, float(g["planted_baseline"].mean()))
        row = {"outcome": outcome, "structure": structure, "unit": unit, "stage_group": group,
               "published_effect": effect, "effect_source": PUBLISHED_EFFECTS[outcome].source,
               "sd_change_between_knees": sd,
               "cartiq_precision_sd": float(g["error"].std(ddof=1)),
               "effect_size_d": abs(effect) / sd if sd > 0 else math.nan}
        for p in (0.8, 0.9):
            row[f"knees_per_arm_{round(p * 100)}pct_power"] = (
                knees_per_arm(effect, sd, 0.05, p) if sd > 0 and effect else math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def write_recovery(out: Path, batch_out: Path) -> Path:
    """Write ``planted_vs_recovered.csv``, ``sample_size.csv`` and the figure into ``out``."""
    from cartiq.io.volume import atomic_path
    from cartiq.report.trial_demo import recovery_figure

    truth = pd.read_csv(out / "truth.csv")
    recovered = recovered_per_knee(batch_out)
    recovered.merge(truth, on=["subject_id", "outcome", "structure"]).to_csv(
        out / "knees_planted_vs_recovered.csv", index=False, float_format="%.6g")
    table = recovery_table(truth, recovered)
    sizes = sample_size_table(truth, recovered)
    for name, df in (("planted_vs_recovered", table), ("sample_size", sizes)):
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    try:
        fig = recovery_figure(table)
        with atomic_path(out / "planted_vs_recovered.png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    except Exception as exc:  # a figure must never cost the numbers
        log.warning("no planted_vs_recovered.png: %s", exc)
    bad = table[~table["within_tolerance"].astype(bool)]
    for r in bad.itertuples():
        log.warning("%s %s, %s %s: recovered %.4g vs planted %.4g %s (tolerance %.3g)",
                    r.outcome, r.structure, r.arm, r.stage_group, r.recovered_mean_change,
                    r.planted_mean_change, r.unit, r.tolerance)
    log.info("planted vs recovered: %d of %d means within tolerance -> %s",
             len(table) - len(bad), len(table), out / "planted_vs_recovered.csv")
    return out / "planted_vs_recovered.csv"
