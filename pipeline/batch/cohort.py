"""Cohort tables of a batch: every scan, change and score in long format, and a summary.

Written to the batch's ``OUT`` (CSV, each with a Parquet copy):

``measurements.csv``  subject_id,timepoint + the measurement contract
                      (structure,region,metric,value,unit) of every finished scan
``change.csv``        subject_id,baseline,timepoint + the longitudinal contract
                      (structure,region,metric,baseline,followup,change,unit,exceeds_sdc)
``mocart.csv``        subject_id,timepoint + the scoring contract (site_id,item,...,points)
``failures.csv``      subject_id,timepoint,stage,error
``qc_excluded.csv``   subject_id,timepoint,qc_status,reasons: finished scans whose QC status
                      is ``fail`` (a broken segmentation), left out of every other table
                      and of the comparisons' change rows unless ``include_qc_fail``
``cohort_summary.csv`` per arm x stage group (early = KL I-II, late = KL III-IV, unknown;
                      plus ``all``) x follow-up timepoint x measure: n, mean and SD of the
                      change, standardized response mean (mean / SD), and the number and %
                      of knees whose change exceeds the smallest detectable change (SDC)

Summary measures: ``thickness_mean`` per plate, ``denuded_area`` per plate and summed
over the plates (``all_plates``, no SDC), BML
``volume`` (all bones) - from ``change.csv`` with its ``exceeds_sdc`` flags - and the
MOCART total (mean over a scan's sites, follow-up minus baseline, from ``mocart.csv``; no
SDC is published for it, so its exceedance columns are empty).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cartiq.io.labels import PLATES
from cartiq.batch.manifest import Manifest, timepoint_sort_key

__all__ = ["write_cohort_tables", "summarize_change", "failure_rows", "write_reports",
           "FAILURE_COLUMNS", "SUMMARY_COLUMNS"]

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["subject_id", "timepoint", "stage", "error"]
QC_EXCLUDED_COLUMNS = ["subject_id", "timepoint", "qc_status", "reasons"]
MEASUREMENT_COLUMNS = ["structure", "region", "metric", "value", "unit", "qc_status"]
CHANGE_COLUMNS = ["structure", "region", "metric", "baseline", "followup", "change", "unit",
                  "exceeds_sdc"]
SUMMARY_COLUMNS = ["arm", "stage_group", "timepoint", "measure", "structure", "region",
                   "metric", "unit", "n", "mean_change", "sd_change", "srm",
                   "n_exceeding_sdc", "pct_exceeding_sdc"]
GROUP_ORDER = {"early": 0, "late": 1, "unknown": 2, "all": 3}


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, keep_default_na=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        log.warning("cannot read %s (%s); left out of the cohort tables", path, exc)
        return None


def _finished(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def _qc_fail(folder: Path) -> dict[str, str] | None:
    """The scan's QC status and error reasons when it is ``fail`` (else None)."""
    import json

    try:
        qc = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("qc") or {}
    except (OSError, ValueError):
        return None
    if qc.get("status") != "fail":
        return None
    reasons = [f.get("message", "") for f in qc.get("flags") or [] if f.get("severity") == "error"]
    return {"qc_status": "fail", "reasons": "; ".join(reasons)}


def _write(out: Path, name: str, df: pd.DataFrame) -> None:
    from cartiq.io.volume import atomic_path

    with atomic_path(out / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
    try:
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    except (ImportError, ValueError, TypeError) as exc:
        log.warning("no Parquet copy of %s (%s)", name, exc)


def _gather(frames: Iterable[tuple[dict[str, Any], Path]], columns: list[str]) -> pd.DataFrame:
    parts = []
    keys: list[str] = []
    for ids, path in frames:
        keys = list(ids)
        df = _read_csv(path)
        if df is None:
            continue
        for k, v in reversed(ids.items()):
            df.insert(0, k, v)
        parts.append(df)
    if not parts:
        return pd.DataFrame(columns=keys + columns)
    return pd.concat(parts, ignore_index=True)


def _truthy(series: pd.Series) -> pd.Series:
    """exceeds_sdc read as True/False/NaN whatever the writer's spelling."""
    def one(v: Any) -> float:
        if isinstance(v, (bool, np.bool_)):
            return float(v)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.nan
        s = str(v).strip().lower()
        if s in ("true", "1", "1.0", "yes"):
            return 1.0
        if s in ("false", "0", "0.0", "no"):
            return 0.0
        return math.nan
    return series.map(one)


def _summary_inputs(change: pd.DataFrame, mocart: pd.DataFrame,
                    pairs: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per (subject, follow-up, measure): change and exceeds-SDC flag."""
    rows = []
    if len(change):
        c = change.copy()
        c["exceeds"] = _truthy(c["exceeds_sdc"]) if "exceeds_sdc" in c else math.nan
        plate_metric = c["metric"].isin(["thickness_mean", "denuded_area"])
        wanted = ((c["structure"].isin(PLATES) & plate_metric)
                  | ((c["structure"] == "bone_marrow_lesion") & (c["metric"] == "volume")))
        c = c[wanted & (c["region"].astype(str) == "all")]
        for r in c.itertuples(index=False):
            measure = ("thickness" if r.metric == "thickness_mean" else
                       "denuded_area" if r.metric == "denuded_area" else "bml_volume")
            rows.append({"subject_id": r.subject_id, "timepoint": r.timepoint,
                         "measure": measure, "structure": r.structure, "region": "all",
                         "metric": r.metric, "unit": r.unit,
                         "change": pd.to_numeric(r.change, errors="coerce"),
                         "exceeds": r.exceeds})
    den = [r for r in rows if r["measure"] == "denuded_area"]
    for (sid, tp), g in pd.DataFrame(den).groupby(["subject_id", "timepoint"]) if den else []:
        rows.append({"subject_id": sid, "timepoint": tp, "measure": "denuded_area",
                     "structure": "all_plates", "region": "all", "metric": "denuded_area",
                     "unit": g["unit"].iloc[0], "change": g["change"].sum(min_count=1),
                     "exceeds": math.nan})  # no SDC for the sum over plates
    if len(mocart) and {"item", "points"} <= set(mocart.columns):
        tot = mocart[mocart["item"].astype(str) == "total"].copy()
        tot["points"] = pd.to_numeric(tot["points"], errors="coerce")
        per_scan = tot.groupby(["subject_id", "timepoint"])["points"].mean()
        for sid, base, fu in pairs:
            if (sid, base) in per_scan.index and (sid, fu) in per_scan.index:
                rows.append({"subject_id": sid, "timepoint": fu, "measure": "mocart_total",
                             "structure": "repair_sites", "region": "all",
                             "metric": "mocart_total", "unit": "points",
                             "change": per_scan[(sid, fu)] - per_scan[(sid, base)],
                             "exceeds": math.nan})
    return pd.DataFrame(rows, columns=["subject_id", "timepoint", "measure", "structure",
                                       "region", "metric", "unit", "change", "exceeds"])


def summarize_change(values: pd.DataFrame, subjects: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Group per-subject changes by arm x stage group x timepoint x measure.

    ``values`` has columns subject_id, timepoint, measure, structure, region, metric, unit,
    change (follow-up minus baseline) and exceeds (1/0/NaN).  Rows with a NaN change are
    left out of n.  SD uses n-1; SRM = mean / SD (NaN when n < 2 or SD = 0).
    """
    if values.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    v = values.copy()
    v["arm"] = v["subject_id"].map(lambda s: subjects.get(s, {}).get("arm") or "unspecified")
    v["stage_group"] = v["subject_id"].map(
        lambda s: subjects.get(s, {}).get("stage_group", "unknown"))
    v = v[np.isfinite(v["change"].astype(float))]
    both = pd.concat([v, v.assign(stage_group="all"), v.assign(arm="all"),
                      v.assign(arm="all", stage_group="all")], ignore_index=True)
    keys = ["arm", "stage_group", "timepoint", "measure", "structure", "region", "metric", "unit"]
    out = []
    for key, g in both.groupby(keys, sort=False, dropna=False):
        x = g["change"].astype(float).to_numpy()
        n = len(x)
        mean = float(x.mean()) if n else math.nan
        sd = float(x.std(ddof=1)) if n > 1 else math.nan
        flags = g["exceeds"].astype(float).to_numpy()
        known = flags[np.isfinite(flags)]
        out.append({**dict(zip(keys, key)), "n": n, "mean_change": mean, "sd_change": sd,
                    "srm": mean / sd if n > 1 and sd > 0 else math.nan,
                    "n_exceeding_sdc": int(known.sum()) if len(known) else math.nan,
                    "pct_exceeding_sdc": 100.0 * known.mean() if len(known) else math.nan})
    df = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    df["_a"] = (df["arm"] == "all").astype(int)
    df["_g"] = df["stage_group"].map(lambda s: GROUP_ORDER.get(s, 9))
    df["_t"] = df["timepoint"].map(lambda t: timepoint_sort_key(str(t)))
    return (df.sort_values(["_a", "arm", "_g", "_t", "measure", "structure"], kind="stable")
              .drop(columns=["_a", "_g", "_t"]).reset_index(drop=True))


def write_reports(out: Path, subjects: Iterable[str]) -> list[str]:
    """Each subject's ``report.html`` and ``OUT/cohort.html`` (:mod:`cartiq.report.scan`).

    Reports never fail the batch: problems are returned as messages.
    """
    try:
        from cartiq.report.cohort import write_cohort_report
        from cartiq.report.scan import write_subject_report
    except ImportError:
        return ["cartiq.report.scan not available in this build; no HTML reports"]
    errors: list[str] = []
    jobs = [(write_subject_report, out / s) for s in subjects if (out / s).is_dir()]
    for fn, folder in jobs + [(write_cohort_report, out)]:
        try:
            errors += [f"{folder}: {e}" for e in fn(folder).errors]
        except Exception as exc:  # a figure must never cost the numbers
            errors.append(f"{folder}: {type(exc).__name__}: {exc}")
    return errors


def failure_rows(invalid: Iterable[Any], outcomes: Iterable[Any]) -> list[dict[str, str]]:
    """``failures.csv`` rows: skipped manifest rows, then failed scans and comparisons."""
    rows = [{"subject_id": b.subject_id, "timepoint": b.timepoint, "stage": "manifest",
             "error": str(b)} for b in invalid]
    return rows + [{"subject_id": o.subject_id, "timepoint": o.timepoint, "stage": o.stage,
                    "error": o.error} for o in outcomes if o.status == "failed"]


def write_cohort_tables(out: Path, manifest: Manifest, scans: list[Any], compares: list[Any],
                        failures: list[dict[str, str]], *,
                        include_qc_fail: bool = False) -> dict[str, Path]:
    """Gather finished per-scan and per-pair folders under ``out`` into the cohort tables.

    Scans whose QC status is ``fail`` are left out (and listed in ``qc_excluded.csv``)
    unless ``include_qc_fail``; so are the comparisons they are part of.
    """
    out = Path(out)
    failed = {(f["subject_id"], f["timepoint"]) for f in failures if f["stage"] != "compare"}
    scan_dirs = [(r, out / r.subject_id / r.timepoint) for r in manifest.rows
                 if r.key not in failed and _finished(out / r.subject_id / r.timepoint)]
    excluded = []
    for r, d in scan_dirs:
        if (bad := _qc_fail(d)) is not None:
            excluded.append({"subject_id": r.subject_id, "timepoint": r.timepoint, **bad})
    if excluded:
        log.warning("%d scan(s) failed QC and are %s the cohort tables: %s", len(excluded),
                    "kept in" if include_qc_fail else "left out of (--include-qc-fail keeps them)",
                    ", ".join(f"{e['subject_id']}/{e['timepoint']}" for e in excluded))
    if not include_qc_fail:
        drop = {(e["subject_id"], e["timepoint"]) for e in excluded}
        scan_dirs = [(r, d) for r, d in scan_dirs if r.key not in drop]
    meas = _gather((({"subject_id": r.subject_id, "timepoint": r.timepoint},
                     d / "measurements.csv") for r, d in scan_dirs
                    if (d / "measurements.csv").is_file()), MEASUREMENT_COLUMNS)
    mocart = _gather((({"subject_id": r.subject_id, "timepoint": r.timepoint},
                       d / "score" / "mocart.csv") for r, d in scan_dirs
                      if (d / "score" / "mocart.csv").is_file()), [])
    pairs = []
    change_src = []
    done_scans = {r.key for r, _ in scan_dirs}
    for b, f in manifest.pairs():
        if b.key not in done_scans or f.key not in done_scans:
            continue
        pairs.append((b.subject_id, b.timepoint, f.timepoint))
        cdir = out / b.subject_id / f"compare_{b.timepoint}_{f.timepoint}"
        if _finished(cdir) and (cdir / "change.csv").is_file():
            change_src.append(({"subject_id": b.subject_id, "baseline_timepoint": b.timepoint,
                                "timepoint": f.timepoint}, cdir / "change.csv"))
    change = _gather(change_src, CHANGE_COLUMNS)
    fail = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
    summary = summarize_change(_summary_inputs(change, mocart, pairs), manifest.subject_info())
    tables = {"measurements": meas, "change": change, "mocart": mocart, "failures": fail,
              "cohort_summary": summary,
              "qc_excluded": pd.DataFrame([] if include_qc_fail else excluded,
                                          columns=QC_EXCLUDED_COLUMNS)}
    for name, df in tables.items():
        _write(out, name, df)
    log.info("cohort tables: %d measurement rows from %d scans, %d change rows from %d "
             "pairs, %d MOCART rows, %d failures", len(meas), len(scan_dirs), len(change),
             len(change_src), len(mocart), len(fail))
    return {name: out / f"{name}.csv" for name in tables}
