"""Subject report.html and cohort.html: content checked against the tables they are built
from, self-containedness, a figure failure, and a screenshot in headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cartiq.io.volume import read_volume, write_volume
from cartiq.io.labels import PLATES

CHROMIUM = Path("/usr/bin/chromium")
SPACING = (0.8, 0.8, 1.5)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """Two measured phantom visits (femoral cartilage 2.2 -> 1.8 mm) and a comparison folder
    in the longitudinal stage's format."""
    from cartiq.measurement.measure import run_measure
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    root = tmp_path_factory.mktemp("subject")
    subj = root / "S01"
    for name, thick in (("BL", 2.2), ("FU", 1.8)):
        ph = make_phantom(PhantomSpec(seed=3, spacing_mm=SPACING, femoral_thickness_mm=thick))
        p = write_phantom(ph, root / "raw" / name)
        run_measure(p["image"], p["seg"], subj / name)
    c = subj / "compare_BL_FU"
    c.mkdir()
    t0 = read_volume(subj / "BL" / "thickness.nii.gz")
    t1 = read_volume(subj / "FU" / "thickness.nii.gz").array
    write_volume(c / "thickness_change.nii.gz",
                 np.where(t0.array > 0, np.where(t1 > 0, t1, 0) - t0.array, 0).astype(np.float32),
                 t0.geometry)
    (c / "change.csv").write_text(
        "structure,region,metric,baseline,followup,change,unit,exceeds_sdc,note\n"
        "femoral_cartilage,all,thickness_mean,2.1,1.7,-0.4,mm,true,\n"
        "patellar_cartilage,all,thickness_mean,2.6,2.6,0.0,mm,false,\n"
        "femoral_cartilage,cMF,thickness_mean,2.2,1.8,-0.4,mm,true,\n")
    (c / "defect_tracking.csv").write_text(
        "status,baseline_defect_id,plate,region,baseline_kind,baseline_area_mm2,followup_area_mm2\n"
        "enlarged,1,femoral_cartilage,ccMF,full,49.43,61.29\n")
    (c / "lesion_tracking.csv").write_text(
        "status,baseline_lesion_id,followup_lesion_id,bone,baseline_volume_mm3,followup_volume_mm3\n"
        "stable,1,1,femur,250.5,251.0\n")
    (c / "mocart.csv").write_text(
        "visit,site_id,item,measure,value,unit,category,points,max_points,automation\n"
        "baseline,1,volume_fill,fill_pct,0,%,0%,0,20,automatic\n"
        "followup,1,volume_fill,fill_pct,37.5,%,25-49%,5,20,automatic\n"
        "followup,1,total,score,42,points,,42,100,semi\n")
    (c / "registration.json").write_text(json.dumps(
        {"bones": {"femur": {"residual_mean_mm": 0.3}, "tibia": {"residual_mean_mm": 1.7}}}))
    (c / "manifest.json").write_text(json.dumps({
        "stage": "compare", "status": "ok",
        "inputs": {"baseline": {"folder": str(subj / "BL")}, "followup": {"folder": str(subj / "FU")}}}))
    return subj


@pytest.fixture(scope="module")
def report(subject):
    from cartiq.report.scan import write_subject_report

    res = write_subject_report(subject)
    return res, res.path.read_text(encoding="utf-8")


def _cell_values(html: str, first_cells: tuple[str, str]) -> list[str]:
    """Cells of the table row starting with the two given cells."""
    pattern = (r"<tr><td>" + re.escape(first_cells[0]) + r"</td><td>" + re.escape(first_cells[1])
               + r"</td>(.*?)</tr>")
    m = re.search(pattern, html)
    assert m, f"row {first_cells} not found"
    return re.findall(r"<td>(.*?)</td>", m.group(1))


@pytest.mark.slow
def test_subject_report_content(subject, report):
    res, html = report
    assert res.errors == [] and res.path == subject / "report.html"
    for heading in ("Quality control", "Visits side by side", "Key measurements",
                    "Change: compare_BL_FU", "Tracked cartilage defects",
                    "Tracked bone-marrow lesions", "MOCART (per repair site)", "Provenance"):
        assert heading in html
    # visits in order, with the values of their measurements.csv
    bl, fu = ({(r["structure"], r["metric"]): float(r["value"])
               for r in read_csv(subject / v / "measurements.csv") if r["region"] == "all" and r["value"]}
              for v in ("BL", "FU"))
    cells = _cell_values(html, ("femoral_cartilage", "mean thickness (mm)"))
    key = ("femoral_cartilage", "thickness_mean")
    assert [float(c) for c in cells] == pytest.approx([bl[key], fu[key], fu[key] - bl[key]], abs=0.006)
    assert fu[key] < bl[key] - 0.2  # the phantom thinned
    # change table: both plate rows, the exceeding one highlighted; subregion row only in details
    assert html.count("<tr class='hi'><td>femoral_cartilage</td><td>all</td>") == 2  # table + all rows
    assert "<td>cMF</td>" in html.split("<details><summary>all 3 change rows")[1]
    # tracking and MOCART (longitudinal format with a visit column)
    assert "<td>enlarged</td>" in html and "<td>61.29</td>" in html
    assert "compare_BL_FU (followup) - site 1" in html and "compare_BL_FU (baseline) - site 1" in html
    # QC: registration residual of the tibia flagged, femur not
    assert "tibia: registration residual 1.70 mm" in html and "femur: registration" not in html
    # provenance names both visits' inputs
    assert html.count("image.nii.gz (sha256") >= 2


@pytest.mark.slow
def test_subject_report_is_self_contained(report):
    _, html = report
    srcs = re.findall(r"src='([^']*)'", html)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)=['\"]?(https?:|file:|//)", html)
    assert "<script" not in html


@pytest.mark.slow
def test_figure_failure_keeps_tables(subject, monkeypatch, tmp_path):
    import cartiq.report.scan as rep

    def boom(*a, **k):
        raise MemoryError("figure too large")

    monkeypatch.setattr(rep, "_maps_figure", boom)
    res = rep.write_subject_report(subject, out=tmp_path / "r.html")
    html = res.path.read_text()
    assert res.errors == ["thickness maps: MemoryError: figure too large"]
    assert "thickness maps could not be drawn" in html and "Key measurements" in html
    assert "<td>enlarged</td>" in html


def test_find_folders_orders_visits(tmp_path):
    from cartiq.report.scan import find_folders

    for name in ("V10", "V2", "compare_V2_V10"):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text("{}")
        (d / ("change.csv" if name.startswith("compare") else "measurements.csv")).write_text("x\n")
    scans, compares = find_folders(tmp_path)
    assert [s.name for s in scans] == ["V2", "V10"] and [c.name for c in compares] == ["compare_V2_V10"]
    assert find_folders(tmp_path / "V2") == ([tmp_path / "V2"], [])


# ------------------------------------------------------------------------- cohort


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(1)
    ch = ["subject_id,baseline_timepoint,timepoint,structure,region,metric,baseline,followup,"
          "change,unit,exceeds_sdc"]
    mo = ["subject_id,timepoint,site_id,item,measure,value,unit,category,points,max_points,automation"]
    truth = {}
    for i in range(8):
        sid, arm, kl = f"S{i:02d}", ("MSC" if i % 2 == 0 else "placebo"), [1, 2, 3, 4][i % 4]
        for tp in ("BL", "M12"):
            d = out / sid / tp
            d.mkdir(parents=True)
            (d / "manifest.json").write_text(json.dumps({"stage": "batch_scan", "batch": {
                "subject_id": sid, "timepoint": tp, "arm": arm, "kl_grade": kl}}))
        for p in PLATES:
            c = (0.1 if arm == "MSC" else -0.1) + float(rng.normal(0, 0.02))
            truth[(sid, p)] = c
            ch.append(f"{sid},BL,M12,{p},all,thickness_mean,2.0,{2 + c},{c},mm,false")
            ch.append(f"{sid},BL,M12,{p},all,denuded_area,10,{10 + i},{i},mm2,false")
        ch.append(f"{sid},BL,M12,bone_marrow_lesion,all,volume,100,{100 - 10 * i},{-10 * i},mm3,false")
        mo.append(f"{sid},BL,1,total,score,50,points,,50,100,semi")
        mo.append(f"{sid},M12,1,total,score,{60 + i},points,,{60 + i},100,semi")
    (out / "change.csv").write_text("\n".join(ch) + "\n")
    (out / "mocart.csv").write_text("\n".join(mo) + "\n")
    (out / "failures.csv").write_text("subject_id,timepoint,stage,error\nS99,BL,measure,bad image\n")
    return out, truth


def test_cohort_values_and_groups(batch):
    import pandas as pd

    from cartiq.report.cohort import _subject_info, change_per_knee, n_table

    out, truth = batch
    v = change_per_knee(pd.read_csv(out / "change.csv"), pd.read_csv(out / "mocart.csv"))
    th = v[v["measure"] == "thickness"]
    assert len(th) == 32
    for r in th.itertuples():
        assert r.change == pytest.approx(truth[(r.subject_id, r.structure)], abs=1e-9)
    den = v[v["measure"] == "denuded_area"].set_index("subject_id")["change"]
    assert den["S03"] == pytest.approx(4 * 3)  # summed over the four plates
    moc = v[v["measure"] == "mocart_total"].set_index("subject_id")["change"]
    assert moc["S05"] == pytest.approx(15)
    info = _subject_info(out)
    assert info["S02"] == {"arm": "MSC", "kl_grade": 3, "stage_group": "late"}
    by_arm = {r["arm"]: r for r in n_table(v, info, "arm")}
    assert by_arm["MSC"]["thickness femoral_cartilage"] == 4
    assert by_arm["placebo"]["mocart_total repair sites"] == 4
    assert {r["stage_group"] for r in n_table(v, info, "stage_group")} == {"early", "late"}


def test_cohort_html(batch):
    from cartiq.report.cohort import write_cohort_report

    out, _ = batch
    res = write_cohort_report(out)
    html = res.path.read_text()
    assert res.errors == [] and res.path == out / "cohort.html"
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 2
    assert "Change by treatment arm" in html and "Change by stage group" in html
    assert "<td>S99</td>" in html  # failures listed


# ------------------------------------------------------------------------- browser


def screenshot(html: Path, png: Path, tmp: Path, height: int = 2400) -> np.ndarray:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}",
           f"--screenshot={png}", f"--window-size=1400,{height}", html.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.is_file(), "chromium wrote no screenshot"
    from matplotlib.image import imread

    return imread(png)[..., :3]


def _check_not_blank(img: np.ndarray) -> None:
    non_white = (img < 0.94).any(axis=-1)
    assert non_white.mean() > 0.02  # text, tables and figures (a blank page: 0)
    colours = np.unique((img[::4, ::4] * 15).astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # embedded figures rendered (colours), not just black text
    assert non_white[:300].mean() > 0.01  # the header is at the top


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed")
def test_subject_report_renders_in_chromium(report, tmp_path):
    res, _ = report
    _check_not_blank(screenshot(res.path, tmp_path / "shot.png", tmp_path))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed")
def test_cohort_report_renders_in_chromium(batch, tmp_path):
    from cartiq.report.cohort import write_cohort_report

    out, _ = batch
    res = write_cohort_report(out, out=tmp_path / "cohort.html")
    _check_not_blank(screenshot(res.path, tmp_path / "shot.png", tmp_path, height=1600))


@pytest.mark.slow
def test_compare_folder_finds_its_visits(subject, tmp_path):
    """`cartiq report COMPARE_DIR`: the visits come from the comparison's manifest."""
    from cartiq.report.scan import find_folders, write_subject_report

    scans, compares = find_folders(subject / "compare_BL_FU")
    assert [s.name for s in scans] == ["BL", "FU"] and compares == [subject / "compare_BL_FU"]
    res = write_subject_report(subject / "compare_BL_FU", out=tmp_path / "c.html")
    html = res.path.read_text()
    assert res.errors == [] and "visits: BL, FU" in html


def test_templates_escape_every_value():
    from cartiq.report.html import html_page, html_table

    table = html_table([{"structure": "<script>alert(1)</script>", "value": 1.234567}])
    assert "<script>" not in table and "&lt;script&gt;" in table and "<td>1.23</td>" in table
    page = html_page("knee <b>1</b>", ["<h1>trusted section</h1>"])
    assert "<title>knee &lt;b&gt;1&lt;/b&gt;</title>" in page
    assert "<h1>trusted section</h1>" in page and page.startswith("<!DOCTYPE html>")
