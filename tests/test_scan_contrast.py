"""benchmarks/scan_contrast.py: grey levels of a scan by structure (the cartilage/fluid
ratio the renderer's DESS setting is drawn from)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cartiq.io.labels import default_scheme
from cartiq.io.volume import Geometry, write_volume

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import scan_contrast as sc  # noqa: E402

S = default_scheme()


def _scan(slice_axis: int = 2):
    """Bone, a 4-voxel femoral plate, a 2-voxel fluid film on it, dark background; slices
    along ``slice_axis``."""
    lab = np.zeros((40, 40, 12), np.uint8)
    lab[:, :14, :] = S["femur"]
    lab[5:35, 14:18, :] = S["femoral_cartilage"]
    img = np.full(lab.shape, 100.0)                 # background
    img[lab == S["femur"]] = 50.0
    img[lab == S["femoral_cartilage"]] = 420.0
    img[5:35, 18:20, :] = 1000.0                    # the film: background in the labels
    img[0, 0, 0], img[-1, -1, -1] = 0.0, 1000.0     # the percentile ends
    if slice_axis != 2:
        lab, img = np.moveaxis(lab, 2, slice_axis), np.moveaxis(img, 2, slice_axis)
    return img, lab


def test_core_fluid_and_ratio_are_the_drawn_grey_levels():
    img, lab = _scan()
    names = {int(v): n for n, v in S.labels.items()}
    res = sc.grey_levels(img, lab, names, slice_axis=2)
    lo, hi = np.percentile(img, [0.5, 99.5])
    cart, fluid = (420 - lo) / (hi - lo), 1.0
    assert abs(res["cartilage_core"]["median"] - round(cart, 3)) < 2e-3
    assert res["fluid"]["median"] == fluid
    assert abs(res["cartilage_fluid_ratio"] - cart / fluid) < 3e-3
    # the film lies on the plate's articular face: the first ring is mostly fluid
    assert res["background_first_ring"]["median"] == fluid
    assert res["per_label"]["femur"]["median"] < res["per_label"]["background"]["median"]


def test_the_slice_axis_only_changes_which_axis_is_not_eroded():
    img, lab = _scan(slice_axis=0)
    names = {int(v): n for n, v in S.labels.items()}
    a = sc.grey_levels(img, lab, names, slice_axis=0)
    b = sc.grey_levels(*_scan(), names, slice_axis=2)
    assert a == b


def test_cli_writes_the_figures(tmp_path):
    img, lab = _scan()
    g = Geometry(lab.shape, (0.3, 0.3, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(tmp_path / "img.nii.gz", img.astype(np.float32), g)
    write_volume(tmp_path / "seg.nii.gz", lab, g)
    out = tmp_path / "c.json"
    subprocess.run([sys.executable, str(BENCH / "scan_contrast.py"), str(tmp_path / "img.nii.gz"),
                    str(tmp_path / "seg.nii.gz"), "--json", str(out)], check=True,
                   capture_output=True)
    assert json.loads(out.read_text())["fluid"]["median"] == 1.0


def test_a_segmentation_on_another_grid_or_without_plates_gives_no_figures(tmp_path):
    img, lab = _scan()
    g = Geometry(lab.shape, (0.3, 0.3, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    moved = Geometry(lab.shape, (0.3, 0.3, 1.5), (0.0, 3.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(tmp_path / "img.nii.gz", img.astype(np.float32), g)
    write_volume(tmp_path / "moved.nii.gz", lab, moved)
    write_volume(tmp_path / "bare.nii.gz", np.where(lab == S["femoral_cartilage"], 0, lab), g)
    for name, problem in (("moved", "origin"), ("bare", "no cartilage plate")):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(BENCH / "scan_contrast.py"),
                            str(tmp_path / "img.nii.gz"), str(tmp_path / f"{name}.nii.gz"),
                            "--json", str(out)], capture_output=True, text=True)
        assert r.returncode != 0 and problem in r.stderr, r.stderr
        assert not out.exists()
