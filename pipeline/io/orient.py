"""Re-storing a volume with its axes permuted or flipped, world coordinates unchanged.

Used to check that results do not depend on how a scan is stored, and by stages that need
a fixed storage order (e.g. sagittal slices for the 2D network).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cartiq.io.volume import Geometry

__all__ = ["reorient", "orientation_code"]


def reorient(array: np.ndarray, geometry: Geometry, order: Sequence[int],
             flip: Sequence[bool] = (False, False, False)) -> tuple[np.ndarray, Geometry]:
    """Transpose ``array`` to ``order`` and flip the chosen new axes; fix the geometry.

    Every voxel keeps its world (LPS) position: ``new.index_to_world(b)`` equals
    ``old.index_to_world(a)`` for the voxel moved from ``a`` to ``b``.
    """
    order = [int(o) for o in order]
    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"order must be a permutation of 0, 1, 2, got {order}")
    out = np.transpose(array, order)
    flips = [m for m in range(3) if flip[m]]
    if flips:
        out = np.flip(out, axis=flips)
    shape = out.shape
    matrix = geometry.matrix
    spacing = np.asarray(geometry.spacing)
    first = np.zeros(3)
    new_dir = np.zeros((3, 3))
    for m, o in enumerate(order):
        sign = -1.0 if flip[m] else 1.0
        new_dir[:, m] = sign * matrix[:, o]
        if flip[m]:
            first[o] = shape[m] - 1
    origin = geometry.index_to_world(first)[0]
    new = Geometry(shape=tuple(int(s) for s in shape),
                   spacing=tuple(float(spacing[o]) for o in order),
                   origin=tuple(float(v) for v in origin),
                   direction=tuple(float(v) for v in new_dir.ravel()))
    return np.ascontiguousarray(out), new


def orientation_code(geometry: Geometry) -> str:
    """Three letters naming the LPS world direction each index axis mostly points to
    (ITK convention: 'LPS' means i grows toward Left, j toward Posterior, k toward Superior)."""
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    code = ""
    for m in range(3):
        col = geometry.matrix[:, m]
        w = int(np.argmax(np.abs(col)))
        code += letters[w][int(col[w] > 0)]
    return code
