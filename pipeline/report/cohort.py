"""Cohort report of a batch: ``OUT/cohort.html`` (self-contained, plots embedded).

Reads the cohort tables written by :mod:`cartiq.batch.cohort` (``change.csv``, ``mocart.csv``,
``cohort_summary.csv``, ``failures.csv``) and each scan's ``manifest.json`` (``batch.arm``,
``batch.kl_grade``).  Plots the change from baseline per knee (box + points, n under
each group) by treatment arm and by stage group (early = KL 0-II, late = KL III-IV) for:
mean cartilage thickness of each plate, denuded area (sum over plates), bone-marrow lesion
volume (all bones) and the MOCART total (mean over a scan's sites, follow-up minus
baseline; when no baseline visit was scored, the follow-up totals themselves).  With several follow-up
timepoints, groups are split per timepoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cartiq.io.volume import atomic_write_text
from cartiq.io.labels import PLATES
from cartiq.report.html import ReportResult, esc, guarded, html_page, html_table, png_data_uri

__all__ = ["cohort_report", "write_cohort_report", "change_per_knee", "grouped", "n_table", "PANELS"]

log = logging.getLogger(__name__)

PANELS = ([("thickness", p, f"{p.replace('_', ' ')}\nmean thickness change (mm)") for p in PLATES]
          + [("denuded_area", "all plates", "denuded area change (mm2)"),
             ("bml_volume", "all bones", "BML volume change (mm3)"),
             ("mocart_total", "repair sites", "MOCART total change (points)")])


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame()


def _subject_info(out: Path) -> dict[str, dict[str, Any]]:
    from cartiq.io.trial import stage_group

    info: dict[str, dict[str, Any]] = {}
    for m in sorted(out.glob("*/*/manifest.json")):
        try:
            b = json.loads(m.read_text(encoding="utf-8")).get("batch") or {}
        except (OSError, ValueError):
            continue
        sid = str(b.get("subject_id") or m.parent.parent.name)
        cur = info.setdefault(sid, {"arm": "", "kl_grade": None})
        cur["arm"] = cur["arm"] or str(b.get("arm") or "")
        if cur["kl_grade"] is None and b.get("kl_grade") is not None:
            cur["kl_grade"] = b.get("kl_grade")
    for sid, cur in info.items():
        cur["arm"] = cur["arm"] or "unspecified"
        kl = cur["kl_grade"]
        cur["stage_group"] = stage_group(int(kl) if kl is not None else None)
    return info


def change_per_knee(change: pd.DataFrame, mocart: pd.DataFrame) -> pd.DataFrame:
    """One row per subject x follow-up x panel: columns subject_id, timepoint, measure,
    structure, change."""
    rows: list[dict[str, Any]] = []
    if len(change) and {"structure", "region", "metric", "change"} <= set(change.columns):
        c = change[change["region"].astype(str) == "all"].copy()
        c["change"] = pd.to_numeric(c["change"], errors="coerce")
        for r in c[c["structure"].isin(PLATES) & (c["metric"] == "thickness_mean")].itertuples():
            rows.append({"subject_id": r.subject_id, "timepoint": r.timepoint,
                         "measure": "thickness", "structure": r.structure, "change": r.change})
        den = c[c["structure"].isin(PLATES) & (c["metric"] == "denuded_area")]
        for (sid, tp), g in den.groupby(["subject_id", "timepoint"]):
            rows.append({"subject_id": sid, "timepoint": tp, "measure": "denuded_area",
                         "structure": "all plates", "change": g["change"].sum(min_count=1)})
        for r in c[(c["structure"] == "bone_marrow_lesion") & (c["metric"] == "volume")].itertuples():
            rows.append({"subject_id": r.subject_id, "timepoint": r.timepoint,
                         "measure": "bml_volume", "structure": "all bones", "change": r.change})
    if len(mocart) and {"item", "points", "subject_id", "timepoint"} <= set(mocart.columns):
        tot = mocart[mocart["item"].astype(str) == "total"].copy()
        tot["points"] = pd.to_numeric(tot["points"], errors="coerce")
        per_scan = tot.groupby(["subject_id", "timepoint"])["points"].mean()
        base: dict[tuple[str, str], str] = {}
        if len(change) and "baseline_timepoint" in change.columns:
            base = {k: str(v) for k, v in
                    change.groupby(["subject_id", "timepoint"])["baseline_timepoint"].first().items()}
        baselines = set(base.values())
        for (sid, tp), value in per_scan.items():
            b = base.get((sid, tp))
            if b is not None and (sid, b) in per_scan.index:
                rows.append({"subject_id": sid, "timepoint": tp, "measure": "mocart_total",
                             "structure": "repair sites", "change": value - per_scan[(sid, b)]})
            if str(tp) not in baselines:  # follow-up (or only) visit: absolute score
                rows.append({"subject_id": sid, "timepoint": tp, "measure": "mocart_followup",
                             "structure": "repair sites", "change": value})
    return pd.DataFrame(rows, columns=["subject_id", "timepoint", "measure", "structure", "change"])


def grouped(values: pd.DataFrame, info: dict[str, dict[str, Any]], by: str) -> pd.DataFrame:
    """``values`` with a ``group`` column: the subject's arm or stage group (@ timepoint
    when there are several follow-up timepoints)."""
    v = values.copy()
    v["group"] = v["subject_id"].map(lambda s: str(info.get(str(s), {}).get(by) or
                                                   ("unspecified" if by == "arm" else "unknown")))
    if v["timepoint"].nunique() > 1:
        v["group"] = v["group"] + " @ " + v["timepoint"].astype(str)
    return v


def n_table(values: pd.DataFrame, info: dict[str, dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Rows: group; columns: n knees with a finite change per panel measure."""
    v = grouped(values, info, by)
    v = v[np.isfinite(pd.to_numeric(v["change"], errors="coerce"))]
    rows = []
    for g, sub in v.groupby("group"):
        row: dict[str, Any] = {by: g}
        for measure, structure, _ in PANELS:
            row[f"{measure} {structure}"] = int(((sub["measure"] == measure) &
                                                 (sub["structure"] == structure)).sum())
        row["mocart_followup repair sites"] = int((sub["measure"] == "mocart_followup").sum())
        rows.append(row)
    return rows


def _group_figure(values: pd.DataFrame, info: dict[str, dict[str, Any]], by: str) -> str:
    from matplotlib.figure import Figure

    v = grouped(values, info, by)
    groups = sorted(v["group"].unique(), key=lambda g: ({"early": 0, "late": 1}.get(g.split(" @ ")[0], 2), g))
    ncol = 4
    nrow = int(np.ceil(len(PANELS) / ncol))
    fig = Figure(figsize=(4.3 * ncol, 3.6 * nrow), dpi=72)
    rng = np.random.default_rng(0)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for i, (measure, structure, label) in enumerate(PANELS):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        if measure == "mocart_total" and not (v["measure"] == measure).any():
            measure, label = "mocart_followup", "MOCART total at follow-up (points)\n(no baseline score)"
        sel = v[(v["measure"] == measure) & (v["structure"] == structure)]
        data = [sel.loc[sel["group"] == g, "change"].astype(float).dropna().to_numpy() for g in groups]
        ticks = [f"{g}\nn={len(d)}" for g, d in zip(groups, data)]
        if any(len(d) for d in data):
            ax.boxplot([d if len(d) else [np.nan] for d in data], widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
            for j, d in enumerate(data):
                ax.scatter(j + 1 + rng.uniform(-0.12, 0.12, len(d)), d, s=16, alpha=0.8,
                           color=colours[j % len(colours)], zorder=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                    color="#888")
        ax.axhline(0, color="#999", lw=0.8, ls="--")
        ax.set_xticks(range(1, len(groups) + 1))
        ax.set_xticklabels(ticks, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"change from baseline by {'treatment arm' if by == 'arm' else 'stage group (KL)'}",
                 fontsize=12)
    fig.tight_layout()
    return f"<img alt='change by {esc(by)}' src='{png_data_uri(fig)}'>"


def compare_qc_rows(out_dir: Path) -> list[dict[str, Any]]:
    """One row per flagged comparison (``<subject>/compare_*/manifest.json`` -> ``qc``)."""
    rows = []
    for m in sorted(Path(out_dir).glob("*/compare_*/manifest.json")):
        try:
            qc = json.loads(m.read_text(encoding="utf-8")).get("qc") or {}
        except (OSError, ValueError):
            continue
        if qc.get("status") in ("warn", "fail"):
            rows.append({"subject": m.parent.parent.name, "comparison": m.parent.name,
                         "qc": qc["status"], "flags": "; ".join(
                             str(f.get("message")) for f in qc.get("flags") or []
                             if isinstance(f, dict))})
    return rows


def cohort_report(out_dir: Path, *, out: Path | None = None) -> ReportResult:
    """Write ``cohort.html`` for a batch output folder; returns its path and any figure errors."""
    out_dir = Path(out_dir)
    errors: list[str] = []
    change = _read(out_dir / "change.csv")
    mocart = _read(out_dir / "mocart.csv")
    summary = _read(out_dir / "cohort_summary.csv")
    failures = _read(out_dir / "failures.csv")
    info = _subject_info(out_dir)
    values = change_per_knee(change, mocart)
    counts = pd.DataFrame([{"arm": i["arm"], "stage_group": i["stage_group"]} for i in info.values()])
    sections = [f"<h1>cartiq cohort report: {esc(out_dir.name)}</h1>",
                f"<p>{len(info)} subject(s); {values['subject_id'].nunique() if len(values) else 0} with "
                "a follow-up comparison. Stage groups: early = KL 0-II, late = KL III-IV.</p>"]
    if len(counts):
        tab = counts.groupby(["arm", "stage_group"]).size().reset_index(name="subjects")
        sections.append("<h2>Subjects per arm and stage group</h2>" + html_table(tab.to_dict("records")))
    for by, label in (("arm", "treatment arm"), ("stage_group", "stage group")):
        sections.append(f"<h2>Change by {label}</h2>")
        sections.append(guarded(errors, f"plots by {label}", lambda by=by: _group_figure(values, info, by)))
        sections.append(f"<details><summary>n per {label} and measure</summary>"
                        + html_table(n_table(values, info, by)) + "</details>")
    from cartiq.report.trial_demo import trial_demo_section  # only with planted_vs_recovered.csv

    sections.append(trial_demo_section(out_dir, errors))
    if len(summary):
        sections.append("<h2>Summary table (cohort_summary.csv)</h2>" + html_table(
            summary.to_dict("records"), highlight=lambda r: r.get("arm") == "all"))
    links = "".join(f"<li><a href='{esc(sid)}/report.html'>{esc(sid)}</a> ({esc(i['arm'])}, "
                    f"KL {esc(i['kl_grade'])}, {esc(i['stage_group'])})</li>"
                    for sid, i in sorted(info.items()) if (out_dir / sid / "report.html").is_file())
    if links:
        sections.append(f"<h2>Subject reports</h2><ul>{links}</ul>")
    qc_rows = compare_qc_rows(out_dir)
    if qc_rows:
        sections.append("<h2>Comparisons with QC flags</h2><p class='muted'>registration "
                        "residual above its limit, unregistered bones, suspected mismatch "
                        "(each comparison's manifest.json qc)</p>" + html_table(qc_rows))
    if len(failures):
        sections.append("<h2>Failures</h2>" + html_table(failures.to_dict("records")))
    if errors:
        sections.append("<h2>Report problems</h2><ul>" +
                        "".join(f"<li class='err'>{esc(e)}</li>" for e in errors) + "</ul>")
    path = Path(out) if out is not None else out_dir / "cohort.html"
    atomic_write_text(path, html_page(f"cartiq cohort {out_dir.name}", sections))
    log.info("cohort report: %s", path)
    return ReportResult(path=path, errors=errors)


def write_cohort_report(batch_out_dir: Path, *, out: Path | None = None) -> ReportResult:
    """Write ``cohort.html`` for a batch output folder."""
    return cohort_report(Path(batch_out_dir), out=out)
