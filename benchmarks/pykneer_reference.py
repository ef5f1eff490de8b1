"""Femoral cartilage of a segmentation of the real pyKNEEr qDESS against pyKNEEr's own result.

    python benchmarks/pykneer_reference.py SEGMENTATION [--mirror DIR] [--json OUT] \
        [--figure PNG --scan ECHO1_FOLDER]

SEGMENTATION is the ``segmentation.nii.gz`` that ``cartiq run`` wrote for the sample
``pykneer_qdess`` (echo 1), on that scan's own grid.  The reference is the sample
``pykneer_qdess_fc_reference``: the femoral cartilage that pyKNEEr (atlas-based, automatic:
not a manual segmentation) found in the same scan, published with it as per-slice contour
points of the bone interface and of the articular surface, a thickness per bone point and a
volume.  It is the only independent segmentation of a real scan available here.

Frame.  pyKNEEr reorients the image and sets its origin to 0 before segmenting, so its points
are voxel index x spacing in an axis order and direction not recorded with them.  Every one
of the 48 axis permutations and flips of the segmentation's own voxel grid is tried; the one
that brings pyKNEEr's points closest to cartiq's femoral-cartilage boundary (median distance)
is used, and the runner-up is reported to show that the choice is not a close call.  Then a
translation of up to 1.5 voxels in-plane (to a quarter voxel) and one slice across is fitted by the same
criterion and reported: pyKNEEr's points sit about a quarter of a millimetre off the scan's
voxel grid in-plane (session 13: the fitted shift is the same for every model's segmentation,
cartiq's DICOM geometry is SimpleITK's, and on renderings no shift raises the Dice), an offset
of its reorientation or contour extraction, not of the anatomy.

Reported: both volumes (and the volume of the band rebuilt from pyKNEEr's contours, a check
of the rebuild), Dice against that band, the distance from pyKNEEr's surface points to
cartiq's boundary, the share of cartiq's cartilage farther than 2 mm from pyKNEEr's (and the
reverse), the sagittal slices each covers, both mean thicknesses, and where the two differ
(cartiq-only cartilage by distance from pyKNEEr's, the part of it beyond 2 mm on slices where
pyKNEEr draws no cartilage at all, and beyond 2 mm slice by slice; pyKNEEr-only cartilage, and
how much of it cartiq calls femur).  ``--figure``: the slices with the most cartiq-only
cartilage beyond 2 mm, to look at.  Not a test.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

PREFIX = "01_DESS_01_prep_fc_"
FAR_MM = 2.0
MAX_SHIFT_VOXELS = 1.5


def load_reference(folder: Path) -> dict:
    """pyKNEEr's contour points (mm, its frame), thicknesses and volume."""
    read = lambda name: np.loadtxt(folder / f"{PREFIX}{name}.txt", ndmin=2)  # noqa: E731
    return {"bone": read("boneCart"), "articular": read("artiCart"),
            "thickness_mm": read("thickness_1").ravel(),
            "volume_mm3": float(read("volume").ravel()[0])}


def _frame(points_idx: np.ndarray, shape, spacing, perm, flips) -> np.ndarray:
    """Voxel indices -> pyKNEEr-like coordinates: output axis o is input axis perm[o]."""
    out = np.empty_like(points_idx, dtype=float)
    for o, a in enumerate(perm):
        v = points_idx[:, a].astype(float)
        out[:, o] = ((shape[a] - 1) - v if flips[o] else v) * spacing[a]
    return out


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxel indices of ``mask``'s boundary (its voxels with a neighbour outside)."""
    return np.argwhere(mask & ~ndimage.binary_erosion(mask))


def align(edge: np.ndarray, shape, spacing, ref_points: np.ndarray) -> dict:
    """The axis permutation and flips under which ``ref_points`` fit the boundary voxels
    ``edge`` (:func:`boundary`) of a mask of ``shape``."""
    scores = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            d, _ = cKDTree(_frame(edge, shape, spacing, perm, flips)).query(ref_points)
            scores.append((float(np.median(d)), perm, flips))
    scores.sort()
    (unshifted, perm, flips), runner_up = scores[0], scores[1][0]
    tree = cKDTree(edge * np.asarray(spacing, float))
    at = to_index(ref_points, shape, spacing, perm, flips)

    # quarter voxels in-plane, whole voxels across the slices (the largest spacing);
    # on a tie the smaller shift
    slice_axis = int(np.argmax(spacing))
    fine = np.arange(-MAX_SHIFT_VOXELS, MAX_SHIFT_VOXELS + 1e-9, 0.25)
    axes = [np.arange(-1.0, 2.0) if a == slice_axis else fine for a in range(3)]
    best, _, shift = min((float(np.median(tree.query((at + t) * spacing)[0])),
                          float(np.abs(t).sum()), tuple(float(x) for x in t))
                         for t in map(np.array, itertools.product(*axes)))
    return {"perm": perm, "flips": flips, "shift_voxels": shift,
            "median_mm": best, "unshifted_median_mm": unshifted,
            "runner_up_median_mm": runner_up}


def to_index(points: np.ndarray, shape, spacing, perm, flips, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """pyKNEEr coordinates -> (fractional) voxel indices of the segmentation's grid, moved by
    ``shift`` voxels along each of its axes."""
    idx = np.empty_like(points, dtype=float)
    for o, a in enumerate(perm):
        v = points[:, o] / spacing[a]
        idx[:, a] = ((shape[a] - 1) - v if flips[o] else v) + shift[a]
    return idx


def band_mask(ref: dict, shape, spacing, frame: dict) -> np.ndarray:
    """pyKNEEr's cartilage rebuilt from its contours: on each slice, the segments between every
    surface point and the nearest point of the other surface, rasterised."""
    perm, flips, shift = frame["perm"], frame["flips"], frame.get("shift_voxels", (0, 0, 0))
    bone = to_index(ref["bone"], shape, spacing, perm, flips, shift)
    art = to_index(ref["articular"], shape, spacing, perm, flips, shift)
    axis = int(np.argmax(np.asarray(spacing)))  # the slice axis (1.5 mm)
    mask = np.zeros(shape, bool)
    t = np.linspace(0.0, 1.0, 41)[:, None, None]
    for k in np.unique(np.rint(bone[:, axis])):
        b = bone[np.rint(bone[:, axis]) == k]
        a = art[np.rint(art[:, axis]) == k]
        if not len(a):
            continue
        for p, q in ((a, b[cKDTree(b).query(a)[1]]), (b, a[cKDTree(a).query(b)[1]])):
            ijk = np.rint((p[None] * (1 - t) + q[None] * t).reshape(-1, 3)).astype(int)
            ok = np.all((ijk >= 0) & (ijk < np.array(shape)), axis=1)
            mask[tuple(ijk[ok].T)] = True
    return mask


def _far(a: np.ndarray, to_b: np.ndarray) -> float:
    """Share of ``a``'s voxels farther than FAR_MM from b (``to_b``: distance map to b)."""
    return float((to_b[a] > FAR_MM).mean()) if a.any() else float("nan")


def _distance_to(mask: np.ndarray, spacing) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=spacing)


def _slices(mask: np.ndarray, axis: int) -> list[int]:
    keep = np.flatnonzero(mask.any(axis=tuple(x for x in range(3) if x != axis)))
    return [int(keep.min()), int(keep.max())] if len(keep) else []


def disagreement(ours: np.ndarray, band: np.ndarray, femur: np.ndarray, spacing,
                 to_band: np.ndarray) -> dict:
    """Where the two femoral cartilages differ (mm3): cartiq-only cartilage by its distance
    from pyKNEEr's band (within 1 mm and 1-2 mm: a thicker or shifted plate; beyond 2 mm:
    cartilage where pyKNEEr has none), pyKNEEr-only cartilage and the part of it that cartiq
    calls femur (the two disagree on where the bone ends), and each one's median distance
    from cartiq's femur.  ``to_band``: the distance map to the band (mm)."""
    vox = float(np.prod(spacing))
    to_femur = _distance_to(femur, spacing)
    only = ours & ~band
    missed = band & ~ours

    def mm3(m: np.ndarray) -> int:
        return round(float(m.sum()) * vox)

    def median(m: np.ndarray) -> float | None:
        return round(float(np.median(to_femur[m])), 2) if m.any() else None

    far = only & (to_band > FAR_MM)
    others = tuple(x for x in range(3) if x != int(np.argmax(spacing)))
    far_mm3 = far.sum(axis=others) * vox  # per slice
    covered = band.any(axis=others)  # the slices pyKNEEr draws cartilage on
    return {"cartiq_only_mm3": {"within_1mm": mm3(only & (to_band <= 1)),
                                "1_to_2mm": mm3(only & (to_band > 1) & (to_band <= 2)),
                                "beyond_2mm": mm3(far),
                                "beyond_2mm_on_slices_without_pykneer":
                                    round(float(far_mm3[~covered].sum()))},
            "cartiq_only_beyond_2mm_by_slice_mm3": {
                int(k): round(float(far_mm3[k])) for k in np.flatnonzero(far_mm3)},
            "pykneer_only_mm3": mm3(missed), "pykneer_only_in_cartiq_femur_mm3": mm3(missed & femur),
            "median_distance_from_cartiq_femur_mm": {"cartiq": median(ours), "pykneer": median(band)}}


def compare(segmentation: Path, reference_dir: Path, label: int = 4, femur_label: int = 1,
            figure: Path | None = None, scan: Path | None = None) -> dict:
    """Agreement of ``segmentation``'s femoral cartilage (``label``) with the reference;
    with ``figure`` and ``scan`` (the image the segmentation was made from), also the
    :func:`overlay` figure."""
    from cartiq.io.volume import read_volume

    seg = read_volume(segmentation, kind="labels")
    spacing = np.asarray(seg.geometry.spacing, float)
    ours = seg.array == label
    ref = load_reference(reference_dir)
    points = np.vstack([ref["bone"], ref["articular"]])
    edge = boundary(ours)
    frame = align(edge, ours.shape, spacing, points)
    band = band_mask(ref, ours.shape, spacing, frame)
    to_band = _distance_to(band, spacing)
    axis = int(np.argmax(spacing))
    if figure is not None:
        overlay(figure, scan, ours, band, ours & ~band & (to_band > FAR_MM), axis)
    at = to_index(points, ours.shape, spacing, frame["perm"], frame["flips"], frame["shift_voxels"])
    d, _ = cKDTree(edge * spacing).query(at * spacing)
    vox = float(np.prod(spacing))
    out = {
        "segmentation": str(segmentation),
        "frame": {k: (list(v) if isinstance(v, tuple) else round(v, 3)) for k, v in frame.items()},
        "volume_mm3": {"cartiq": round(float(ours.sum()) * vox),
                       "pykneer_reported": round(ref["volume_mm3"]),
                       "pykneer_rebuilt_band": round(float(band.sum()) * vox)},
        "dice_vs_band": round(2 * float((ours & band).sum()) / float(ours.sum() + band.sum()), 3),
        "pykneer_surface_to_cartiq_boundary_mm": {
            "median": round(float(np.median(d)), 2), "mean": round(float(d.mean()), 2),
            "p95": round(float(np.percentile(d, 95)), 2)},
        f"cartiq_farther_than_{FAR_MM:g}mm_from_pykneer": round(_far(ours, to_band), 3),
        f"pykneer_farther_than_{FAR_MM:g}mm_from_cartiq": round(_far(band, _distance_to(ours, spacing)), 3),
        "slices": {"axis": axis, "cartiq": _slices(ours, axis), "pykneer": _slices(band, axis)},
        "mean_thickness_mm": {"pykneer": round(float(ref["thickness_mm"].mean()), 2)},
        "disagreement": disagreement(ours, band, seg.array == femur_label, spacing, to_band),
    }
    table = Path(segmentation).with_name("measurements.csv")
    if table.is_file():
        for r in csv.DictReader(table.open()):
            if (r["structure"], r["region"], r["metric"]) == \
                    ("femoral_cartilage", "all", "thickness_mean"):
                out["mean_thickness_mm"]["cartiq"] = round(float(r["value"]), 2)
    return out


def overlay(out: Path, scan: Path, ours: np.ndarray, band: np.ndarray, far: np.ndarray,
            axis: int, n: int = 8) -> list[int]:
    """PNG of the ``n`` slices (across ``axis``) holding the most cartiq-only cartilage beyond
    FAR_MM of pyKNEEr's (``far``), in slice order: the scan with cartiq's femoral cartilage
    outlined red and pyKNEEr's cyan, the far part filled.  Returns the slices shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cartiq.io.volume import read_volume

    image = read_volume(scan).array.astype(np.float32)
    if image.shape != ours.shape:
        raise SystemExit(f"{scan}: image shape {image.shape} is not the segmentation's {ours.shape}")
    others = tuple(x for x in range(3) if x != axis)
    per_slice = far.sum(axis=others)
    shown = sorted(int(k) for k in np.argsort(per_slice)[::-1][:n] if per_slice[k] > 0)
    if not shown:
        raise SystemExit("no cartiq-only cartilage beyond 2 mm of pyKNEEr's: nothing to show")
    lo, hi = np.percentile(image, [0.5, 99.5])
    cols = (len(shown) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(4.5 * cols, 9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), shown):
        def cut(a):
            return a.take(k, axis=axis).T
        ax.imshow(np.clip((cut(image) - lo) / (hi - lo), 0, 1), cmap="gray")
        ax.imshow(np.ma.masked_where(~cut(far), cut(far)), cmap="autumn", alpha=0.45)
        for mask, colour in ((ours, "red"), (band, "cyan")):
            if cut(mask).any():
                ax.contour(cut(mask), [0.5], colors=colour, linewidths=0.6)
        vox = float(far.take(k, axis=axis).sum())
        ax.set_title(f"slice {k}: {vox:.0f} far voxels", fontsize=9)
    fig.suptitle("femoral cartilage: cartiq (red), pyKNEEr (cyan), cartiq-only beyond "
                 f"{FAR_MM:g} mm (filled)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return shown


def main() -> None:
    from cartiq.data.fetch import fetch_sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("segmentation", type=Path)
    ap.add_argument("--mirror", type=Path, default=None,
                    help="folder holding pykneer_qdess_reference/ (else the cache or network)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--figure", type=Path, default=None,
                    help="PNG of the slices with the most cartiq-only cartilage far from "
                         "pyKNEEr's (needs --scan)")
    ap.add_argument("--scan", type=Path, default=None,
                    help="the image the segmentation was made from (echo 1's DICOM folder)")
    a = ap.parse_args()
    if a.figure is not None and a.scan is None:
        ap.error("--figure needs --scan")
    res = compare(a.segmentation, fetch_sample("pykneer_qdess_fc_reference", mirror=a.mirror),
                  figure=a.figure, scan=a.scan)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
