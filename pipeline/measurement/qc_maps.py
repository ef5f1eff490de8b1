"""Drawing helpers of the QC figure and reports: slice views and 2D plate maps.

Slice views
    The three index planes of the scan, named after the patient plane they are closest to
    (sagittal, coronal, axial), shown in radiological orientation: patient right on the
    screen's left, anterior on the left of sagittal views, superior (axial: anterior) up,
    with millimetre aspect.  A grid with an axis more than 35 degrees from every patient
    axis is shown as stored, named ``plane i/j/k``.

Plate maps (values binned on a 2D grid; mean per bin; empty bins with most neighbours set
are filled with their neighbours' mean)
    Femur: unrolled around the left-right axis through the condyles (axis centre: circle
    fit of the femoral cartilage in the sagittal plane), horizontal = patient x (mm, right on
    the left), vertical = angle (degrees) from anterior (trochlea, top) through inferior
    (weight-bearing) to posterior (bottom).  Tibia: axial projection, x against y (anterior
    up).  Patella: coronal projection, x against z (superior up).
Pure matplotlib (Agg canvas set up by the caller); no pyplot state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cartiq.io.volume import Geometry
from cartiq.io.labels import default_scheme, lateral_sign

__all__ = ["View", "plate_views", "draw_slice", "Projector", "projector_for", "PlateMap",
           "plate_map_from_points", "draw_plate_map", "OUTLINE_COLOURS"]

OUTLINE_COLOURS = {
    "femur": "#f2c14e", "tibia": "#f78154", "patella": "#b4d6d3",
    "femoral_cartilage": "#00e5ff", "medial_tibial_cartilage": "#39ff14",
    "lateral_tibial_cartilage": "#ff3cac", "patellar_cartilage": "#4d7cff",
    "medial_meniscus": "#c0c0c0", "lateral_meniscus": "#909090",
    "bone_marrow_lesion": "#ff0000",
}
_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("I", "S")}  # LPS: low, high world coordinate


@dataclass(frozen=True)
class View:
    name: str
    normal_axis: int  # index axis held fixed
    row_axis: int  # index axis shown vertically
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    letters: tuple[str, str, str, str]  # top, bottom, left, right


def plate_views(geometry: Geometry) -> list[View]:
    """Sagittal, coronal and axial views of the index grid (see module docstring)."""
    m = geometry.matrix
    world_of = np.argmax(np.abs(m), axis=0)  # index axis -> world axis
    sign = np.sign(m[world_of, np.arange(3)])
    aligned = np.abs(m[world_of, np.arange(3)]).min() >= np.cos(np.radians(35.0))
    if len(set(world_of.tolist())) < 3 or not aligned:  # very oblique: index planes as stored
        return [View(f"plane {'ijk'[a]}", a, *[b for b in range(3) if b != a], False, False,
                     ("", "", "", "")) for a in range(3)]
    axis_of = {int(w): a for a, w in enumerate(world_of)}
    # plane name, normal world axis, vertical world axis (+1: grows downward), horizontal
    spec = [("sagittal", 0, (2, -1), 1), ("coronal", 1, (2, -1), 0), ("axial", 2, (1, +1), 0)]
    views = []
    for name, normal, (vert, down), horiz in spec:
        r, c = axis_of[vert], axis_of[horiz]
        flip_r = sign[r] * down < 0
        flip_c = sign[c] < 0
        lo_v, hi_v = _LETTERS[vert]
        top, bottom = (lo_v, hi_v) if down > 0 else (hi_v, lo_v)
        views.append(View(name, axis_of[normal], r, c, bool(flip_r), bool(flip_c),
                          (top, bottom, *_LETTERS[horiz])))
    return views


def _plane(vol: np.ndarray, view: View, index: int) -> np.ndarray:
    sl = [slice(None)] * 3
    sl[view.normal_axis] = int(np.clip(index, 0, vol.shape[view.normal_axis] - 1))
    plane = vol[tuple(sl)]
    rest = [a for a in range(3) if a != view.normal_axis]
    if rest.index(view.row_axis) != 0:
        plane = plane.T
    if view.flip_rows:
        plane = plane[::-1]
    if view.flip_cols:
        plane = plane[:, ::-1]
    return plane


def draw_slice(ax, image: np.ndarray | None, labels: np.ndarray, geometry: Geometry,
               view: View, centre: np.ndarray, focus: np.ndarray, name: str,
               margin_mm: float = 12.0) -> None:
    """Image plane through ``centre`` with label outlines, cropped around ``focus``."""
    scheme = default_scheme()
    sp = np.asarray(geometry.spacing, float)
    lab = _plane(labels, view, centre[view.normal_axis])
    foc = _plane(focus, view, centre[view.normal_axis])
    if not foc.any():  # plate not in this plane: crop around its projection
        foc = _plane(focus.any(axis=view.normal_axis, keepdims=True).repeat(
            labels.shape[view.normal_axis], axis=view.normal_axis), view, 0)
    rows, cols = np.nonzero(foc)
    pr, pc = int(np.ceil(margin_mm / sp[view.row_axis])), int(np.ceil(margin_mm / sp[view.col_axis]))
    r0, r1 = max(rows.min() - pr, 0), min(rows.max() + pr + 1, lab.shape[0])
    c0, c1 = max(cols.min() - pc, 0), min(cols.max() + pc + 1, lab.shape[1])
    lab = lab[r0:r1, c0:c1]
    extent = (0, lab.shape[1] * sp[view.col_axis], lab.shape[0] * sp[view.row_axis], 0)
    if image is not None:
        img = _plane(image, view, centre[view.normal_axis])[r0:r1, c0:c1].astype(float)
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=extent,
                  interpolation="bilinear")
    else:
        ax.imshow(lab > 0, cmap="gray", vmin=0, vmax=3, extent=extent, interpolation="nearest")
    # pixel centres for contouring
    ys = (np.arange(lab.shape[0]) + 0.5) * sp[view.row_axis]
    xs = (np.arange(lab.shape[1]) + 0.5) * sp[view.col_axis]
    for struct, colour in OUTLINE_COLOURS.items():
        m = lab == scheme[struct]
        if m.any() and min(m.shape) > 1:
            lw = 1.6 if struct == name else 0.9
            ax.contour(xs, ys, m.astype(float), levels=[0.5], colors=[colour], linewidths=lw)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{name.replace('_', ' ')}: {view.name} "
                 f"{'ijk'[view.normal_axis]}={int(centre[view.normal_axis])}", fontsize=8.5)
    top, bottom, left, right = view.letters
    for txt, x, y, ha, va in ((top, .5, .98, "center", "top"), (bottom, .5, .02, "center", "bottom"),
                              (left, .02, .5, "left", "center"), (right, .98, .5, "right", "center")):
        if txt:
            ax.text(x, y, txt, transform=ax.transAxes, color="yellow", ha=ha, va=va,
                    fontsize=9, weight="bold")


# ---------------------------------------------------------------------- plate maps


@dataclass(frozen=True)
class Projector:
    """World (LPS mm) -> map coordinates (u horizontal, v vertical, v grows downward)."""

    kind: str  # "femur" | "axial" | "coronal"
    centre_yz: tuple[float, float] = (0.0, 0.0)
    cut_deg: float = -110.0

    def __call__(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = np.atleast_2d(np.asarray(pts, float))
        if self.kind == "femur":
            ant = -(pts[:, 1] - self.centre_yz[0])
            sup = pts[:, 2] - self.centre_yz[1]
            ang = np.degrees(np.arctan2(-sup, ant))  # 0 anterior, 90 inferior, 180 posterior
            ang = np.mod(ang - self.cut_deg, 360.0) + self.cut_deg
            return pts[:, 0], ang
        if self.kind == "axial":
            return pts[:, 0], pts[:, 1]
        return pts[:, 0], pts[:, 2]

    @property
    def down(self) -> bool:
        """True when v grows downward on screen (all maps but the coronal one)."""
        return self.kind != "coronal"

    @property
    def labels(self) -> tuple[str, str]:
        if self.kind == "femur":
            return "x (mm)", "angle (deg): anterior > inferior > posterior"
        if self.kind == "axial":
            return "x (mm)", "y (mm): anterior up"
        return "x (mm)", "z (mm): superior up"


def _fit_circle(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """Least-squares (Kasa) circle centre of points in the sagittal plane."""
    a = np.column_stack([y, z, np.ones_like(y)])
    b = y ** 2 + z ** 2
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    return float(sol[0] / 2), float(sol[1] / 2)


def projector_for(plate: str, femoral_points: np.ndarray) -> Projector:
    """Projection of a plate; the femur's axis comes from the femoral cartilage points."""
    if plate == "femoral_cartilage":
        pts = femoral_points
        if len(pts) > 20000:
            pts = pts[:: len(pts) // 20000 + 1]
        return Projector("femur", _fit_circle(pts[:, 1], pts[:, 2]))
    if plate == "patellar_cartilage":
        return Projector("coronal")
    return Projector("axial")


@dataclass
class PlateMap:
    plate: str
    grid: np.ndarray  # (rows=v, cols=u) mean value, nan = no data
    denuded: np.ndarray | None  # (rows, cols) bool
    extent: tuple[float, float, float, float]  # u0, u1, v0, v1 (map bounds, v1 > v0)
    projector: Projector
    centre_world: np.ndarray


def _fill_gaps(grid: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    ok = np.isfinite(grid)
    kernel = np.ones((3, 3))
    s = ndimage.convolve(np.where(ok, grid, 0.0), kernel, mode="constant")
    n = ndimage.convolve(ok.astype(float), kernel, mode="constant")
    fill = ~ok & (n >= 5)
    out = grid.copy()
    out[fill] = s[fill] / n[fill]
    return out


def plate_map_from_points(plate: str, points: np.ndarray, values: np.ndarray,
                          projector: Projector, *, denuded: np.ndarray | None = None,
                          bin_mm: float = 1.0) -> PlateMap:
    """Bin values at world points onto the plate's 2D map (mean per bin)."""
    u, v = projector(points)
    bu = bin_mm
    bv = 2.0 * bin_mm if projector.kind == "femur" else bin_mm
    u0, v0 = np.floor(u.min() / bu) * bu - bu, np.floor(v.min() / bv) * bv - bv
    nu = int(np.ceil((u.max() - u0) / bu)) + 2
    nv = int(np.ceil((v.max() - v0) / bv)) + 2
    iu = np.clip(((u - u0) / bu).astype(int), 0, nu - 1)
    iv = np.clip(((v - v0) / bv).astype(int), 0, nv - 1)
    flat = iv * nu + iu
    ok = np.isfinite(values)
    s = np.bincount(flat[ok], weights=values[ok], minlength=nu * nv)
    n = np.bincount(flat[ok], minlength=nu * nv)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = (s / n).reshape(nv, nu)
    grid[n.reshape(nv, nu) == 0] = np.nan
    den = None
    if denuded is not None and denuded.any():
        nd = np.bincount(flat[denuded], minlength=nu * nv)
        nall = np.bincount(flat, minlength=nu * nv)
        den = (nd > 0.5 * np.maximum(nall, 1)).reshape(nv, nu)
        grid[den] = np.nan
    grid = _fill_gaps(grid)
    return PlateMap(plate, grid, den, (u0, u0 + nu * bu, v0, v0 + nv * bv), projector,
                    np.asarray(points, float).mean(0))


def draw_plate_map(fig, ax, pm: PlateMap, *, vmax: float, side: str | None,
                   defects: list[dict] = (), lesions: list[dict] = (), cmap: str = "viridis",
                   vmin: float = 0.0, label: str = "thickness (mm)", title: str | None = None) -> None:
    """Draw a plate map with a colour bar in mm, denuded bins in black, defect/BML markers."""
    ax.set_facecolor("#dddddd")
    u0, u1, v0, v1 = pm.extent
    kw = dict(interpolation="nearest", aspect="auto" if pm.projector.kind == "femur" else "equal",
              origin="upper" if pm.projector.down else "lower",
              extent=(u0, u1, v1, v0) if pm.projector.down else (u0, u1, v0, v1))
    im = ax.imshow(pm.grid, cmap=cmap, vmin=vmin, vmax=vmax, **kw)
    if pm.denuded is not None:
        rgba = np.zeros(pm.denuded.shape + (4,))
        rgba[pm.denuded] = (0, 0, 0, 1)
        ax.imshow(rgba, **kw)
    for d in defects:
        u, v = pm.projector(d["xyz"])
        if np.isfinite(u[0]) and np.isfinite(v[0]):
            ax.plot(u, v, marker="x", color="red", ms=9, mew=2.2)
            ax.annotate(f"D{d['id']} {d.get('kind') or ''}", (u[0], v[0]), color="red", fontsize=8,
                        xytext=(4, 4), textcoords="offset points", weight="bold")
    for lesion in lesions:
        u, v = pm.projector(lesion["xyz"])
        if np.isfinite(u[0]) and np.isfinite(v[0]):
            ax.plot(u, v, marker="^", color="magenta", ms=9, mfc="none", mew=2)
            ax.annotate(f"B{lesion['id']}", (u[0], v[0]), color="magenta", fontsize=8,
                        xytext=(4, -10), textcoords="offset points", weight="bold")
    ax.set_xlim(u0, u1)
    ax.set_ylim((v1, v0) if pm.projector.down else (v0, v1))
    xl, yl = pm.projector.labels
    ax.set_xlabel(xl, fontsize=7.5)
    ax.set_ylabel(yl, fontsize=7.5)
    ax.tick_params(labelsize=7)
    if side in ("left", "right"):  # medial / lateral ends of the x axis
        lat_right = lateral_sign(side) > 0
        ax.text(0.01, 1.01, "medial" if lat_right else "lateral", transform=ax.transAxes,
                fontsize=7, va="bottom")
        ax.text(0.99, 1.01, "lateral" if lat_right else "medial", transform=ax.transAxes,
                fontsize=7, va="bottom", ha="right")
    ax.set_title(title or f"{pm.plate.replace('_', ' ')}: {label}", fontsize=8.5, pad=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label, fontsize=7.5)
    cb.ax.tick_params(labelsize=7)
