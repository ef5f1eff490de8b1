"""Cartilage thickness and the subchondral bone area of one plate, on surfaces.

Definitions (Eckstein-style nomenclature):

* **tAB**, total subchondral bone area: the bone surface under the plate - where the
  cartilage covers it, plus the bare patches enclosed by the cartilage footprint.
* **cAB**, covered bone area; **dAB = tAB - cAB**, denuded area (full-thickness defects).
* **AC**, articular surface: the joint-facing part of the cartilage surface (not its side
  walls); the rule is in :mod:`cartiq.measurement.articular`.
* **thickness** at a covered bone-surface point: from tAB to AC, by the ``nearest`` method
  (3D distance to the nearest AC point, default) or the ``normal`` method (along the bone
  surface normal to where it leaves the cartilage).

Method: both masks are smoothed with a small Gaussian (``sigma_mm``) and their 0.5
iso-surfaces extracted by marching cubes in millimetres, so surfaces are sub-voxel and the
voxel size and anisotropy enter only through the spacing.  A bone-surface vertex is covered
where the interpolated cartilage fraction reaches ``cover_fraction`` (0.25: half of the 0.5
found at a bone-cartilage face, i.e. the rim lies where the cartilage wall meets the bone).
Cartilage-surface vertices where the bone fraction is below the same value are free; the
free ones facing the bone are AC.  Bare patches of bone surface enclosed by covered surface
(connected components of uncovered vertices on the mesh graph that neither touch the
region's border nor are the largest one) are the denuded areas.  Covered points closer than
``rim_exclusion_mm`` to the plate's outer cAB boundary keep their area but get no thickness
(0 by default: the mean runs over the whole cAB).

All coordinates here are grid-aligned millimetres (``index * spacing``); rotation into world
space is the caller's business, since distances and areas do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

from cartiq.measurement.articular import (articular_vertices, nearest_thickness,
                                          normal_ray_thickness, outward_normals, rim_distance,
                                          smooth_normals)

__all__ = ["PlateSurface", "plate_surface", "vertex_areas", "mesh_components", "crop_box",
           "taubin_smooth"]


@dataclass
class PlateSurface:
    """Subchondral bone surface patch (tAB) of one plate with per-vertex values."""

    points_mm: np.ndarray  # (N, 3) grid-aligned mm in the full volume frame
    faces: np.ndarray  # (M, 3) indices into points_mm
    vertex_area_mm2: np.ndarray  # (N,)
    covered: np.ndarray  # (N,) bool; tiny filled holes count as covered
    denuded: np.ndarray  # (N,) bool
    hole_id: np.ndarray  # (N,) int, 0 = not in a denuded patch, k = k-th patch
    thickness_mm: np.ndarray  # (N,) nan where not measured (denuded, filled holes)

    @property
    def total_area_mm2(self) -> float:
        return float(self.vertex_area_mm2.sum())

    @property
    def covered_area_mm2(self) -> float:
        return float(self.vertex_area_mm2[self.covered].sum())

    @property
    def denuded_area_mm2(self) -> float:
        return float(self.vertex_area_mm2[self.denuded].sum())


def crop_box(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin_mm`` on each side, clipped to the array."""
    coords = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
              for ax in range(3)]
    if any(c.size == 0 for c in coords):
        return None
    pad = np.ceil(margin_mm / spacing).astype(int)
    return tuple(slice(max(int(c[0]) - p, 0), min(int(c[-1]) + p + 1, n))
                 for c, p, n in zip(coords, pad, mask.shape))


def vertex_areas(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area per vertex (mm2): a third of each adjacent triangle's area."""
    tri = points[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    out = np.zeros(len(points))
    np.add.at(out, faces.ravel(), np.repeat(area / 3.0, 3))
    return out


def mesh_components(n_vertices: int, faces: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Connected-component label per vertex over mesh edges joining two ``keep`` vertices.

    Vertices not in ``keep`` get -1.
    """
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = e[keep[e[:, 0]] & keep[e[:, 1]]]
    graph = sparse.coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])),
                              shape=(n_vertices, n_vertices)).tocsr()
    _, labels = connected_components(graph, directed=False)
    labels = labels.astype(np.int64)
    labels[~keep] = -1
    return labels


def taubin_smooth(points: np.ndarray, faces: np.ndarray, iterations: int = 10,
                  lam: float = 0.5, mu: float = -0.53) -> np.ndarray:
    """Taubin lambda/mu smoothing of mesh vertices: removes staircase noise, keeps volume."""
    if iterations <= 0 or len(faces) == 0:
        return points
    n = len(points)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    adj = sparse.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    deg = np.asarray(adj.sum(axis=1)).ravel()
    deg[deg == 0] = 1.0
    walk = sparse.diags(1.0 / deg) @ adj
    for _ in range(iterations):
        points = points + lam * (walk @ points - points)
        points = points + mu * (walk @ points - points)
    return points


def _smooth(mask: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    field = mask.astype(np.float32)
    if np.all(sigma_vox > 0):
        field = ndimage.gaussian_filter(field, sigma=sigma_vox, mode="nearest", truncate=3.0)
    return field


def _marching_cubes(field: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.measure import marching_cubes

    verts, faces, _, _ = marching_cubes(field, level=0.5, spacing=tuple(spacing),
                                        allow_degenerate=False)
    return verts.astype(np.float64), faces.astype(np.int64)


def _sample(field: np.ndarray, points_mm: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(field, (points_mm / spacing).T, order=1, mode="nearest")


def plate_surface(cartilage: np.ndarray, bone: np.ndarray, spacing_mm, *,
                  sigma_mm: float = 0.35, cover_fraction: float = 0.25,
                  margin_mm: float = 6.0, min_hole_area_mm2: float = 2.0,
                  max_hole_fraction: float = 0.5, min_sigma_voxels: float = 0.5,
                  mesh_smoothing_iterations: int = 30, method: str = "nearest",
                  articular_max_angle_deg: float = 45.0, rim_exclusion_mm: float = 0.0,
                  ray_max_mm: float = 10.0,
                  normal_smoothing_iterations: int = 5) -> PlateSurface | None:
    """Thickness and covered/denuded bone area of one cartilage plate.

    Parameters
    ----------
    cartilage, bone : bool arrays (same shape) of the plate and of the bone it lies on.
    spacing_mm : voxel size along each array axis (mm).
    sigma_mm : Gaussian smoothing of the masks before surface extraction (mm), at least
        ``min_sigma_voxels`` voxels along each axis.
    cover_fraction : cartilage fraction at which a bone-surface point counts as covered.
    margin_mm : the region of interest is the plate's bounding box grown by this margin.
    min_hole_area_mm2 : enclosed bare patches smaller than this count as covered.
    max_hole_fraction : enclosed bare patches larger than this fraction of the covered area
        are taken as a gap in the plate's extent, not a defect.
    mesh_smoothing_iterations : Taubin smoothing steps applied to both surfaces before
        distances and areas are measured (0 disables).
    method : ``"nearest"`` (nearest AC point) or ``"normal"`` (ray along the bone normal).
    articular_max_angle_deg : AC is the free cartilage surface whose normal is within this
        angle of the facing bone's normal.
    rim_exclusion_mm : covered points closer than this to the plate's outer cAB boundary get
        no thickness (their area still counts in cAB).
    ray_max_mm : ``normal`` method: rays that do not leave the cartilage within this get none.
    normal_smoothing_iterations : ``normal`` method: neighbour averaging of the bone normals.

    Returns
    -------
    PlateSurface, or None when the plate or its bone surface is absent.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.arange(40)[None, None, :]
    >>> bone = np.broadcast_to(z < 20, (40, 40, 40)); cart = np.broadcast_to((z >= 20) & (z < 24), (40, 40, 40))
    >>> s = plate_surface(cart, bone, (0.5, 0.5, 0.5))
    >>> round(float(np.nanmedian(s.thickness_mm)), 2)
    2.0
    """
    if method not in ("nearest", "normal"):
        raise ValueError(f"thickness method must be 'nearest' or 'normal', not {method!r}")
    spacing = np.asarray(spacing_mm, dtype=float)
    box = crop_box(cartilage, spacing, margin_mm)
    if box is None:
        return None
    offset = np.array([s.start for s in box], dtype=float) * spacing
    sigma_vox = np.maximum(sigma_mm / spacing, min_sigma_voxels) if sigma_mm > 0 else 0 * spacing
    cart_f = _smooth(cartilage[box], sigma_vox)
    bone_f = _smooth(bone[box], sigma_vox)
    if bone_f.max() < 0.5 or cart_f.max() < 0.5:
        return None

    bverts, bfaces = _marching_cubes(bone_f, spacing)
    n = len(bverts)
    covered = _sample(cart_f, bverts, spacing) >= cover_fraction
    upper = (np.asarray(cart_f.shape) - 1) * spacing
    on_border = np.any((bverts <= 0.51 * spacing) | (bverts >= upper - 0.51 * spacing), axis=1)
    bverts = taubin_smooth(bverts, bfaces, mesh_smoothing_iterations)
    areas = vertex_areas(bverts, bfaces)

    # bare patches enclosed by the footprint = uncovered components not touching the border
    uncovered = ~covered
    comp = mesh_components(n, bfaces, uncovered)
    ids = comp[uncovered]
    comp_area = np.bincount(ids, weights=areas[uncovered]) if ids.size else np.zeros(0)
    exterior = set(np.unique(comp[uncovered & on_border]).tolist())
    if comp_area.size:
        exterior.add(int(np.argmax(comp_area)))
    # components must touch the footprint to be a hole (not a stray bone island)
    e = np.concatenate([bfaces[:, [0, 1]], bfaces[:, [1, 2]], bfaces[:, [2, 0]]])
    touching = set(np.unique(comp[e[:, 0]][covered[e[:, 1]] & uncovered[e[:, 0]]]).tolist())
    covered_area = float(areas[covered].sum())
    hole_id = np.zeros(n, dtype=np.int64)
    filled = np.zeros(n, dtype=bool)
    k = 0
    for c in sorted(touching - exterior):
        if comp_area[c] > max_hole_fraction * covered_area:
            continue
        members = comp == c
        if comp_area[c] < min_hole_area_mm2:
            filled |= members
        else:
            k += 1
            hole_id[members] = k
    denuded = hole_id > 0

    # thickness at covered interface points, from tAB to AC
    thickness = np.full(n, np.nan)
    if covered.any():
        bnormals = outward_normals(bverts, bfaces, bone_f, spacing)
        if method == "normal":
            bnormals = smooth_normals(bnormals, bfaces, normal_smoothing_iterations)
            thickness[covered] = normal_ray_thickness(
                bverts[covered], bnormals[covered], cart_f + bone_f, spacing, max_mm=ray_max_mm)
        else:
            pad = 1
            cart_p = np.pad(cart_f, pad)
            cverts, cfaces = _marching_cubes(cart_p, spacing)
            cverts -= pad * spacing
            free = _sample(bone_f, cverts, spacing) < cover_fraction
            cverts = taubin_smooth(cverts, cfaces, mesh_smoothing_iterations)
            cnormals = outward_normals(cverts, cfaces, cart_f, spacing)
            ac = articular_vertices(cverts, cnormals, free, bverts[covered], bnormals[covered],
                                    articular_max_angle_deg)
            thickness[covered] = nearest_thickness(bverts[covered], cverts[ac])
        if rim_exclusion_mm > 0:
            outside = uncovered & ~denuded & ~filled
            thickness[rim_distance(bverts, bfaces, covered, outside) < rim_exclusion_mm] = np.nan

    keep = covered | denuded | filled
    if not keep.any():
        return None
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[keep] = np.arange(int(keep.sum()))
    faces = new_index[bfaces]
    faces = faces[(faces >= 0).all(axis=1)]
    return PlateSurface(
        points_mm=bverts[keep] + offset,
        faces=faces,
        vertex_area_mm2=areas[keep],
        covered=(covered | filled)[keep],
        denuded=denuded[keep],
        hole_id=hole_id[keep],
        thickness_mm=thickness[keep],
    )
