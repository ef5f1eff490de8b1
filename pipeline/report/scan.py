"""Self-contained HTML reports: one per subject (``report.html``) and one per batch
(``cohort.html``).  Images are PNGs embedded as base64, so a report is one file that opens
in any browser with no server.

Subject report (after ``compare`` or ``batch``), sections:

1. header: subject, side, arm, KL grade, visits; first of all, a red banner for every visit
   whose QC status is ``fail`` (a broken segmentation: its numbers are shown but are not to
   be trusted, and the batch cohort tables leave them out);
2. QC flags of every visit (``manifest.json`` "qc") and of every comparison (its
   ``manifest.json`` "qc": bone-surface residuals against their limits, unregistered bones,
   a suspected mismatch; older folders: ``registration.json``);
3. visits side by side: thickness maps of each plate (rows) per visit (columns) on one
   colour scale, defects ``D<id>`` and lesions ``B<id>`` marked, then the key measurements
   per visit, and each visit's ``qc.png`` (collapsed);
4. thickness-change maps (``thickness_change.nii.gz`` projected like the thickness maps,
   diverging colours, mm);
5. the change table (plate-level rows first; all rows collapsed), rows beyond the smallest
   detectable change highlighted;
6. tracked defects and lesions (``defect_tracking.csv``, ``lesion_tracking.csv``);
7. MOCART per site and visit: each item's measured value, category and points;
8. provenance: version, commit, inputs with sha256, config hash, model, timings.

A figure that fails is replaced by a note (and listed in ``ReportResult.errors``); the
tables are still written.  The cohort report is in :mod:`cartiq.report.cohort`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError
from cartiq.io.volume import atomic_write_text, read_volume
from cartiq.io.labels import PLATES, default_scheme
from cartiq.measurement.qc import QCFlag, read_table, registration_flag
from cartiq.report.html import (ReportResult, esc, file_data_uri, guarded, html_page,
                                html_table, png_data_uri)

__all__ = ["write_subject_report", "find_folders"]

log = logging.getLogger(__name__)

KEY_METRICS = [("thickness_mean", "mean thickness"), ("volume", "volume"),
               ("interface_area", "tAB"), ("covered_area", "cAB"),
               ("denuded_area", "denuded area"), ("defect_count", "defects")]


# ------------------------------------------------------------------------ discovery


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _is_scan(d: Path) -> bool:
    return (d / "measurements.csv").is_file() and (d / "manifest.json").is_file()


def _is_compare(d: Path) -> bool:
    return (d / "change.csv").is_file() and (d / "manifest.json").is_file()


def _paths_in(obj: Any) -> list[Path]:
    out = []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _paths_in(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _paths_in(v)
    elif isinstance(obj, str) and len(obj) < 4096 and ("/" in obj or "\\" in obj):
        p = Path(obj)
        try:
            if p.is_dir() and _is_scan(p):
                out.append(p)
        except OSError:
            pass
    return out


def find_folders(subject_dir: Path) -> tuple[list[Path], list[Path]]:
    """(scan folders in visit order, comparison folders) of a subject, compare or scan folder."""
    d = Path(subject_dir)
    if _is_scan(d):
        return [d], []
    if _is_compare(d):
        compares = [d]
        scans = list(dict.fromkeys(p.resolve() for p in _paths_in(_manifest(d))))
    else:
        kids = sorted((k for k in d.iterdir() if k.is_dir()), key=lambda k: _natural(k.name))
        scans = [k for k in kids if _is_scan(k)]
        compares = [k for k in kids if _is_compare(k)]
        for c in compares:
            scans += [p for p in _paths_in(_manifest(c)) if p.resolve() not in
                      {s.resolve() for s in scans}]
    order: list[str] = []
    for c in compares:  # baseline before follow-up, as the comparisons say
        m = re.match(r"compare_(.+)_(.+)$", c.name)
        for name in (m.groups() if m else ()):
            if name not in order:
                order.append(name)
    scans.sort(key=lambda s: (order.index(s.name) if s.name in order else len(order), _natural(s.name)))
    return scans, compares


def _visit_name(scan: Path) -> str:
    m = _manifest(scan)
    return str((m.get("batch") or {}).get("timepoint") or scan.name)


# ------------------------------------------------------------------------ figures


def _maps_figure(scans: list[Path], vmax: float) -> str:
    """Rows = plates, columns = visits: thickness maps on one colour scale."""
    from matplotlib.figure import Figure

    from cartiq.measurement.qc import markers, plate_maps
    from cartiq.measurement.qc_figure import lesions_for
    from cartiq.measurement.qc_maps import draw_plate_map

    fig = Figure(figsize=(4.2 * len(scans) + 0.5, 3.3 * len(PLATES)), dpi=70)
    per_visit = []
    for scan in scans:
        seg = read_volume(scan / "segmentation.nii.gz", kind="labels")
        th = read_volume(scan / "thickness.nii.gz").array
        per_visit.append((plate_maps(seg.array, seg.geometry, th), *markers(scan, None)))
    side = _manifest(scans[0]).get("side")
    for c, (scan, (maps, defects, lesions)) in enumerate(zip(scans, per_visit)):
        for r, plate in enumerate(PLATES):
            ax = fig.add_subplot(len(PLATES), len(scans), r * len(scans) + c + 1)
            if plate not in maps:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{plate}: absent", ha="center", transform=ax.transAxes)
                continue
            bone = default_scheme().plates[plate]
            draw_plate_map(fig, ax, maps[plate], vmax=vmax, side=side,
                           defects=[d for d in defects if d["plate"] == plate],
                           lesions=lesions_for(plate, [x for x in lesions if x["bone"] == bone], maps),
                           title=f"{_visit_name(scan)}: {plate.replace('_', ' ')}")
    fig.tight_layout()
    return f"<img alt='thickness maps' src='{png_data_uri(fig)}'>"


def _change_figure(compare: Path, scans: list[Path]) -> str:
    from matplotlib.figure import Figure

    from cartiq.measurement.qc import plate_maps
    from cartiq.measurement.qc_maps import draw_plate_map

    change = read_volume(compare / "thickness_change.nii.gz")
    named = ((_manifest(compare).get("inputs") or {}).get("baseline") or {}).get("folder")
    candidates = ([Path(named)] if named and Path(named).is_dir() else []) + scans
    base = next((s for s in candidates if (s / "segmentation.nii.gz").is_file()
                 and read_volume(s / "segmentation.nii.gz", kind="labels").array.shape
                 == change.array.shape), None)
    if base is None:
        raise ValueError("no visit's segmentation matches thickness_change.nii.gz")
    seg = read_volume(base / "segmentation.nii.gz", kind="labels")
    measured = change.array != 0
    if (base / "thickness.nii.gz").is_file():  # baseline cartilage, unchanged places included
        measured |= read_volume(base / "thickness.nii.gz").array > 0
    labels = np.where(measured, seg.array, 0)
    maps = plate_maps(labels, change.geometry, change.array)
    finite = np.abs(change.array[change.array != 0])
    vmax = float(max(0.5, np.ceil(2 * np.percentile(finite, 98)) / 2)) if finite.size else 1.0
    fig = Figure(figsize=(4.4 * max(len(maps), 1), 3.6), dpi=70)
    for i, (plate, pm) in enumerate(maps.items()):
        ax = fig.add_subplot(1, max(len(maps), 1), i + 1)
        draw_plate_map(fig, ax, pm, vmin=-vmax, vmax=vmax, cmap="RdBu", side=_manifest(base).get("side"),
                       label="change (mm)", title=f"{plate.replace('_', ' ')}: thickness change")
    fig.tight_layout()
    return (f"<p class='muted'>follow-up minus baseline, on the {esc(_visit_name(base))} "
            f"surface; red = loss, blue = gain</p><img alt='thickness change' src='{png_data_uri(fig)}'>")


# ------------------------------------------------------------------------ sections


def _qc_flags(scans: list[Path], compares: list[Path]) -> tuple[str, list[QCFlag]]:
    rows, all_flags = [], []
    for s in scans:
        qc = _manifest(s).get("qc") or {}
        flags = qc.get("flags") or []
        status = qc.get("status", "not run")
        rows.append(f"<div class='card'><h3>{esc(_visit_name(s))}: <span class='{esc(status)}'>"
                    f"{esc(status).upper()}</span></h3>" +
                    ("<ul>" + "".join(f"<li>[{esc(f.get('severity'))}] {esc(f.get('message'))}</li>"
                                      for f in flags) + "</ul>"
                     if flags else "<p class='muted'>no flags</p>")
                    + "</div>")
    for c in compares:
        m = _manifest(c)
        try:
            reg = json.loads((c / "registration.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reg = {}
        flags = _compare_flags(m, reg)
        all_flags += flags
        status = ("fail" if any(f.severity == "error" for f in flags) else "warn") if flags else "pass"
        rows.append(f"<div class='card'><h3>{esc(c.name)}: <span class='{status}'>{status.upper()}"
                    "</span></h3>" + ("<ul>" + "".join(f"<li>[{esc(f.severity)}] {esc(f.message)}</li>"
                                                       for f in flags) + "</ul>" if flags else
                                      f"<p class='muted'>{esc(_residual_summary(reg))}</p>") + "</div>")
    return "<div class='grid'>" + "".join(rows) + "</div>", all_flags


def _compare_flags(m: dict[str, Any], reg: dict[str, Any]) -> list[QCFlag]:
    """A comparison's QC flags: its manifest's ``qc`` block, else (older folders) the
    per-bone ``residual_flag`` of ``registration.json``, else residuals above 1 mm; plus a
    suspected mismatch and a status other than ok."""
    qc = m.get("qc") if isinstance(m.get("qc"), dict) else None
    bones = reg.get("bones") if isinstance(reg.get("bones"), dict) else {}
    if qc is not None and isinstance(qc.get("flags"), list):
        flags = [QCFlag(str(f.get("code")), str(f.get("severity")), str(f.get("structure")),
                        str(f.get("message")), f.get("value")) for f in qc["flags"]
                 if isinstance(f, dict)]
    elif any("residual_flag" in b for b in bones.values() if isinstance(b, dict)):
        flags = []
        for name, b in bones.items():
            if not isinstance(b, dict) or not b.get("present", True):
                continue
            if b.get("converged") is False:
                flags.append(QCFlag("registration_failed", "error", name,
                                    b.get("reason") or f"{name}: not registered"))
            elif b.get("residual_flag"):
                flags.append(QCFlag("registration_residual", "warning", name,
                                    f"{name}: bone-surface residual {b.get('residual_mean_mm')} mm "
                                    f"> limit {b.get('residual_limit_mm')} mm",
                                    b.get("residual_mean_mm")))
    else:
        flags = _registration_flags({"manifest": m, "registration": reg})
    codes = {f.code for f in flags}
    mismatch = m.get("mismatch") or {}
    if mismatch.get("suspected") and "mismatch" not in codes:
        flags.append(QCFlag("mismatch", "error", "compare", "baseline and follow-up may not "
                            "be the same knee: " + "; ".join(mismatch.get("reasons") or [])))
    if m.get("status") not in (None, "ok") and "compare_failed" not in codes:
        flags.append(QCFlag("compare_status", "warning", "compare",
                            f"comparison status {m.get('status')}: {m.get('error') or 'see warnings'}"))
    return flags


def _residual_summary(reg: dict[str, Any]) -> str:
    """One line for an unflagged comparison: each bone's residual against its limit."""
    parts = [f"{name} {b.get('residual_mean_mm')} mm (limit {b.get('residual_limit_mm')} mm)"
             for name, b in (reg.get("bones") or {}).items()
             if isinstance(b, dict) and b.get("residual_mean_mm") is not None]
    if not parts:
        return "no registration residuals reported"
    return "bone-surface residuals within their limits: " + ", ".join(parts)


def _qc_fail_banner(scans: list[Path]) -> str:
    """Top-of-report warning naming every visit whose QC status is ``fail`` and why."""
    items = []
    for s in scans:
        qc = _manifest(s).get("qc") or {}
        if qc.get("status") == "fail":
            why = [f.get("message", "") for f in qc.get("flags") or [] if f.get("severity") == "error"]
            items.append(f"<li><b>{esc(_visit_name(s))}</b>: {esc('; '.join(why))}</li>")
    if not items:
        return ""
    return ("<div class='card qcfail' style='border:3px solid #c00;background:#fee'>"
            "<p class='fail'>QC FAIL: the segmentation of the visit(s) below is implausible "
            "(broken). Their numbers are shown but are not to be trusted; batch cohort tables "
            "leave them out (cartiq batch --include-qc-fail keeps them).</p><ul>"
            + "".join(items) + "</ul></div>")


def _registration_flags(manifest: dict[str, Any]) -> list[QCFlag]:
    """Flags for every registration residual (``residual_mean_mm``/``residual_mm``) found."""
    found: list[tuple[str, float]] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("residual_mean_mm", "residual_mm") and isinstance(v, (int, float)):
                    found.append((where, float(v)))
                else:
                    walk(v, f"{where}/{k}" if where else str(k))

    walk(manifest, "")
    flags = []
    for where, value in found:
        for f in registration_flag(value):
            bone = where.rsplit("/", 1)[-1]
            f.structure = bone or f.structure
            f.message = f"{bone}: {f.message}" if bone else f.message
            flags.append(f)
    return flags


def _measure_table(scans: list[Path]) -> str:
    values: dict[tuple[str, str], dict[str, str]] = {}
    units: dict[str, str] = {}
    for s in scans:
        for r in read_table(s / "measurements.csv"):
            if r.get("region") == "all":
                values.setdefault((r["structure"], r["metric"]), {})[_visit_name(s)] = r["value"]
                units[r["metric"]] = r.get("unit", "")
    rows = []
    for plate in PLATES:
        for metric, label in KEY_METRICS:
            if (plate, metric) in values:
                rows.append({"structure": plate, "measure": f"{label} ({units.get(metric, '')})",
                             **values[(plate, metric)]})
    for metric in ("volume", "lesion_count", "max_diameter"):
        if ("bone_marrow_lesion", metric) in values:
            rows.append({"structure": "bone-marrow lesions (all)",
                         "measure": f"{metric.replace('_', ' ')} ({units.get(metric, '')})",
                         **values[("bone_marrow_lesion", metric)]})
    names = [_visit_name(s) for s in scans]
    if len(names) > 1:
        delta = f"{names[-1]} - {names[0]}"
        for r in rows:
            try:
                r[delta] = float(r[names[-1]]) - float(r[names[0]])
            except (KeyError, TypeError, ValueError):
                r[delta] = ""
        names.append(delta)
    return html_table(rows, ["structure", "measure"] + names)


def _mocart_section(scans: list[Path], compares: list[Path]) -> str:
    parts = []
    for folder in scans + compares:
        for path in [folder / "score" / "mocart.csv", folder / "mocart.csv"]:
            rows = read_table(path)
            if not rows:
                continue
            name = _visit_name(folder) if folder in scans else folder.name
            keys = sorted({(r.get("visit") or "", r.get("site_id")) for r in rows},
                          key=lambda x: (x[0] != "baseline", _natural(x[0]), _natural(str(x[1]))))
            for visit, site in keys:
                site_rows = [r for r in rows
                             if (r.get("visit") or "") == visit and r.get("site_id") == site]
                where = f"{name} ({visit})" if visit else name
                parts.append(f"<div class='card'><h3>{esc(where)} - site {esc(site)}</h3>" + html_table(
                    site_rows, ["item", "measure", "value", "unit", "category", "points", "max_points",
                                "automation"], highlight=lambda r: r.get("item") == "total") + "</div>")
            break
    return "<div class='grid'>" + "".join(parts) + "</div>" if parts else \
        "<p class='muted'>no MOCART scores (no repair sites given)</p>"


def _provenance(folders: list[Path]) -> str:
    rows = []
    for f in folders:
        m = _manifest(f)
        inputs = m.get("inputs") or {}
        inp = "; ".join(f"{k}: {v.get('path')} (sha256 {str(v.get('sha256'))[:12]})"
                        for k, v in inputs.items() if isinstance(v, dict))
        from cartiq.measurement.dicom_out import model_of

        model = model_of(m)
        rows.append({"folder": str(f), "stage": m.get("stage"), "cartiq": m.get("cartiq_version"),
                     "commit": str(m.get("git_commit") or "")[:10], "created": m.get("created"),
                     "config hash": m.get("config_hash"),
                     "side": f"{m.get('side')} ({m.get('side_source')})",
                     "model": json.dumps(model)[:120] if model else "", "inputs": inp,
                     "warnings": "; ".join(m.get("warnings") or [])[:400]})
    cols = ["folder", "stage", "cartiq", "commit", "created", "config hash", "side", "model",
            "inputs", "warnings"]
    body = "".join("<tr>" + "".join(f"<td>{esc(r[c])}</td>" for c in cols) + "</tr>" for r in rows)
    return (f"<table class='meta'><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table>")


def _change_tables(c: Path) -> str:
    rows = read_table(c / "change.csv")
    plate_rows = [r for r in rows if r.get("region") == "all"]
    cols = ["structure", "region", "metric", "baseline", "followup", "change", "unit",
            "exceeds_sdc", "note"]
    return ("<h3>Change table (whole plates; highlighted: beyond the smallest detectable "
            "change)</h3>" + html_table(plate_rows, cols, _exceeds)
            + f"<details><summary>all {len(rows)} change rows (subregions)</summary>"
            + html_table(rows, cols, _exceeds) + "</details>")


def _exceeds(r: dict[str, Any]) -> bool:
    return str(r.get("exceeds_sdc", "")).strip().lower() in ("1", "true", "yes", "1.0")


def write_subject_report(subject_dir: Path, *, out: Path | None = None,
                         title: str | None = None, map_vmax_mm: float = 4.0) -> ReportResult:
    """Write a self-contained ``report.html`` for one subject (see module docstring).

    ``subject_dir`` is a batch subject folder (visit folders + ``compare_*`` folders), a
    ``cartiq compare`` output folder, or one scan folder.  Default output:
    ``subject_dir/report.html``.
    """
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise InputError("not a folder", subject_dir)
    scans, compares = find_folders(subject_dir)
    errors: list[str] = []
    first = _manifest(scans[0]) if scans else {}
    batch = first.get("batch") or {}
    subject = title or batch.get("subject_id") or subject_dir.name
    visits = [_visit_name(s) for s in scans]
    head = (f"<h1>cartiq subject report: {esc(subject)}</h1><p>side <b>{esc(first.get('side'))}</b>"
            f" - arm <b>{esc(batch.get('arm') or 'n/a')}</b> - KL grade <b>"
            f"{esc(batch.get('kl_grade') if batch.get('kl_grade') is not None else 'n/a')}</b> - visits: "
            f"{esc(', '.join(visits) or 'none')} - comparisons: "
            f"{esc(', '.join(c.name for c in compares) or 'none')}</p>")
    qc_html = guarded(errors, "QC summary", lambda: _qc_flags(scans, compares)[0])
    sections = [_qc_fail_banner(scans), head, "<h2>Quality control</h2>", qc_html]
    sections.append("<h2>Visits side by side</h2>")
    if scans:
        sections.append(guarded(errors, "thickness maps", lambda: _maps_figure(scans, map_vmax_mm)))
        sections.append("<h3>Key measurements (whole plates)</h3>"
                        + guarded(errors, "key measurements", lambda: _measure_table(scans)))
        for s in scans:
            if (s / "qc.png").is_file():
                name = esc(_visit_name(s))
                sections.append(f"<details><summary>QC figure {name}</summary><img alt='qc {name}' "
                                f"src='{file_data_uri(s / 'qc.png')}'></details>")
    for c in compares:
        sections.append(f"<h2>Change: {esc(c.name)}</h2>")
        if (c / "thickness_change.nii.gz").is_file():
            sections.append(guarded(errors, f"change maps {c.name}", lambda c=c: _change_figure(c, scans)))
        sections.append(guarded(errors, f"change table {c.name}", lambda c=c: _change_tables(c)))
        for name, label in (("defect_tracking.csv", "Tracked cartilage defects"),
                            ("lesion_tracking.csv", "Tracked bone-marrow lesions")):
            sections.append(f"<h3>{label}</h3>" + html_table(read_table(c / name)))
    sections.append("<h2>MOCART (per repair site)</h2>"
                    + guarded(errors, "MOCART tables", lambda: _mocart_section(scans, compares)))
    sections.append("<h2>Provenance</h2>"
                    + guarded(errors, "provenance", lambda: _provenance(scans + compares)))
    if errors:
        sections.append("<h2>Report problems</h2><ul>" + "".join(f"<li class='err'>{esc(e)}</li>"
                                                                 for e in errors) + "</ul>")
    path = Path(out) if out is not None else subject_dir / "report.html"
    atomic_write_text(path, html_page(f"cartiq report {subject}", sections))
    log.info("subject report: %s", path)
    return ReportResult(path=path, errors=errors)
