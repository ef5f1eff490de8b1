"""The articular surface (AC) of a cartilage plate and the two thickness methods measured to it.

Thickness after Eckstein/Wirth is measured from the subchondral bone interface (tAB) to the
articular surface AC: the joint-facing part of the cartilage surface only, not the plate's
side walls at its rim or the walls of a defect.

**AC rule.**  A vertex of the cartilage surface belongs to AC when it does not lie against
bone (interpolated bone fraction below ``cover_fraction``) and its outward normal makes an
angle of at most ``max_angle_deg`` (default 45 degrees: half-way between facing the bone and
standing perpendicular to it) with the outward normal of the nearest covered bone-interface
point - the bone it faces.  A blunt side wall stands at about 90
degrees to its bone and is excluded; a tapered rim whose surface slopes by less than the
limit stays part of AC; the floor of a partial defect faces the joint and is AC, its wall is
not.

**Methods.**

* ``nearest`` (default; Chondrometrics-style): at each covered tAB point, the 3D distance to
  the nearest AC vertex.
* ``normal`` (normal ray casting, as pymskt): from each covered tAB point along the bone
  surface normal to where the ray leaves the cartilage (the 0.5 level of the smoothed
  bone-plus-cartilage field, interpolated between steps).  Near a rim a ray may leave
  through the side wall; that is the method's definition.

All coordinates are grid-aligned millimetres of the crop the fields were sampled on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

__all__ = ["vertex_normals", "smooth_normals", "outward_normals", "articular_vertices", "nearest_thickness",
           "normal_ray_thickness", "rim_distance"]


def vertex_normals(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit vertex normals: area-weighted mean of the adjacent faces' normals (winding order)."""
    tri = points[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 x area
    n = np.zeros_like(points)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return n / norm


def _sample(field: np.ndarray, points_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(field, (points_mm / spacing).T, order=1, mode="nearest")


def smooth_normals(normals: np.ndarray, faces: np.ndarray, iterations: int) -> np.ndarray:
    """Average each unit normal with its mesh neighbours ``iterations`` times, renormalised
    (removes the tilt left by the voxel staircase; ~0.5 mm per step on sub-mm meshes)."""
    if iterations <= 0 or len(faces) == 0:
        return normals
    n = len(normals)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1], np.repeat(np.arange(n)[:, None], 2, axis=1)])
    adj = sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    for _ in range(iterations):
        normals = adj @ normals
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return normals


def outward_normals(points: np.ndarray, faces: np.ndarray, field: np.ndarray,
                    spacing: np.ndarray, probe_mm: float | None = None) -> np.ndarray:
    """Vertex normals of an iso-surface of ``field``, pointing out of the object (field falls).

    Marching cubes winds all faces of a surface the same way, so one sign (the majority
    vote of a probe on both sides of every vertex) orients the whole mesh.
    """
    n = vertex_normals(points, faces)
    h = float(probe_mm if probe_mm is not None else 0.5 * spacing.min())
    falls = _sample(field, points + h * n, spacing) < _sample(field, points - h * n, spacing)
    return n if np.count_nonzero(falls) >= 0.5 * len(points) else -n


def articular_vertices(cart_pts: np.ndarray, cart_normals: np.ndarray, free: np.ndarray,
                       bone_pts: np.ndarray, bone_normals: np.ndarray,
                       max_angle_deg: float) -> np.ndarray:
    """AC mask over the cartilage-surface vertices (see the module docstring).

    ``free``: vertices not against bone; ``bone_pts``/``bone_normals``: the covered interface
    points and their outward (out of bone) normals.
    """
    ac = np.zeros(len(cart_pts), dtype=bool)
    idx = np.flatnonzero(free)
    if idx.size == 0 or len(bone_pts) == 0:
        return ac
    _, near = cKDTree(bone_pts).query(cart_pts[idx], workers=-1)
    cos = np.einsum("ij,ij->i", cart_normals[idx], bone_normals[near])
    ac[idx] = cos >= np.cos(np.radians(max_angle_deg))
    return ac


def nearest_thickness(bone_pts: np.ndarray, ac_pts: np.ndarray) -> np.ndarray:
    """3D distance from each interface point to the nearest AC point."""
    if len(ac_pts) == 0:
        return np.full(len(bone_pts), np.nan)
    dist, _ = cKDTree(ac_pts).query(bone_pts, workers=-1)
    return dist


def normal_ray_thickness(bone_pts: np.ndarray, bone_normals: np.ndarray, solid: np.ndarray,
                         spacing: np.ndarray, *, max_mm: float = 10.0,
                         step_mm: float | None = None) -> np.ndarray:
    """Length of the ray from each interface point along its normal until ``solid`` < 0.5.

    ``solid`` is the smoothed bone-plus-cartilage fraction (1 inside bone and cartilage), so
    the exit is the cartilage's outer surface.  Steps of ``step_mm`` (default a quarter of the
    finest voxel); the crossing is interpolated linearly between the last two samples.  Rays
    that do not leave within ``max_mm`` give NaN.
    """
    h = float(step_mm if step_mm is not None else 0.25 * spacing.min())
    out = np.full(len(bone_pts), np.nan)
    active = np.arange(len(bone_pts))
    prev = np.ones(len(bone_pts))
    n_steps = int(np.ceil(max_mm / h))
    for k in range(1, n_steps + 1):
        if active.size == 0:
            break
        t = k * h
        val = _sample(solid, bone_pts[active] + t * bone_normals[active], spacing)
        done = val < 0.5
        if done.any():
            i = active[done]
            p0, p1 = prev[i], val[done]
            frac = np.clip((p0 - 0.5) / np.maximum(p0 - p1, 1e-9), 0.0, 1.0)
            out[i] = t - h + frac * h
        prev[active] = val
        active = active[~done]
    return out


def rim_distance(points: np.ndarray, faces: np.ndarray, covered: np.ndarray,
                 outside: np.ndarray) -> np.ndarray:
    """3D distance of each vertex from the cAB boundary towards ``outside`` vertices.

    The boundary is the set of covered vertices with a mesh neighbour in ``outside`` (the
    uncovered bone around the plate; denuded patches are not passed in).
    """
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    edge = e[covered[e[:, 0]] & outside[e[:, 1]]]
    rim = np.unique(edge[:, 0])
    if rim.size == 0:
        return np.full(len(points), np.inf)
    dist, _ = cKDTree(points[rim]).query(points, workers=-1)
    return dist
