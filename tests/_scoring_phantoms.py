"""Small analytic phantoms with a planted cartilage repair site (for tests/test_scoring.py).

A femoral condyle is a sphere (radius ``rho``) of bone covered by a cartilage shell of
thickness ``T``.  The repair site is the cap within geodesic radius ``r`` around a direction
tilted against the grid: there the native cartilage is removed and repair tissue (labelled
femoral cartilage) fills the defect from the bone up to ``fill * T``.  Optional: a bone step
(overgrowth) under the site, a BML ball under the site, a cleft ring at the border,
heterogeneous repair intensity.  The grid is anisotropic and obliquely oriented in LPS;
labels are evaluated at voxel centres, so truth is analytic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cartiq.io.volume import Geometry, Volume, write_volume
from cartiq.io.labels import default_scheme

INTENSITY = {"background": 60.0, "bone": 200.0, "cartilage": 100.0, "bml": 380.0, "fluid": 600.0}


def _rot(axis: np.ndarray, deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


@dataclass(frozen=True)
class RepairSpec:
    fill: float = 1.0                 # repair thickness / native thickness
    repair_ratio: float = 1.0         # repair intensity / native cartilage intensity
    heterogeneous: float = 0.0        # relative amplitude of a blocky intensity pattern
    bml_diameter_mm: float = 0.0      # BML ball under the site (0: none)
    bone_step_mm: float = 0.0         # bone raised under the site (overgrowth)
    cleft_mm: float = 0.0             # fluid gap ring at the border (width, mm)
    cyst_diameter_mm: float = 0.0     # fluid-bright ball in the bone under the site (label femur)
    radius_mm: float = 5.0            # site radius (geodesic on the bone surface)
    thickness_mm: float = 2.5
    rho_mm: float = 30.0
    tilt_deg: float = 15.0            # site direction against the grid's local z
    spacing: tuple[float, float, float] = (0.4, 0.4, 0.7)
    noise: float = 3.0
    seed: int = 0


def make_repair_phantom(spec: RepairSpec = RepairSpec()) -> dict:
    """Return ``dict(image=Volume, labels=ndarray, sites=ndarray, truth=dict)``."""
    sc = default_scheme()
    sp = np.asarray(spec.spacing)
    half = np.array([16.0, 16.0, 0.0])
    lo = np.array([-16.0, -16.0, -13.0])
    hi = np.array([16.0, 16.0, 6.0])
    shape = tuple(int(x) for x in np.floor((hi - lo) / sp) + 1)
    del half
    ii = [np.arange(n) for n in shape]
    I, J, K = np.meshgrid(*ii, indexing="ij")
    x = lo + np.stack([I, J, K], -1) * sp               # local mm
    C = np.array([0.0, 0.0, -spec.rho_mm])
    d0 = _rot([1, 0, 0], spec.tilt_deg) @ np.array([0.0, 0.0, 1.0])
    rel = x - C
    rr = np.linalg.norm(rel, axis=-1)
    gamma = np.arccos(np.clip((rel @ d0) / np.maximum(rr, 1e-9), -1, 1))
    alpha = spec.radius_mm / spec.rho_mm
    in_site = gamma < alpha
    T = spec.thickness_mm
    bone_top = spec.rho_mm + np.where(in_site, spec.bone_step_mm, 0.0)
    lab = np.zeros(shape, np.uint16)
    bone = rr < bone_top
    lab[bone] = sc["femur"]
    native = (~in_site) & (rr >= spec.rho_mm) & (rr < spec.rho_mm + T)
    if spec.cleft_mm > 0:
        native &= ~((gamma >= alpha) & (gamma < alpha + spec.cleft_mm / spec.rho_mm))
    lab[native] = sc["femoral_cartilage"]
    repair = in_site & (rr >= bone_top) & (rr < spec.rho_mm + spec.fill * T)
    lab[repair] = sc["femoral_cartilage"]
    if spec.bml_diameter_mm > 0:
        cb = C + (spec.rho_mm - spec.bml_diameter_mm / 2 - 0.8) * d0
        lab[(np.linalg.norm(x - cb, axis=-1) <= spec.bml_diameter_mm / 2) & bone] = \
            sc["bone_marrow_lesion"]
    cyst = np.zeros(shape, bool)
    if spec.cyst_diameter_mm > 0:
        cc = C + (spec.rho_mm - spec.cyst_diameter_mm / 2 - 1.0) * d0
        cyst = (np.linalg.norm(x - cc, axis=-1) <= spec.cyst_diameter_mm / 2) & bone
    rng = np.random.default_rng(spec.seed)
    img = np.full(shape, INTENSITY["background"])
    img[lab == sc["femur"]] = INTENSITY["bone"]
    img[lab == sc["bone_marrow_lesion"]] = INTENSITY["bml"]
    img[cyst] = INTENSITY["fluid"]
    img[native] = INTENSITY["cartilage"]
    rep_int = INTENSITY["cartilage"] * spec.repair_ratio
    if spec.heterogeneous > 0:
        blocks = ((np.floor(x[..., 0] / 1.2) + np.floor(x[..., 1] / 1.2)
                   + np.floor(x[..., 2] / 1.2)) % 2) * 2 - 1
        img[repair] = (rep_int * (1 + spec.heterogeneous * blocks))[repair]
    else:
        img[repair] = rep_int
    img = img + rng.normal(0, spec.noise, shape)
    # oblique world placement
    Rw = _rot([1, 2, 3], 30.0)
    t = np.array([12.0, -40.0, 25.0])
    geom = Geometry(shape=shape, spacing=tuple(float(s) for s in sp),
                    origin=tuple(float(v) for v in Rw @ lo + t),
                    direction=tuple(float(v) for v in Rw.ravel()))
    sites = np.zeros(shape, np.uint8)
    # the reader's mask: the defect volume from the bone surface to the native surface level
    sites[in_site & (rr >= spec.rho_mm - 0.5) & (rr < spec.rho_mm + T)] = 1
    truth = {"site_center_world": (Rw @ (C + spec.rho_mm * d0) + t).tolist(),
             "repair_diameter_mm": 2 * spec.radius_mm, "fill_pct": 100 * spec.fill}
    return {"image": Volume(img.astype(np.float32), geom), "labels": lab, "sites": sites,
            "truth": truth}


def reorient(array: np.ndarray, geom: Geometry, perm: tuple[int, int, int],
             flips: tuple[int, ...]) -> tuple[np.ndarray, Geometry]:
    """Permute/flip index axes; the geometry changes so every voxel keeps its world position."""
    new = np.transpose(array, perm)
    D = geom.matrix
    sp = np.asarray(geom.spacing)
    cols, spacing, start = [], [], np.zeros(3)
    for a, old in enumerate(perm):
        c = D[:, old].copy()
        if a in flips:
            start[old] = geom.shape[old] - 1
            c = -c
        cols.append(c)
        spacing.append(sp[old])
    for a in flips:
        new = np.flip(new, axis=a)
    origin = geom.index_to_world(start[None])[0]
    g2 = Geometry(shape=tuple(int(s) for s in new.shape), spacing=tuple(float(s) for s in spacing),
                  origin=tuple(float(v) for v in origin),
                  direction=tuple(float(v) for v in np.stack(cols, 1).ravel()))
    return np.ascontiguousarray(new), g2


def write_scan_folder(ph: dict, folder: Path, *, defects: list[dict] | None = None) -> Path:
    """A minimal finished measure folder: image, segmentation, defects.csv, manifest last."""
    folder.mkdir(parents=True, exist_ok=True)
    geom = ph["image"].geometry
    img_path = folder / "image.nii.gz"
    write_volume(img_path, ph["image"].array, geom)
    write_volume(folder / "segmentation.nii.gz", ph["labels"], geom)
    head = ("defect_id,plate,region,kind,area_mm2,depth_pct,centroid_x_mm,centroid_y_mm,"
            "centroid_z_mm\n")
    body = "".join(f"{d['id']},femoral_cartilage,cMF,full,{d['area_mm2']},100,"
                   f"{d['c'][0]},{d['c'][1]},{d['c'][2]}\n" for d in (defects or []))
    (folder / "defects.csv").write_text(head + body)
    (folder / "manifest.json").write_text(json.dumps(
        {"stage": "measure", "inputs": {"image": {"path": str(img_path)}}}))
    return folder
