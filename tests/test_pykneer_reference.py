"""benchmarks/pykneer_reference.py: finding the frame of pyKNEEr's contour points.

The reference points are made here from a known band under a known axis permutation, flips
and shift, so the truth does not come from the code under test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import pykneer_reference as pr  # noqa: E402

SHAPE = (64, 56, 12)
SPACING = (0.3125, 0.3125, 1.5)


def _band() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An arc (130 degrees, not symmetric about any axis) 4 voxels thick in-plane over slices
    2-9, and the voxel centres of its inner (bone) and outer (articular) surfaces.  Along the
    slices it is the same arc, so a shift across the slices is a tie, which the fit breaks
    towards no shift (pyKNEEr's slices are the scan's)."""
    i, j, k = np.indices(SHAPE)
    r = np.hypot(i - 30.0, j - 30.0)
    angle = np.degrees(np.arctan2(j - 30.0, i - 30.0)) % 360
    mask = (r >= 12) & (r <= 16) & (angle >= 190) & (angle <= 320) & (k >= 2) & (k <= 9)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    edge = np.argwhere(mask & ~ndimage.binary_erosion(mask, in_plane))  # each slice's outline
    re = np.hypot(edge[:, 0] - 30.0, edge[:, 1] - 30.0)
    return mask, edge[re < 12.5], edge[re > 15.5]


def _to_pykneer(idx: np.ndarray, perm, flips, shift) -> np.ndarray:
    """Voxel indices -> pyKNEEr coordinates whose frame is off by ``shift`` voxels."""
    return pr._frame(idx - np.asarray(shift), SHAPE, SPACING, perm, flips)


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (-1.25, 0.5, 0.0)])
def test_align_recovers_permutation_flips_and_shift(shift):
    mask, inner, outer = _band()
    perm, flips = (1, 0, 2), (False, True, False)
    points = _to_pykneer(np.vstack([inner, outer]).astype(float), perm, flips, shift)
    frame = pr.align(pr.boundary(mask), SHAPE, SPACING, points)
    assert frame["perm"] == perm and frame["flips"] == flips
    assert frame["shift_voxels"] == pytest.approx(shift)
    assert frame["median_mm"] == pytest.approx(0.0, abs=1e-9)
    if any(shift):
        assert frame["unshifted_median_mm"] > 0.1


def test_compare_gives_full_overlap_once_the_shift_is_found(tmp_path):
    nib = pytest.importorskip("nibabel")
    mask, inner, outer = _band()
    labels = np.where(mask, 4, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, np.diag([*SPACING, 1.0])), tmp_path / "segmentation.nii.gz")
    ref = tmp_path / "ref"
    ref.mkdir()
    perm, flips, shift = (0, 1, 2), (False, True, False), (1.0, 1.0, 0.0)
    np.savetxt(ref / f"{pr.PREFIX}boneCart.txt", _to_pykneer(inner.astype(float), perm, flips, shift))
    np.savetxt(ref / f"{pr.PREFIX}artiCart.txt", _to_pykneer(outer.astype(float), perm, flips, shift))
    np.savetxt(ref / f"{pr.PREFIX}thickness_1.txt", np.full(len(inner), 1.25))
    np.savetxt(ref / f"{pr.PREFIX}volume.txt", [float(mask.sum()) * np.prod(SPACING)])

    out = pr.compare(tmp_path / "segmentation.nii.gz", ref)
    assert out["frame"]["shift_voxels"] == [1.0, 1.0, 0.0]
    # the band rebuilt from the contours (segments between nearest surface points) misses a
    # few voxels at the arc's ends and corners: 0.878 here
    assert out["dice_vs_band"] > 0.85
    assert out["pykneer_surface_to_cartiq_boundary_mm"]["median"] == pytest.approx(0.0)

    # the same points read without the shift overlap far less
    frame = {"perm": perm, "flips": flips}
    band = pr.band_mask(pr.load_reference(ref), SHAPE, SPACING, frame)
    unshifted = 2 * (band & mask).sum() / (band.sum() + mask.sum())
    assert unshifted < out["dice_vs_band"] - 0.1  # 0.66 here


def test_disagreement_splits_far_cartilage_by_the_slices_pykneer_covers():
    """Two known blocks of cartiq-only cartilage far (> 2 mm) from the band: one on a slice
    the band covers, one on a slice it does not; the split and the per-slice volumes are the
    blocks' own voxel counts times the voxel volume."""
    band, _, _ = _band()  # slices 2-9
    ours = band.copy()
    ours[2:6, 50:54, 5] = True    # 16 voxels on a covered slice, > 10 mm from the arc
    ours[2:5, 50:54, 11] = True   # 12 voxels on slice 11, which the band does not cover
    vox = float(np.prod(SPACING))
    out = pr.disagreement(ours, band, np.zeros(SHAPE, bool), SPACING,
                          pr._distance_to(band, SPACING))
    only = out["cartiq_only_mm3"]
    assert only["within_1mm"] == 0 and only["1_to_2mm"] == 0
    assert only["beyond_2mm"] == round(28 * vox)
    assert only["beyond_2mm_on_slices_without_pykneer"] == round(12 * vox)
    assert out["cartiq_only_beyond_2mm_by_slice_mm3"] == {5: round(16 * vox), 11: round(12 * vox)}
    assert out["pykneer_only_mm3"] == 0


def test_overlay_shows_the_slices_with_the_most_far_cartilage(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("matplotlib")
    band, _, _ = _band()
    far = np.zeros(SHAPE, bool)
    far[2:6, 50:54, 5] = True   # 16 voxels
    far[2:5, 50:54, 11] = True  # 12
    far[2, 50, 3] = True        # 1
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(SHAPE).astype(np.float32),
                             np.diag([*SPACING, 1.0])), scan)
    png = tmp_path / "far.png"
    assert pr.overlay(png, scan, band | far, band, far, axis=2, n=2) == [5, 11]
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit, match="shape"):
        pr.overlay(png, scan, band[:, :, :6], band[:, :, :6], far[:, :, :6], axis=2)
