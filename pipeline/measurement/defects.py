"""Cartilage defects on a plate's subchondral surface.

* Full-thickness (denuded) defects are the bare patches found by
  :func:`cartiq.measurement.thickness.plate_surface`.
* Partial-thickness defects are connected patches of covered surface thinner than
  ``partial_fraction`` (default 50%) of the *expected local thickness*: the median
  thickness of the covered surface within ``radius_mm``, computed twice - the second time
  leaving out the points the first pass found thin, so a large defect does not lower its
  own reference.  A thin patch that reaches the plate's outer rim or the edge of a denuded
  area is the plate's natural taper (or the wall of that defect), not a partial defect: only
  thin patches enclosed by cartilage of normal thickness count.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from cartiq.measurement.thickness import mesh_components

__all__ = ["expected_thickness", "partial_defects", "rim_vertices"]


def rim_vertices(n_vertices: int, faces: np.ndarray, bare: np.ndarray) -> np.ndarray:
    """Vertices on the open boundary of a surface patch or next to a ``bare`` vertex."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    # edges used by one face only (one int64 key per edge: a 1D unique, not unique rows)
    key = e[:, 0].astype(np.int64) * max(n_vertices, 1) + e[:, 1]
    uniq, counts = np.unique(key, return_counts=True)
    single = uniq[counts == 1]
    rim = np.zeros(n_vertices, dtype=bool)
    rim[single // max(n_vertices, 1)] = True
    rim[single % max(n_vertices, 1)] = True
    touches_bare = bare[e[:, 0]] | bare[e[:, 1]]
    rim[e[touches_bare].ravel()] = True
    return rim


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """One int64 per row of a small-range (N, 3) int64 array, ordered as the rows are
    lexicographically (so a 1D ``np.unique`` finds the rows' ``np.unique(axis=0)``)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    rel = rows - rows.min(axis=0)
    span = rel.max(axis=0) + 1
    return (rel[:, 0] * span[1] + rel[:, 1]) * span[2] + rel[:, 2]


def expected_thickness(points_mm: np.ndarray, thickness_mm: np.ndarray, valid: np.ndarray,
                       radius_mm: float) -> np.ndarray:
    """Median thickness of the ``valid`` points within ``radius_mm``, for every point.

    Computed on a grid of anchor points ``radius_mm / 2`` apart and interpolated to all
    points (inverse distance over the 4 nearest anchors), so the cost stays linear.
    """
    out = np.full(len(points_mm), np.nan)
    if not valid.any():
        return out
    src = points_mm[valid]
    vals = thickness_mm[valid]
    cell = radius_mm / 2.0
    keys = np.floor(src / cell).astype(np.int64)
    _, first = np.unique(_row_keys(keys), return_index=True)  # = np.unique(keys, axis=0)
    anchors = src[first]
    tree = cKDTree(src)
    anchor_val = np.array([np.median(vals[nb]) for nb in tree.query_ball_point(anchors, radius_mm)])
    k = min(4, len(anchors))
    d, i = cKDTree(anchors).query(points_mm, k=k)
    if k == 1:
        d, i = d[:, None], i[:, None]
    w = 1.0 / np.maximum(d, 1e-3)
    return (anchor_val[i] * w).sum(axis=1) / w.sum(axis=1)


def partial_defects(points_mm: np.ndarray, faces: np.ndarray, areas_mm2: np.ndarray,
                    thickness_mm: np.ndarray, covered: np.ndarray, *, fraction: float = 0.5,
                    radius_mm: float = 8.0, min_area_mm2: float = 2.0,
                    rim: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label partial-thickness defects on a surface.

    ``rim``: vertices on the plate's outer edge or a denuded area's edge; thin patches that
    touch them are not defects.

    Returns
    -------
    defect_id : (N,) int, 0 outside defects, 1..K per defect (largest first).
    expected : (N,) expected local thickness (mm).
    """
    measured = covered & np.isfinite(thickness_mm)
    expected = expected_thickness(points_mm, thickness_mm, measured, radius_mm)
    thin = measured & (thickness_mm < fraction * expected)
    if thin.any():
        expected = expected_thickness(points_mm, thickness_mm, measured & ~thin, radius_mm)
        thin = measured & (thickness_mm < fraction * expected)
    defect_id = np.zeros(len(points_mm), dtype=np.int64)
    if not thin.any():
        return defect_id, expected
    # bridge one-vertex gaps (voxel steps split a patch): components of the thin set grown
    # by one ring of neighbours, keeping only the thin vertices as the defect
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    grown = thin.copy()
    grown[e[thin[e[:, 0]], 1]] = True
    grown[e[thin[e[:, 1]], 0]] = True
    comp = mesh_components(len(points_mm), faces, grown & measured)
    comp[~thin] = -1
    ids = comp[thin]
    area = np.bincount(ids, weights=areas_mm2[thin])
    at_rim = set(np.unique(comp[thin & rim]).tolist()) if rim is not None else set()
    keep = [c for c in np.argsort(area)[::-1] if area[c] >= min_area_mm2 and c not in at_rim]
    for k, c in enumerate(keep, start=1):
        defect_id[comp == c] = k
    return defect_id, expected
