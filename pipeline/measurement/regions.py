"""Cartilage subregions, after Wirth & Eckstein (IEEE TMI 2008;27:737-744), simplified.

All definitions use the patient frame of the scan header (LPS world mm: x left-right,
y anterior(-)/posterior(+), z inferior/superior), so they do not depend on how the volume
is stored; an oblique acquisition is used as the header describes it.

Medial/lateral
    A sagittal plane splits the knee: midway between the left-right centroids of the medial
    and lateral tibial cartilage (fallback: the sparsest left-right position of the femoral
    cartilage, i.e. the intercondylar notch).  The lateral side is patient right for a right
    knee and patient left for a left knee.

Femur (femoral cartilage, per condyle M/L)
    ``TrF`` trochlea: anterior to the anterior edge of the tibial plate of the same
    compartment; ``pMF``/``pLF``: posterior to its posterior edge; ``cMF``/``cLF``, the
    central weight-bearing condyle, between the two (the tibiofemoral contact zone of an
    extended knee).  ``cMF``/``cLF`` are split left-right into thirds of their width:
    ``ecMF`` external (far from the notch), ``ccMF`` central, ``icMF`` internal (next to the
    notch).  Plate edges are the 1st/99th percentiles of the tibial cartilage's AP positions.

Tibia (per plate MT/LT)
    ``cMT``/``cLT`` central: an ellipse, centred on the area-weighted centroid of the plate's
    subchondral area and shaped by its second moments, covering ``tibia_central_fraction``
    (20%) of the area.  The rest is cut into four sectors by the diagonals through the
    centre: ``aMT`` anterior, ``pMT`` posterior, ``eMT`` external (away from the knee's
    centre), ``iMT`` internal (toward the tibial spines).

Patella: ``all`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KneeFrame", "knee_frame", "assign_regions", "REGION_CODES", "region_parents"]

REGION_CODES = {
    "femoral_cartilage": ["TrF", "cMF", "ecMF", "ccMF", "icMF", "pMF",
                          "cLF", "ecLF", "ccLF", "icLF", "pLF"],
    "medial_tibial_cartilage": ["cMT", "aMT", "pMT", "eMT", "iMT"],
    "lateral_tibial_cartilage": ["cLT", "aLT", "pLT", "eLT", "iLT"],
    "patellar_cartilage": [],
}


def region_parents(code: str) -> list[str]:
    """Regions that contain ``code`` besides itself (e.g. ``ccMF`` -> ``cMF``)."""
    if len(code) == 4 and code[0] in "eci" and code[1] == "c":
        return [code[1:]]
    return []


@dataclass(frozen=True)
class KneeFrame:
    """What the subregion definitions need to know about this knee."""

    side: str
    lateral_sign: float  # +1: lateral is +x (patient left); -1: lateral is -x
    split_x_mm: float | None  # world x of the medial/lateral plane
    tibia_ap_mm: dict[str, tuple[float, float]]  # compartment -> (anterior y, posterior y)


def _world_points(labels: np.ndarray, value: int, affine: np.ndarray,
                  box: tuple[slice, ...] | None = None, max_points: int = 200_000) -> np.ndarray:
    """World points of the voxels labelled ``value`` (every k-th above ``max_points``);
    ``box``: their bounding box (searched instead of the whole volume)."""
    if box is None:
        idx = np.argwhere(labels == value)
    else:
        idx = np.argwhere(labels[box] == value) + np.array([b.start for b in box])
    if len(idx) > max_points:
        idx = idx[:: len(idx) // max_points + 1]
    return idx @ affine[:3, :3].T + affine[:3, 3]


def knee_frame(labels: np.ndarray, affine: np.ndarray, side: str,
               scheme: dict[str, int],
               boxes: dict[str, tuple[slice, ...] | None] | None = None) -> KneeFrame:
    """Measure the knee's medial/lateral split and tibial plate AP extents.

    ``boxes``: bounding box per structure name where known (None: absent), so that
    the plates' voxels are searched there only."""
    lat_sign = -1.0 if side == "right" else 1.0

    def points(name: str) -> np.ndarray:
        if boxes is not None and name in boxes:
            box = boxes[name]
            return np.zeros((0, 3)) if box is None else \
                _world_points(labels, scheme[name], affine, box)
        return _world_points(labels, scheme[name], affine)

    pts = {name: points(name) for name in ("medial_tibial_cartilage", "lateral_tibial_cartilage")}
    split = None
    if all(len(p) for p in pts.values()):
        split = 0.5 * (pts["medial_tibial_cartilage"][:, 0].mean()
                       + pts["lateral_tibial_cartilage"][:, 0].mean())
    else:
        fem = points("femoral_cartilage")
        if len(fem):
            lo, hi = np.quantile(fem[:, 0], [0.2, 0.8])
            hist, edges = np.histogram(fem[:, 0], bins=40, range=(lo, hi))
            i = int(np.argmin(hist))
            split = 0.5 * (edges[i] + edges[i + 1])
    ap = {}
    for comp, name in (("medial", "medial_tibial_cartilage"), ("lateral", "lateral_tibial_cartilage")):
        if len(pts[name]):
            ap[comp] = tuple(float(v) for v in np.quantile(pts[name][:, 1], [0.01, 0.99]))
    if len(ap) == 1:  # borrow the other compartment's extent
        only = next(iter(ap.values()))
        ap = {"medial": only, "lateral": only}
    return KneeFrame(side=side, lateral_sign=lat_sign,
                     split_x_mm=None if split is None else float(split), tibia_ap_mm=ap)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, q * cw[-1])])


def _femur(points: np.ndarray, frame: KneeFrame, shift: float) -> np.ndarray:
    codes = np.full(len(points), "", dtype=object)
    if frame.split_x_mm is None or not frame.tibia_ap_mm:
        return codes
    lateral = (points[:, 0] - frame.split_x_mm) * frame.lateral_sign > 0
    for comp, letter, sel in (("medial", "M", ~lateral), ("lateral", "L", lateral)):
        ant, post = frame.tibia_ap_mm[comp]
        ant += shift * (post - ant)
        y = points[:, 1]
        codes[sel & (y < ant)] = "TrF"
        codes[sel & (y > post)] = f"p{letter}F"
        central = sel & (y >= ant) & (y <= post)
        if not central.any():
            continue
        # distance from the notch plane, growing toward the external side
        d = np.abs(points[central, 0] - frame.split_x_mm)
        lo, hi = np.quantile(d, [0.0, 1.0])
        third = (hi - lo) / 3.0 if hi > lo else 1.0
        part = np.clip(((d - lo) / third).astype(int), 0, 2)
        codes[central] = np.array([f"ic{letter}F", f"cc{letter}F", f"ec{letter}F"])[part]
    return codes


def _tibia(points: np.ndarray, areas: np.ndarray, frame: KneeFrame, letter: str,
           central_fraction: float) -> np.ndarray:
    xy = points[:, :2]
    w = areas / areas.sum()
    centre = (xy * w[:, None]).sum(axis=0)
    d = xy - centre
    cov = (d * w[:, None]).T @ d
    try:
        m = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d)
    except np.linalg.LinAlgError:
        m = (d ** 2).sum(axis=1)
    central = m <= _weighted_quantile(m, areas, central_fraction)
    # external direction along x: laterally for the lateral plate, medially for the medial one
    ext = frame.lateral_sign if letter == "L" else -frame.lateral_sign
    u = d[:, 0] * ext  # + external
    v = d[:, 1]  # + posterior
    codes = np.where(np.abs(u) >= np.abs(v),
                     np.where(u >= 0, f"e{letter}T", f"i{letter}T"),
                     np.where(v >= 0, f"p{letter}T", f"a{letter}T")).astype(object)
    codes[central] = f"c{letter}T"
    return codes


def assign_regions(plate: str, points_world: np.ndarray, areas_mm2: np.ndarray,
                   frame: KneeFrame, *, tibia_central_fraction: float = 0.2,
                   femur_anterior_shift: float = 0.0) -> np.ndarray:
    """Subregion code per subchondral-surface point ('' where none applies)."""
    if len(points_world) == 0:
        return np.zeros(0, dtype=object)
    if plate == "femoral_cartilage":
        return _femur(points_world, frame, femur_anterior_shift)
    if plate == "medial_tibial_cartilage":
        return _tibia(points_world, areas_mm2, frame, "M", tibia_central_fraction)
    if plate == "lateral_tibial_cartilage":
        return _tibia(points_world, areas_mm2, frame, "L", tibia_central_fraction)
    return np.full(len(points_world), "", dtype=object)
