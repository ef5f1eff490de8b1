"""MOCART-like scoring on analytic repair-site phantoms (tests/_scoring_phantoms.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from _scoring_phantoms import RepairSpec, make_repair_phantom, reorient, write_scan_folder

from cartiq.cli import main
from cartiq.config import load_config
from cartiq.errors import ConfigError
from cartiq.io.volume import Volume, write_volume
from cartiq.scoring.mocart import (CSV_COLUMNS, ScoringConfig, SiteSpec, load_scoring_config,
                              score_sites)

REPO = Path(__file__).resolve().parent.parent


def _score(spec: RepairSpec, config=None):
    ph = make_repair_phantom(spec)
    res = score_sites(ph["image"], ph["labels"], ph["sites"], config=config)
    assert len(res.sites) == 1
    return res.sites[0]


def _item(site, name):
    return next(i for i in site.items if i.item == name)


@pytest.fixture(scope="module")
def baseline():
    return _score(RepairSpec())


def test_complete_repair_scores_100(baseline):
    assert baseline.total == 100
    assert baseline.max_total == 100
    assert 92 <= baseline.measures["fill_pct"] <= 108
    # repair diameter 10 mm (+ one column of discretisation)
    assert 9.5 <= baseline.measures["repair_diameter_mm"] <= 12.0
    assert baseline.measures["native_thickness_mm"] == pytest.approx(2.5, abs=0.2)
    assert all(i.confidence == "high" for i in baseline.items)


@pytest.mark.parametrize("fill, points, category, lo, hi", [
    (1.0, 20, "complete", 92, 108),
    (0.5, 10, "50-74%", 45, 60),
    (0.0, 0, "<25%", 0, 15),
])
def test_volume_fill(fill, points, category, lo, hi):
    site = _score(RepairSpec(fill=fill))
    it = _item(site, "volume_fill")
    assert it.points == points
    assert category in it.category
    assert lo <= it.value <= hi
    assert it.automation == "auto"


def test_empty_defect_has_no_repair_tissue_items():
    site = _score(RepairSpec(fill=0.0))
    for name in ("integration", "surface", "structure", "signal"):
        assert _item(site, name).points == 0
    assert site.measures["denuded_pct"] > 60


@pytest.mark.parametrize("ratio, points, category", [(1.0, 15, "normal"),
                                                     (1.6, 5, "minor abnormal"),
                                                     (3.0, 0, "severely abnormal")])
def test_signal_intensity(ratio, points, category):
    site = _score(RepairSpec(repair_ratio=ratio))
    it = _item(site, "signal")
    assert it.value == pytest.approx(ratio, rel=0.05)
    assert it.points == points and it.category.startswith(category)
    assert it.automation == "semi"


def test_structure_heterogeneous(baseline):
    assert _item(baseline, "structure").points == 10
    site = _score(RepairSpec(heterogeneous=0.4))
    it = _item(site, "structure")
    assert it.points == 0 and it.value > 3
    assert it.automation == "semi"
    assert _item(site, "signal").points == 15       # same median signal


@pytest.mark.parametrize("diam, points, category", [(0.0, 20, "no major"),
                                                    (3.0, 15, "minor"),
                                                    (7.0, 5, "severe")])
def test_subchondral_bml(diam, points, category):
    site = _score(RepairSpec(bml_diameter_mm=diam))
    it = _item(site, "subchondral")
    assert it.points == points and it.category.startswith(category)
    assert site.measures["bml_diameter_mm"] == pytest.approx(diam, abs=1.0)


def test_subchondral_cyst_when_enabled(baseline):
    assert math.isnan(baseline.measures["cyst_diameter_mm"])      # off by default
    assert any("cysts not assessed" in n for n in baseline.notes)
    cfg = load_scoring_config(None)
    cfg = cfg.model_copy(update={"measurement": cfg.measurement.model_copy(
        update={"cyst_intensity_ratio": 2.0})})
    site = _score(RepairSpec(cyst_diameter_mm=6.0), config=cfg)
    it = _item(site, "subchondral")
    assert it.points == 0 and it.category.startswith("subchondral cyst")
    assert site.measures["cyst_diameter_mm"] == pytest.approx(6.0, abs=1.0)
    small = _score(RepairSpec(cyst_diameter_mm=3.0), config=cfg)
    assert _item(small, "subchondral").points == 20


def test_bony_overgrowth_step(baseline):
    assert _item(baseline, "bony_defect").points == 10
    site = _score(RepairSpec(bone_step_mm=1.5))
    it = _item(site, "bony_defect")
    assert it.points < 10
    assert it.value == pytest.approx(1.5, abs=0.4)            # + = overgrowth into the joint
    # repair tissue up to the native level over the raised bone is complete fill
    assert _item(site, "volume_fill").points == 20
    small = _item(_score(RepairSpec(bone_step_mm=1.0)), "bony_defect")
    assert small.points == 5


def test_integration_cleft(baseline):
    assert _item(baseline, "integration").points == 15
    site = _score(RepairSpec(cleft_mm=1.0))
    it = _item(site, "integration")
    assert it.points == 10 and "split-like" in it.category
    assert it.value > 50
    assert site.measures["cleft_width_mm"] <= 2.0
    wide = _item(_score(RepairSpec(cleft_mm=3.0)), "integration")
    assert wide.points == 0 and wide.value >= 50


@pytest.mark.parametrize("perm, flips", [((2, 0, 1), ()), ((0, 1, 2), (0, 2)),
                                         ((1, 2, 0), (1,))])
def test_reorientation_invariance(perm, flips):
    ph = make_repair_phantom(RepairSpec(fill=0.5, repair_ratio=1.3, bml_diameter_mm=4.0))
    ref = score_sites(ph["image"], ph["labels"], ph["sites"]).sites[0]
    img, g2 = reorient(ph["image"].array, ph["image"].geometry, perm, flips)
    lab, _ = reorient(ph["labels"], ph["image"].geometry, perm, flips)
    sit, _ = reorient(ph["sites"], ph["image"].geometry, perm, flips)
    got = score_sites(Volume(img, g2), lab, sit).sites[0]
    assert got.total == ref.total
    for a, b in zip(ref.items, got.items):
        assert (a.item, a.points, a.category) == (b.item, b.points, b.category)
        assert b.value == pytest.approx(a.value, rel=1e-3, abs=1e-3)


def test_sitespec_matches_mask():
    ph = make_repair_phantom(RepairSpec(fill=0.5))
    spec = SiteSpec(7, np.array([ph["truth"]["site_center_world"]]), 5.0)
    site = score_sites(ph["image"], ph["labels"], [spec]).sites[0]
    assert site.site_id == 7 and site.plate == "femoral_cartilage"
    assert _item(site, "volume_fill").points == 10


def test_site_outside_plate_and_small_site():
    ph = make_repair_phantom(RepairSpec())
    sites = ph["sites"].copy()
    sites[-3:, -3:, -3:] = 2             # a corner of the grid, in the joint space
    sites[tuple(np.argwhere(ph["sites"] == 1)[0])] = 0
    res = score_sites(ph["image"], ph["labels"], sites)
    assert [s.site_id for s in res.sites] == [1, 2]
    assert res.sites[0].total == 100
    out = res.sites[1]
    assert math.isnan(out.total) and "outside any cartilage plate" in out.notes[0]
    assert all(math.isnan(i.points) and i.confidence == "low" for i in out.items)
    tiny = SiteSpec(3, np.array([ph["truth"]["site_center_world"]]), 1.0)
    small = score_sites(ph["image"], ph["labels"], [tiny]).sites[0]
    assert any("site small" in r for i in small.items for r in i.confidence_reasons)


def test_configs_load_and_validate(tmp_path):
    c2 = load_scoring_config(None)
    assert [i.max_points for i in c2.items.values()] == [20, 15, 10, 10, 15, 10, 20]
    c1 = load_scoring_config(REPO / "configs" / "mocart1.yaml")
    assert len(c1.items) == 9 and c1.max_total_points == 100
    site = _score(RepairSpec(), config=c1)
    assert site.max_total == 90 and site.total == 90
    assert _item(site, "effusion").category.startswith("not assessed")
    bad = (REPO / "configs" / "mocart2.yaml").read_text().replace("max_points: 20",
                                                                  "max_points: 25", 1)
    p = tmp_path / "bad.yaml"
    p.write_text(bad)
    with pytest.raises(ConfigError, match="max_points"):
        load_config(p, ScoringConfig)


def _cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_default_sites_from_defects(tmp_path, capsys):
    ph = make_repair_phantom(RepairSpec(fill=0.5))
    scan = write_scan_folder(ph, tmp_path / "scan", defects=[
        {"id": 4, "area_mm2": math.pi * 25, "c": ph["truth"]["site_center_world"]}])
    assert _cli("score", scan, "-o", tmp_path / "out") == 0
    rows = _read_csv(tmp_path / "out" / "mocart.csv")
    assert list(rows[0]) == CSV_COLUMNS
    assert len(rows) == 8 and {r["site_id"] for r in rows} == {"4"}
    fill = next(r for r in rows if r["item"] == "volume_fill")
    assert fill["points"] == "10" and 45 <= float(fill["value"]) <= 60
    doc = json.loads((tmp_path / "out" / "mocart.json").read_text())
    ev = doc["sites"][0]["evidence"]
    assert ev["ring_area_mm2"] > 50 and ev["native_thickness_median_mm"] > 2
    assert doc["sites"][0]["items"][0]["confidence"] == "high"
    assert (tmp_path / "out" / "mocart_config.yaml").is_file()
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_cli_sites_mask_and_bad_geometry(tmp_path, capsys):
    ph = make_repair_phantom(RepairSpec())
    scan = write_scan_folder(ph, tmp_path / "scan")
    good = tmp_path / "sites.nii.gz"
    sites = ph["sites"].copy()
    sites[-3:, -3:, -3:] = 2             # site 2: a corner of the grid, off every plate
    write_volume(good, sites, ph["image"].geometry)
    assert _cli("score", scan, "--sites", good, "-o", tmp_path / "o1") == 0
    rows = _read_csv(tmp_path / "o1" / "mocart.csv")
    assert next(r for r in rows if r["item"] == "total")["points"] == "100"
    off = [r for r in rows if r["site_id"] == "2"]   # not measurable: empty cells, never "NaN"
    assert off and all(r["points"] == "" for r in off)
    assert "nan" not in (tmp_path / "o1" / "mocart.csv").read_text().lower()
    bad = tmp_path / "bad_sites.nii.gz"
    write_volume(bad, ph["sites"][:-1], _shrunk(ph["image"].geometry))
    capsys.readouterr()
    assert _cli("score", scan, "--sites", bad, "-o", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "bad_sites.nii.gz" in err and "shape" in err


def _shrunk(g):
    from cartiq.io.volume import Geometry

    return Geometry((g.shape[0] - 1,) + tuple(g.shape[1:]), g.spacing, g.origin, g.direction)


def test_cli_no_sites(tmp_path):
    ph = make_repair_phantom(RepairSpec())
    scan = write_scan_folder(ph, tmp_path / "scan")          # empty defects.csv
    assert _cli("score", scan, "-o", tmp_path / "out") == 0
    text = (tmp_path / "out" / "mocart.csv").read_text()
    assert text.strip() == ",".join(CSV_COLUMNS)
    doc = json.loads((tmp_path / "out" / "mocart.json").read_text())
    assert doc["sites"] == [] and "no repair sites" in doc["notes"][0]


def test_cli_not_a_scan_folder(tmp_path, capsys):
    assert _cli("score", tmp_path, "-o", tmp_path / "out") == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_project_phantom_measure_then_score(tmp_path):
    """End to end on the project's knee phantom: measure finds the defects, score grades them."""
    from cartiq.measurement.measure import run_measure
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    ph = make_phantom(PhantomSpec(seed=0))
    paths = write_phantom(ph, tmp_path / "ph")
    run_measure(paths["image"], paths["seg"], tmp_path / "scan")
    assert _cli("score", tmp_path / "scan", "-o", tmp_path / "out") == 0
    rows = _read_csv(tmp_path / "out" / "mocart.csv")
    by_site: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_site.setdefault(r["site_id"], {})[r["item"]] = r
    doc = json.loads((tmp_path / "out" / "mocart.json").read_text())
    plates = {str(s["site_id"]): s["plate"] for s in doc["sites"]}
    fem = [by_site[k] for k, p in plates.items() if p == "femoral_cartilage"]
    tib = [by_site[k] for k, p in plates.items() if p == "lateral_tibial_cartilage"]
    assert fem and tib
    # the femoral full-thickness defect is empty: no fill, BML (10 mm) under an 8 mm defect
    f = max(fem, key=lambda s: float(s["subchondral"]["value"]))
    assert f["volume_fill"]["points"] == "0" and float(f["volume_fill"]["value"]) < 15
    assert f["subchondral"]["category"].startswith("severe")
    assert f["bony_defect"]["points"] == "10"
    # the tibial partial defect keeps 40% of the thickness (depth fraction 0.6)
    t = min(tib, key=lambda s: float(s["volume_fill"]["value"]))
    assert 30 <= float(t["volume_fill"]["value"]) <= 50 and t["volume_fill"]["points"] == "5"


@pytest.mark.slow
def test_real_label_map_healthy_cartilage_scores_intact(data_mirror, tmp_path):
    """Sites placed on healthy cartilage of a real label map (pymskt DESS, right knee):
    the geometric items must not invent fill defects, clefts, surface or bone changes."""
    from scipy import ndimage

    from cartiq.data.fetch import fetch_sample
    from cartiq.io.volume import read_volume
    from cartiq.io.labels import default_scheme, load_mapping, to_default_scheme

    path = fetch_sample("pymskt_dess_labels", mirror=data_mirror, cache_dir=tmp_path)
    vol = read_volume(path, kind="labels")
    lab, _ = to_default_scheme(vol.array, load_mapping("pymskt_dess"), vol.geometry.affine)
    sc = default_scheme()
    rng = np.random.default_rng(0)
    specs = []
    for plate in ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage"):
        iface = (lab == sc[sc.plates[plate]]) & ndimage.binary_dilation(lab == sc[plate])
        idx = np.argwhere(iface)
        for ijk in idx[rng.choice(len(idx), 8, replace=False)]:
            specs.append(SiteSpec(len(specs) + 1, vol.geometry.index_to_world(ijk[None]), 4.0,
                                  plate=plate))
    res = score_sites(None, lab, specs, geometry=vol.geometry)
    interior = [s for s in res.sites if s.evidence["ring_coverage"] >= 0.85]
    assert len(interior) >= 6
    for s in interior:
        assert 80 <= s.measures["fill_pct"] <= 130
        assert _item(s, "bony_defect").points == 10
        assert _item(s, "surface").points == 10
        assert _item(s, "subchondral").points == 20
        assert math.isnan(_item(s, "signal").points)          # no image given
    assert np.mean([_item(s, "integration").points == 15 for s in interior]) >= 0.8


def test_cli_reoriented_files_same_scores(tmp_path):
    ph = make_repair_phantom(RepairSpec(fill=0.5, bml_diameter_mm=4.0))
    g = ph["image"].geometry
    img, g2 = reorient(ph["image"].array, g, (2, 0, 1), (1,))
    lab, _ = reorient(ph["labels"], g, (2, 0, 1), (1,))
    sit, _ = reorient(ph["sites"], g, (2, 0, 1), (1,))
    ph2 = {"image": Volume(img, g2), "labels": lab}
    tables = []
    for name, p, sites, geom in (("a", ph, ph["sites"], g), ("b", ph2, sit, g2)):
        scan = write_scan_folder(p, tmp_path / name)
        write_volume(tmp_path / f"{name}_sites.nii.gz", sites, geom)
        assert _cli("score", scan, "--sites", tmp_path / f"{name}_sites.nii.gz",
                    "-o", tmp_path / f"{name}_out") == 0
        tables.append(_read_csv(tmp_path / f"{name}_out" / "mocart.csv"))
    a, b = tables
    assert [(r["item"], r["points"], r["category"]) for r in a] == \
        [(r["item"], r["points"], r["category"]) for r in b]
    for ra, rb in zip(a, b):
        assert float(rb["value"]) == pytest.approx(float(ra["value"]), rel=1e-3, abs=1e-3)
