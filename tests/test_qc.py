"""QC flags, slice-view orientation, plate-map projections and qc.png on the phantom."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest

from cartiq.io.volume import Geometry
from cartiq.io.labels import default_scheme
from cartiq.measurement.qc import QCConfig, load_qc_config, qc_checks, registration_flag, write_qc
from cartiq.measurement.qc_ranges import PlausibleRanges
from cartiq.measurement.qc_maps import Projector, _plane, plate_map_from_points, plate_views, projector_for

S = default_scheme()
SPACING = (0.8, 0.8, 1.5)


@pytest.fixture(scope="module")
def phantom():
    from cartiq.data.phantom import PhantomSpec, make_phantom

    return make_phantom(PhantomSpec(seed=3, spacing_mm=SPACING))


@pytest.fixture(scope="module")
def measured(phantom, tmp_path_factory):
    from cartiq.measurement.measure import run_measure
    from cartiq.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("qc")
    paths = write_phantom(phantom, root / "in")
    return run_measure(paths["image"], paths["seg"], root / "out")


def codes(flags, structure=None):
    return sorted(f.code for f in flags if structure is None or f.structure == structure)


# ------------------------------------------------------------------------- flags


def test_clean_phantom_has_no_flags(phantom):
    lab, g = phantom.labels.array, phantom.labels.geometry
    assert qc_checks(lab, g, side=phantom.truth.get("side", "right")) == []


def test_empty_and_tiny_plates(phantom):
    lab = phantom.labels.array.copy()
    g = phantom.labels.geometry
    lab[lab == S["patellar_cartilage"]] = 0
    med = np.argwhere(lab == S["medial_tibial_cartilage"])
    lab[tuple(med[20:].T)] = 0  # 20 voxels left
    flags = qc_checks(lab, g)
    empty = [f for f in flags if f.code == "plate_empty"]
    assert [f.structure for f in empty] == ["patellar_cartilage"] and empty[0].severity == "error"
    small = [f for f in flags if f.code == "plate_small"]
    assert [f.structure for f in small] == ["medial_tibial_cartilage"]
    assert small[0].value == pytest.approx(20 * g.voxel_volume_mm3)


def test_swapped_tibial_plates_and_wrong_side(phantom):
    lab = phantom.labels.array.copy()
    med, lat = lab == S["medial_tibial_cartilage"], lab == S["lateral_tibial_cartilage"]
    lab[med], lab[lat] = S["lateral_tibial_cartilage"], S["medial_tibial_cartilage"]
    flags = qc_checks(lab, phantom.labels.geometry, side="right")
    assert codes(flags) == ["position"]
    assert flags[0].structure == "lateral_tibial_cartilage"
    # the original labels are fine for a right knee but not for a left one
    assert codes(qc_checks(phantom.labels.array, phantom.labels.geometry, side="left")) == ["position"]


def test_cartilage_away_from_bone(phantom):
    lab = phantom.labels.array.copy()
    g = phantom.labels.geometry
    pc = lab == S["patellar_cartilage"]
    lab[pc] = 0
    shift = int(np.ceil(15 / g.spacing[0]))
    lab[np.roll(pc, shift, axis=0) & (lab == 0)] = S["patellar_cartilage"]
    flags = [f for f in qc_checks(lab, g) if f.code == "not_adjacent"]
    assert [f.structure for f in flags] == ["patellar_cartilage"]
    assert flags[0].severity == "error"


def test_border_and_bml_outside_bone(phantom):
    lab = phantom.labels.array.copy()
    lab[0, 5:12, 3] = S["femoral_cartilage"]  # 7 voxels on the i=0 face
    lab[-3:, -3:, -3:] = S["bone_marrow_lesion"]  # in the air, touching the border
    flags = qc_checks(lab, phantom.labels.geometry)
    border = {f.structure: f.value for f in flags if f.code == "border"}
    assert border["femoral_cartilage"] == 7
    assert border["bone_marrow_lesion"] == 3 * 3 * 3 - 8  # voxels on the outer faces
    assert any(f.code == "not_adjacent" and f.structure == "bone_marrow_lesion" for f in flags)


def test_thickness_out_of_range(phantom):
    lab, g = phantom.labels.array, phantom.labels.geometry
    thick = np.where(lab == S["femoral_cartilage"], 6.0, 0.0).astype(np.float32)
    thick[lab == S["medial_tibial_cartilage"]] = 2.0
    flags = qc_checks(lab, g, thickness=thick)
    tr = [f for f in flags if f.code == "thickness_range"]
    assert [f.structure for f in tr] == ["femoral_cartilage"] and tr[0].value == pytest.approx(6.0)
    assert tr[0].severity == "error"
    cfg = QCConfig(plausible=PlausibleRanges(mean_thickness_mm={"femoral_cartilage": (1.0, 7.0)}))
    assert not [f for f in qc_checks(lab, g, thickness=thick, config=cfg) if f.code == "thickness_range"]


def test_registration_flag():
    assert registration_flag(0.4) == []
    assert registration_flag(float("nan")) == []
    (f,) = registration_flag(1.7)
    assert f.code == "registration" and f.value == pytest.approx(1.7)
    assert registration_flag(1.7, QCConfig(max_registration_residual_mm=2.0)) == []


# ------------------------------------------------------------------------- views / maps


def _directions():
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for a, (w, s) in enumerate(zip(perm, signs)):
                m[w, a] = s
            out.append(m)
    return out[::5]  # a spread of permutations and flips


@pytest.mark.parametrize("m", _directions())
def test_views_are_radiological(m):
    """Top = superior (axial: anterior), left = patient right (sagittal: anterior)."""
    g = Geometry(shape=(6, 7, 8), spacing=(1.0, 0.5, 2.0), origin=(3.0, -2.0, 1.0),
                 direction=tuple(m.ravel()))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1).reshape(-1, 3)
    world = g.index_to_world(idx).reshape(*g.shape, 3)
    views = {v.name: v for v in plate_views(g)}
    assert set(views) == {"sagittal", "coronal", "axial"}
    for name, (vert, vsign, horiz) in {"sagittal": (2, -1, 1), "coronal": (2, -1, 0),
                                       "axial": (1, 1, 0)}.items():
        v = views[name]
        pv = _plane(world[..., vert], v, 1)
        ph = _plane(world[..., horiz], v, 1)
        assert np.all(np.sign(np.diff(pv, axis=0)) == vsign)  # down the rows
        assert np.all(np.diff(ph, axis=1) > 0)  # left to right: R->L (x) or A->P (y)


def test_femur_projector_angles_and_centre():
    rng = np.random.default_rng(0)
    ang = np.radians(rng.uniform(-30, 200, 400))  # anterior .. past posterior
    y0, z0, r = 5.0, -12.0, 21.0
    pts = np.column_stack([rng.uniform(-20, 20, 400), y0 - r * np.cos(ang), z0 - r * np.sin(ang)])
    proj = projector_for("femoral_cartilage", pts)
    assert proj.centre_yz == pytest.approx((y0, z0), abs=1e-6)
    _, deg = proj(np.array([[0, y0 - r, z0], [0, y0, z0 - r], [0, y0 + r, z0]]))
    assert deg == pytest.approx([0.0, 90.0, 180.0])


def test_plate_map_bins_mean_and_gap_fill():
    xs, ys = np.meshgrid(np.arange(0.25, 20, 0.5), np.arange(0.25, 10, 0.5), indexing="ij")
    pts = np.column_stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)])
    vals = 1.0 + 0.1 * (pts[:, 0] > 10)
    vals[(np.abs(pts[:, 0] - 5.25) < 0.3) & (np.abs(pts[:, 1] - 5.25) < 0.3)] = np.nan  # a hole
    pm = plate_map_from_points("medial_tibial_cartilage", pts, vals, Projector("axial"), bin_mm=1.0)
    inner = pm.grid[np.isfinite(pm.grid)]
    assert set(np.round(np.unique(inner), 6)) <= {1.0, 1.1, 1.05}
    assert np.isfinite(pm.grid).sum() == 20 * 10  # 1 mm bins over 20 x 10 mm, hole filled


# ------------------------------------------------------------------------- files


@pytest.mark.slow
def test_write_qc_on_measured_phantom(measured):
    out = measured.out_dir
    qc = measured.manifest["qc"]
    assert qc["status"] == "pass" and qc["figure"] == "qc.png" and qc["figure_errors"] == []
    from matplotlib.image import imread

    img = imread(out / "qc.png")
    assert img.shape[0] > 800 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.1  # not blank
    assert json.loads((out / "manifest.json").read_text())["qc"]["n_flags"] == 0
    # from the files alone, with a residual above the limit
    again = write_qc(out, registration_residual_mm=2.5)
    assert [f.code for f in again.flags] == ["registration"] and again.status == "warn"


@pytest.mark.slow
def test_image_on_another_grid_is_said_once(measured, caplog):
    """An image that is not on the segmentation's grid cannot feed the image checks or the
    figure; write_qc says so in one warning line instead of skipping silently."""
    from cartiq.io.volume import Volume, read_volume

    g = read_volume(measured.out_dir / "segmentation.nii.gz", kind="labels").geometry
    half = Geometry(tuple(s // 2 for s in g.shape), tuple(2 * s for s in g.spacing), g.origin,
                    g.direction)
    coarse = Volume(np.zeros(half.shape, np.float32), half)
    with caplog.at_level(logging.WARNING, logger="cartiq.measurement.qc"):
        write_qc(measured.out_dir, image=coarse, figure=False)
    lines = [r.getMessage() for r in caplog.records if "not on the segmentation's grid" in r.getMessage()]
    assert len(lines) == 1 and "bone_grey" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cartiq.measurement.qc"):
        write_qc(measured.out_dir, figure=False)
    assert not [r for r in caplog.records if "segmentation's grid" in r.getMessage()]


def test_patella_in_pieces_is_flagged(phantom):
    """A patella drawn in part (what a 0.4 mm model drew on the real qDESS: 4,069 mm3 of a
    patella the default model draws at 11,901) is a warning; the whole one is not."""
    labels, g = phantom.labels.array.copy(), phantom.labels.geometry
    s = default_scheme()
    assert "bone_small" not in codes(qc_checks(labels, g, side="right"))
    pat = np.argwhere(labels == s["patella"])
    keep = int(QCConfig().min_bone_volume_mm3["patella"] / g.voxel_volume_mm3) - 1
    cut = pat[np.argsort(pat[:, 2])][keep:]  # all but the lowest slab of the patella
    labels[tuple(cut.T)] = 0
    flags = [f for f in qc_checks(labels, g, side="right") if f.code == "bone_small"]
    assert [(f.severity, f.structure) for f in flags] == [("warning", "patella")]
    assert flags[0].value < 8000.0 and "pieces" in flags[0].message
    off = QCConfig(min_bone_volume_mm3={})
    assert "bone_small" not in codes(qc_checks(labels, g, side="right", config=off))


def test_measured_result_carries_the_plate_boxes(phantom):
    """QC reuses the measurement's plate boxes; they must be those of the label map, and
    QC on the result gives the flags it gives on the label map alone."""
    from cartiq.io.labels import plate_boxes
    from cartiq.measurement.measure import measure_labels

    labels, g = phantom.labels.array.copy(), phantom.labels.geometry
    labels[labels == default_scheme()["patellar_cartilage"]] = 0  # an absent plate too
    result = measure_labels(labels, g, side="right")
    assert result.plate_boxes == plate_boxes(labels)
    assert result.plate_boxes["patellar_cartilage"] is None
    assert result.plate_boxes["femoral_cartilage"] is not None
    assert codes(qc_checks(labels, g, side="right", result=result)) \
        == codes(qc_checks(labels, g, side="right")) == ["plate_empty"]


@pytest.mark.slow
def test_plot_failure_keeps_flags(measured, monkeypatch):
    import cartiq.measurement.qc as qc_mod

    def boom(*a, **k):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(qc_mod, "_qc_figure", boom)
    res = write_qc(measured.out_dir, registration_residual_mm=3.0)
    assert res.figure is None and res.errors == ["RuntimeError: no canvas"]
    assert res.to_json()["flags"][0]["code"] == "registration"


@pytest.mark.slow
@pytest.mark.parametrize("sample,mapping,side", [("pymskt_dess_labels", "pymskt_dess", "right"),
                                                 ("spl_knee_atlas_labels", "spl_knee_atlas", "left")])
def test_real_label_maps_pass_and_swaps_are_caught(data_mirror, tmp_path, sample, mapping, side):
    """Real expert label maps raise no flag; swapping their tibial plates is caught."""
    from cartiq.data.fetch import fetch_sample
    from cartiq.io.volume import read_volume
    from cartiq.io.labels import load_mapping, to_default_scheme

    vol = read_volume(fetch_sample(sample, mirror=data_mirror, cache_dir=tmp_path), kind="labels")
    lab, info = to_default_scheme(vol.array, load_mapping(mapping), vol.geometry.affine)
    assert info["side"] == side
    assert qc_checks(lab, vol.geometry, side=side) == []
    wrong = qc_checks(lab, vol.geometry, side="left" if side == "right" else "right")
    assert [(f.code, f.structure) for f in wrong] == [("position", "lateral_tibial_cartilage")]


def test_very_oblique_grid_shown_as_stored():
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])  # i and j 40 deg from x and y
    g = Geometry(shape=(4, 5, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                 direction=tuple(m.ravel()))
    views = plate_views(g)
    assert [v.name for v in views] == ["plane i", "plane j", "plane k"]
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert np.array_equal(_plane(vol, views[2], 3), vol[:, :, 3])
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))  # 30 deg: still named
    m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    g30 = Geometry(shape=(4, 5, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                   direction=tuple(m.ravel()))
    assert [v.name for v in plate_views(g30)] == ["sagittal", "coronal", "axial"]


def _csv_rows(path):
    import csv

    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_cartiq_qc_rechecks_and_updates_the_record(phantom, tmp_path):
    """`cartiq qc` with other limits: the folder stays complete and every place that
    carries the status (manifest, measurements.csv, qc.png) says the new one."""
    import yaml

    from _cli import assert_one_line_error, run_cartiq
    from cartiq.data.phantom import write_phantom
    from cartiq.io.outputs import why_incomplete
    from cartiq.measurement.measure import run_measure

    paths = write_phantom(phantom, tmp_path / "in")
    scan = run_measure(paths["image"], paths["seg"], tmp_path / "scan").out_dir
    before = _csv_rows(scan / "measurements.csv")
    assert {r["qc_status"] for r in before} == {"pass"}
    fem = next(float(r["value"]) for r in before if r["structure"] == "femoral_cartilage"
               and r["region"] == "all" and r["metric"] == "volume")
    strict = load_qc_config().model_dump(mode="json")
    strict["plausible"]["plate_volume_mm3"]["femoral_cartilage"] = [fem / 4, fem / 2]
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(strict))

    res = run_cartiq("qc", scan, "--config", tmp_path / "strict.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].startswith("fail")
    assert why_incomplete(scan) is None  # qc.png and the CSV are listed with their new hashes
    m = json.loads((scan / "manifest.json").read_text())
    assert m["qc"]["status"] == "fail" and m["qc"]["figure"] == "qc.png"
    assert [f["code"] for f in m["qc"]["flags"]] == ["plate_volume"]
    assert m["qc"]["rechecked"]["config"] == str((tmp_path / "strict.yaml").resolve())
    after = _csv_rows(scan / "measurements.csv")
    assert {r["qc_status"] for r in after} == {"fail"}
    assert [{**r, "qc_status": ""} for r in after] == [{**r, "qc_status": ""} for r in before]
    used = yaml.safe_load((scan / "qc_config.yaml").read_text())
    assert used["plausible"]["plate_volume_mm3"]["femoral_cartilage"] == [fem / 4, fem / 2]

    # back to the default limits, with a registration residual over the limit: warn
    res = run_cartiq("qc", scan, "--registration-residual", "2.5")
    assert res.returncode == 0, res.stderr
    m = json.loads((scan / "manifest.json").read_text())
    assert m["qc"]["status"] == "warn" and m["qc"]["rechecked"]["config"] == "default"
    assert {r["qc_status"] for r in _csv_rows(scan / "measurements.csv")} == {"warn"}
    assert why_incomplete(scan) is None

    # a bad limits file: one line, exit 2, the folder untouched
    (tmp_path / "bad.yaml").write_text("max_thickness_mm: -3\n")
    snapshot = (scan / "manifest.json").read_bytes()
    assert_one_line_error(run_cartiq("qc", scan, "--config", tmp_path / "bad.yaml"),
                          "bad.yaml", "max_thickness_mm")
    assert (scan / "manifest.json").read_bytes() == snapshot and why_incomplete(scan) is None

    # a damaged folder is not rechecked
    (scan / "defects.csv").write_text("tampered\n")
    assert_one_line_error(run_cartiq("qc", scan), "not a complete cartiq output folder",
                          "defects.csv")


def test_recheck_draws_the_figure_with_image_and_side(phantom, tmp_path, monkeypatch):
    """The rechecked qc.png is drawn over the scan's image, with its side, like the first."""
    import cartiq.measurement.qc as qc_mod
    from cartiq.data.phantom import write_phantom
    from cartiq.io.outputs import why_incomplete
    from cartiq.measurement.measure import run_measure

    paths = write_phantom(phantom, tmp_path / "in")
    scan = run_measure(paths["image"], paths["seg"], tmp_path / "scan").out_dir
    seen = {}
    original = qc_mod._qc_figure

    def spy(path, labels, geometry, image, maps, defects, lesions, flags, side, cfg, **kw):
        seen.update(image=image, side=side, maps=set(maps))
        return original(path, labels, geometry, image, maps, defects, lesions, flags, side,
                        cfg, **kw)

    monkeypatch.setattr(qc_mod, "_qc_figure", spy)
    res = qc_mod.recheck_qc(scan, registration_residual_mm=2.5)
    assert res.status == "warn" and res.errors == []
    assert seen["image"] is not None and seen["image"].array.shape == phantom.image.array.shape
    assert seen["side"] == "right" and "femoral_cartilage" in seen["maps"]
    assert why_incomplete(scan) is None
