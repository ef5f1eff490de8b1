"""Tiny synthetic volumes with analytic truth, for unit tests."""

from __future__ import annotations

import numpy as np


def grid(extent_mm, spacing, offset=0.37):
    """Voxel-centre coordinates (mm) of a grid centred on the origin."""
    spacing = np.asarray(spacing, float)
    n = np.round(np.asarray(extent_mm, float) / spacing).astype(int)
    axes = [(np.arange(k) - k / 2 + offset) * s for k, s in zip(n, spacing)]
    return np.meshgrid(*axes, indexing="ij")


def shell(spacing, r_bone=15.0, thickness=2.5, extent=50.0):
    """Bone ball with a concentric cartilage shell: thickness is exactly ``thickness``."""
    X, Y, Z = grid((extent,) * 3, spacing)
    R = np.sqrt(X ** 2 + Y ** 2 + Z ** 2)
    return R < r_bone, (R >= r_bone) & (R < r_bone + thickness)


def slab_with_hole(spacing, thickness=2.0, hole_radius=4.0, extent=(40.0, 40.0, 20.0),
                   plate_radius=15.0):
    """Flat bone block, a disk-shaped cartilage slab on top with a round hole in the middle."""
    X, Y, Z = grid(extent, spacing)
    bone = Z < 0
    rho = np.sqrt(X ** 2 + Y ** 2)
    cart = (Z >= 0) & (Z < thickness) & (rho < plate_radius) & (rho >= hole_radius)
    return bone, cart


def ellipsoid(spacing, semi_axes=(5.0, 4.0, 3.0), extent=30.0, centre=(0.0, 0.0, 0.0)):
    X, Y, Z = grid((extent,) * 3, spacing)
    a, b, c = semi_axes
    return ((X - centre[0]) / a) ** 2 + ((Y - centre[1]) / b) ** 2 + ((Z - centre[2]) / c) ** 2 <= 1


def mini_knee(spacing=(0.8, 0.8, 0.8), shape=(50, 40, 50)):
    """A crude right knee in the cartiq scheme, no patella: femur over two tibial plates.

    Index axes are aligned with LPS world axes (x: left, y: posterior, z: superior).
    Returns (labels uint8, spacing).
    """
    lab = np.zeros(shape, np.uint8)
    nx, ny, nz = shape
    z0 = nz // 2
    lab[:, 5:-5, z0 + 3:] = 1  # femur
    lab[5:-5, 8:-8, z0 + 1:z0 + 3] = 4  # femoral cartilage
    lab[:, 5:-5, : z0 - 3] = 2  # tibia
    lab[nx // 2 + 3: -6, 10:-10, z0 - 3: z0 - 1] = 5  # medial (patient left, +x) for a right knee
    lab[6: nx // 2 - 3, 10:-10, z0 - 3: z0 - 1] = 6  # lateral
    return lab, spacing
