"""`cartiq segment` / `cartiq run` on scans far outside the models' input range, and on a
model package with a wrong checksum: one clear line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cartiq.errors import InputError
from cartiq.io.volume import Geometry, Volume, sha256_file, write_volume
from cartiq.segmentation.segmenter import (MAX_SLICE_SPACING_MM, check_knee_found,
                                           check_knee_like, segment_file)
from _cli import assert_one_line_error as _one_line_error
from _cli import run_cartiq as _cartiq

EYE = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def _nothing_written(out: Path):
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def _noise(shape, spacing):
    rng = np.random.default_rng(0)
    return Volume(rng.normal(100, 10, shape).astype(np.float32),
                  Geometry(shape, spacing, (0.0, 0.0, 0.0), EYE))


def test_voxel_sizes_far_outside_the_model_range_are_rejected():
    with pytest.raises(InputError, match=r"slice spacing 7.0 mm is far outside"):
        check_knee_like(_noise((200, 200, 20), (0.6, 0.6, 7.0)))
    with pytest.raises(InputError, match=r"in-plane spacing \[2.5, 2.5\] mm"):
        check_knee_like(_noise((60, 60, 60), (2.5, 2.5, 2.5)))
    # the real MESE's geometry (0.625 mm, 4 mm slice spacing) and 6 mm slices are accepted
    check_knee_like(_noise((256, 256, 24), (0.625, 0.625, 4.0)))
    check_knee_like(_noise((256, 256, 16), (0.625, 0.625, MAX_SLICE_SPACING_MM)))


def test_no_knee_in_the_segmentation_is_rejected():
    from cartiq.data.phantom import PhantomSpec, make_phantom
    from cartiq.io.labels import default_scheme

    ph = make_phantom(PhantomSpec(seed=1, spacing_mm=(1.0, 1.0, 2.0)))
    check_knee_found(ph.labels.array, ph.labels.geometry)
    lab = ph.labels.array.copy()
    lab[lab == default_scheme()["tibia"]] = 0
    with pytest.raises(InputError, match=r"no knee found in the field of view .*tibia 0.0 ml"):
        check_knee_found(lab, ph.labels.geometry, "scan.nii.gz")


@pytest.mark.parametrize("kind", ["2d", "4d", "thick_slices", "dicom_single"])
@pytest.mark.parametrize("command", ["segment", "run"])
def test_bad_scans_one_line_exit_2_nothing_written(tmp_path, kind, command, request):
    import nibabel as nib

    if kind == "2d":
        img = tmp_path / "slice.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(200, 200).astype("f4"), np.eye(4)), img)
        needles = ("slice.nii.gz", "2D")
    elif kind == "4d":
        img = tmp_path / "series.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(40, 40, 20, 3).astype("f4"), np.eye(4)), img)
        needles = ("series.nii.gz", "4D")
    elif kind == "thick_slices":
        vol = _noise((200, 200, 20), (0.6, 0.6, 8.0))
        img = write_volume(tmp_path / "thick.nii.gz", vol.array, vol.geometry)
        needles = ("thick.nii.gz", "slice spacing 8.0 mm")
    else:
        mirror = request.getfixturevalue("data_mirror")
        img = mirror / "dicom_single"
        if not img.is_dir():
            pytest.skip("no dicom_single sample")
        needles = ("dicom_single", "3D")
    out = tmp_path / "out"
    res = _cartiq(command, img, "-o", out, "--side", "right", "--device", "cpu")
    _one_line_error(res, *needles)
    _nothing_written(out)


def test_field_of_view_without_a_knee_exits_2_nothing_written(tmp_path, monkeypatch):
    """The model finds no femur/tibia: one line, exit 2, no output folder content."""
    from cartiq.cli import main
    from cartiq.segmentation import segmenter as seg_mod

    vol = _noise((100, 100, 40), (1.0, 1.0, 2.0))
    img = write_volume(tmp_path / "brain.nii.gz", vol.array, vol.geometry)

    class Empty:
        def run(self, volume, **kw):
            return seg_mod.SegmentResult(np.zeros(volume.array.shape, np.uint8),
                                         {"model": {}, "device": "cpu", "amp": False,
                                          "warnings": [], "timings_s": {}})

    out = tmp_path / "out"
    with pytest.raises(InputError, match="no knee found"):
        segment_file(img, out, segmenter=Empty(), side="right")
    _nothing_written(out)
    monkeypatch.setattr(seg_mod, "Segmenter", lambda *a, **k: Empty())
    for command in ("segment", "run"):
        with pytest.raises(SystemExit) as exc:
            main([command, str(img), "-o", str(out), "--side", "right"])
        assert exc.value.code == 2
        _nothing_written(out)


def test_model_package_with_wrong_checksum_names_the_file(tmp_path):
    import torch

    from cartiq.segmentation.models import NetworkSpec, build_network
    from cartiq.segmentation.synth import MODEL_CLASSES

    spec = {"name": "UNet", "spatial_dims": 2, "in_channels": 1,
            "out_channels": len(MODEL_CLASSES),
            "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}}
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    torch.save(build_network(NetworkSpec(**spec)).state_dict(), pkg / "model.pt")
    good = sha256_file(pkg / "model.pt")
    meta = {"name": "tiny", "network": spec,
            "labels": {i: n for i, n in enumerate(MODEL_CLASSES) if n != "background"},
            "input": {"spacing_mm": [1.0, 1.0, 1.0], "patch_size": [32, 32]},
            "weights_sha256": "0" * 64}
    (pkg / "metadata.json").write_text(json.dumps(meta))
    from cartiq.data.phantom import PhantomSpec, make_phantom

    ph = make_phantom(PhantomSpec(seed=1, spacing_mm=(1.0, 1.0, 2.0)))
    img = write_volume(tmp_path / "knee.nii.gz", ph.image.array, ph.image.geometry)
    out = tmp_path / "out"
    for command in ("segment", "run"):
        res = _cartiq(command, img, "-o", out, "--model", pkg, "--side", "right",
                      "--device", "cpu")
        _one_line_error(res, str(pkg / "model.pt"), "sha256 mismatch", good[:12])
        _nothing_written(out)
