"""Intensity-based BML detector: planted bright blobs in a bone, noise, modes."""

from __future__ import annotations

import numpy as np
import pytest

from cartiq.segmentation.bml import BMLConfig, apply_bml, detect_bml, load_bml_config
from cartiq.errors import ConfigError
from cartiq.io.labels import default_scheme

S = default_scheme()


def _scene(spacing, blob_radius_mm=5.0, blob_gain=150.0, seed=0, blob_center=(38, 30, 30)):
    shape = tuple(int(round(60 / s)) for s in spacing)
    axes = [np.arange(n) * d for n, d in zip(shape, spacing)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    lab = np.zeros(shape, np.uint8)
    lab[((g - np.array([30.0, 30, 30])) ** 2).sum(-1) < 20 ** 2] = S["femur"]
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 10, shape).astype(np.float32)
    img[lab == 0] = rng.normal(40, 10, int((lab == 0).sum()))
    blob = ((g - np.array(blob_center, float)) ** 2).sum(-1) < blob_radius_mm ** 2
    img[blob] += blob_gain
    return img, lab, blob


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.4, 0.4, 0.8), (0.8, 0.35, 0.5)])
def test_planted_blob_volume_within_10_percent(spacing):
    img, lab, blob = _scene(spacing)
    found = detect_bml(img, lab, spacing, load_bml_config())
    vox = float(np.prod(spacing))
    true = 4 / 3 * np.pi * 5.0 ** 3
    assert found.sum() * vox == pytest.approx(true, rel=0.10)
    # and it is the blob, not somewhere else
    assert (found & blob).sum() / found.sum() > 0.9


def test_noise_only_bone_gives_nothing():
    img, lab, _ = _scene((0.5, 0.5, 0.5), blob_gain=0.0, seed=3)
    assert detect_bml(img, lab, (0.5, 0.5, 0.5)).sum() == 0


def test_blob_outside_bone_and_tiny_blob_ignored():
    sp = (0.5, 0.5, 0.5)
    img, lab, _ = _scene(sp, blob_center=(55, 55, 55))  # outside the bone sphere
    assert detect_bml(img, lab, sp).sum() == 0
    img, lab, _ = _scene(sp, blob_radius_mm=1.2)  # ~7 mm3 < min_lesion_volume_mm3
    assert detect_bml(img, lab, sp).sum() == 0
    cfg = BMLConfig(min_lesion_volume_mm3=1.0, smoothing_sigma_mm=0.0, threshold_sigma=4.0)
    assert detect_bml(img, lab, sp, cfg).sum() > 0


def test_apply_bml_modes():
    sp = (0.5, 0.5, 0.5)
    img, lab, blob = _scene(sp)
    fake = lab.copy()
    fake[40:44, 60:64, 60:64] = S["bone_marrow_lesion"]  # a model BML far from the blob
    assert (lab[40:44, 60:64, 60:64] == S["femur"]).all()
    model = apply_bml(fake, img, sp, "model")
    assert np.array_equal(model, fake)
    inten = apply_bml(fake, img, sp, "intensity")
    assert not (inten[40:44, 60:64, 60:64] == S["bone_marrow_lesion"]).any()
    assert ((inten == S["bone_marrow_lesion"]) & blob).sum() > 0.8 * blob.sum()
    both = apply_bml(fake, img, sp, "both")
    assert (both == S["bone_marrow_lesion"]).sum() > (inten == S["bone_marrow_lesion"]).sum()
    with pytest.raises(ValueError):
        apply_bml(fake, img, sp, "magic")


def test_config_file_is_validated(tmp_path):
    assert load_bml_config().min_lesion_volume_mm3 == 20.0
    bad = tmp_path / "bml.yaml"
    bad.write_text("threshold_sigma: -1\n")
    with pytest.raises(ConfigError):
        load_bml_config(bad)
