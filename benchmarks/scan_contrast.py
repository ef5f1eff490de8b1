"""Grey levels of a real scan by structure, after the model's percentile normalisation.

    python benchmarks/scan_contrast.py IMAGE SEGMENTATION [--json OUT.json]

IMAGE is the scan (any format ``cartiq`` reads, a DICOM folder included), SEGMENTATION a
cartiq-scheme label map on the same grid (a run's ``segmentation.nii.gz``; another grid is
refused).  The image is normalised by the default model's own function
(``normalize_array``, 0.5th and 99.5th percentiles to 0 and 1).
Prints, per label, the median and 10th/90th percentiles; the cartilage core (the plates
eroded by one voxel in-plane) and surface; the background in the first in-plane ring around
the plates; and "fluid": background within 15 in-plane voxels of the plates brighter than
0.8, the bright joint fluid of a DESS or fat-suppressed PD scan.  The cartilage/fluid ratio
(core median over fluid median) is what the renderer's ``cartilage_fluid_ratio`` setting
draws from.  The segmentation decides where cartilage is, so these are estimates from the
model's own mask; the core is the part least affected by over-drawing at the surface.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger("scan_contrast")
PLATES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage")


def _stats(values: np.ndarray) -> dict:
    p10, p50, p90 = np.percentile(values, [10, 50, 90]) if values.size else (np.nan,) * 3
    return {"voxels": int(values.size), "median": round(float(p50), 3),
            "p10": round(float(p10), 3), "p90": round(float(p90), 3)}


def grey_levels(image: np.ndarray, labels: np.ndarray, names: dict[int, str],
                slice_axis: int) -> dict:
    """Normalised grey levels per structure (see the module docstring); ``names`` maps label
    values to names, ``slice_axis`` is the array axis across the slices."""
    from cartiq.segmentation.grid import normalize_array

    if image.shape != labels.shape:
        raise SystemExit(f"image {image.shape} and segmentation {labels.shape} differ in shape")
    norm = normalize_array(image, (0.5, 99.5))
    out = {"per_label": {names.get(int(v), str(int(v))): _stats(norm[labels == v])
                         for v in np.unique(labels)}}
    plate_values = [v for v, n in names.items() if n in PLATES]
    cart = np.isin(labels, plate_values)
    if not cart.any():
        raise SystemExit("the segmentation has no cartilage plate: no cartilage grey level")
    st = np.zeros((3, 3, 3), bool)  # in-plane 4-neighbourhood: no step across the slices
    idx = [slice(None)] * 3
    idx[slice_axis] = 1
    st[tuple(idx)] = ndi.generate_binary_structure(2, 1)
    core = ndi.binary_erosion(cart, st)
    bg = labels == 0
    ring = ndi.binary_dilation(cart, st) & bg
    near = ndi.binary_dilation(cart, st, iterations=15) & bg
    fluid = near & (norm > 0.8)
    out["cartilage_core"] = _stats(norm[core])
    out["cartilage_surface"] = _stats(norm[cart & ~core])
    out["background_first_ring"] = _stats(norm[ring])
    out["fluid"] = _stats(norm[fluid])
    out["cartilage_fluid_ratio"] = round(out["cartilage_core"]["median"]
                                         / out["fluid"]["median"], 3) if fluid.any() else None
    return out


def main() -> None:
    from cartiq.io.labels import default_scheme
    from cartiq.errors import CartiqError
    from cartiq.io.volume import check_same_geometry, read_volume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("segmentation", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # unreadable or mismatched inputs: one line naming the file, no figures
        img = read_volume(a.image)
        seg = read_volume(a.segmentation, kind="labels")
        check_same_geometry(img.geometry, seg.geometry, a.image, a.segmentation)
    except CartiqError as exc:
        raise SystemExit(str(exc)) from None
    s = default_scheme()
    names = {int(v): n for n, v in s.labels.items()}
    # the slice axis: the voxel axis with the largest spacing
    axis = int(np.argmax(img.geometry.spacing))
    res = grey_levels(img.array, seg.array, names, axis)
    for k, v in res["per_label"].items():
        log.info("%-28s %s", k, v)
    for k in ("cartilage_core", "cartilage_surface", "background_first_ring", "fluid"):
        log.info("%-28s %s", k, res[k])
    log.info("cartilage/fluid ratio: %s", res["cartilage_fluid_ratio"])
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
