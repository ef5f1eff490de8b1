"""Seeded synthetic knee phantom: MR-like image, cartiq label map and analytic ground truth.

The anatomy is a continuous model (:mod:`cartiq.data.phantom_truth`, geometry described there
and in ``sample_data/README.md``) sampled at voxel centres on a scanner grid of any
orientation (default: oblique sagittal, anisotropic voxels).  An optional rigid motion of
the whole knee inside the fixed grid imitates repositioning between visits.

Mapping a voxel to the model::

    world = origin + direction @ (index * spacing)            # LPS mm, the written geometry
    knee  = Rm^T (world - offset - translation)               # rigid motion about the joint
    model = mirror_x(knee) if side == "left" else knee        # model is a right knee

Usage::

    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom
    ph = make_phantom(PhantomSpec(seed=0))
    paths = write_phantom(ph, "out/")   # image.nii.gz, seg.nii.gz, truth.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import ConfigError
from cartiq.io.volume import Geometry, Volume, atomic_write_text, write_volume
from cartiq.io.labels import default_scheme
from cartiq.data.phantom_truth import KneeModel, meniscus_volumes, plate_truth

__all__ = ["PhantomSpec", "Phantom", "make_phantom", "write_phantom", "ORIENTATIONS",
           "knee_model", "grid_geometry", "world_to_model", "model_to_world",
           "spec_from_options"]

log = logging.getLogger(__name__)

ORIENTATIONS = ("oblique_sagittal", "sagittal", "coronal", "axial")
TRUTH_STEP_MM = 0.1
# |thickness_mean(h=0.1) - thickness_mean(h=0.05)|, max over the default plates (measured)
TRUTH_SAMPLING_ERROR_MM = 0.0005
# direction-matrix columns (world directions of index axes i, j, k); the slice axis is k
_BASE_DIRECTIONS = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}
# MR-like mean intensities (PD fat-sat / DESS-like contrast), arbitrary units
_INTENSITY = {
    "air": 8.0, "soft_tissue": 210.0, "fluid": 620.0, "femur": 140.0, "tibia": 140.0,
    "patella": 140.0, "femoral_cartilage": 430.0, "medial_tibial_cartilage": 430.0,
    "lateral_tibial_cartilage": 430.0, "patellar_cartilage": 430.0, "medial_meniscus": 45.0,
    "lateral_meniscus": 45.0, "bone_marrow_lesion": 520.0,
}


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines a phantom (all lengths mm, angles degrees)."""

    seed: int = 0
    side: str = "right"
    orientation: str = "oblique_sagittal"
    oblique_deg: tuple[float, float] = (12.0, 6.0)  # about world z, then x (oblique only)
    spacing_mm: tuple[float, float, float] = (0.45, 0.45, 1.0)  # per index axis; k = slices
    fov_mm: tuple[float, float, float] = (100.0, 100.0, 110.0)  # L-R, A-P, S-I extents
    world_offset_mm: tuple[float, float, float] = (12.5, -30.0, 41.0)  # joint centre in world
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # rigid motion, xyz Euler
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # anatomy
    femur_radius_mm: float = 20.0
    condyle_x_mm: tuple[float, float] = (8.0, 33.0)
    femoral_arc_deg: float = 100.0
    femoral_thickness_mm: float = 2.2
    medial_tibial_thickness_mm: float = 2.0
    lateral_tibial_thickness_mm: float = 2.6
    patellar_thickness_mm: float = 2.8
    joint_gap_mm: float = 1.0
    patellar_gap_mm: float = 1.5
    tibial_plate_semi_axes_mm: tuple[float, float] = (13.0, 17.0)
    patella_semi_axes_mm: tuple[float, float] = (18.0, 14.0)
    bone_margin_mm: float = 1.5  # condyle and patella bone extend beyond their cartilage
    menisci: bool = True
    meniscus_height_mm: float = 5.5
    # lesions
    full_defect_radius_mm: float = 4.0  # 0 disables
    full_defect_centre: tuple[float, float] = (20.5, 0.0)  # (x mm, angle deg from straight down)
    partial_defect_radius_mm: float = 3.5  # 0 disables
    partial_defect_depth_fraction: float = 0.6
    partial_defect_centre_mm: tuple[float, float] = (-19.0, -3.0)
    femur_bml_radii_mm: tuple[float, float, float] | None = (5.0, 4.0, 3.5)  # None disables
    femur_bml_centre_mm: tuple[float, float, float] = (22.0, 5.0, 6.6)
    tibia_bml_radii_mm: tuple[float, float, float] | None = (4.0, 4.0, 3.0)
    # image
    noise_sigma: float = 0.04  # Rician noise sd as a fraction of the cartilage intensity
    bias_field: float = 0.25  # max |log gain| of the smooth multiplicative bias field
    blur_voxels: float = 0.5  # Gaussian partial-volume blur (sd in voxels); 0 disables

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class Phantom:
    image: Volume
    labels: Volume
    truth: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- geometry

def _validate(spec: PhantomSpec) -> None:
    if spec.side not in ("left", "right"):
        raise ConfigError(f"phantom side must be 'left' or 'right', not {spec.side!r}")
    if spec.orientation not in ORIENTATIONS:
        raise ConfigError(f"phantom orientation must be one of {', '.join(ORIENTATIONS)}, "
                          f"not {spec.orientation!r}")
    if len(spec.spacing_mm) != 3 or min(spec.spacing_mm) <= 0:
        raise ConfigError("phantom spacing_mm needs 3 positive values")
    if len(spec.fov_mm) != 3 or min(spec.fov_mm) <= 0:
        raise ConfigError("phantom fov_mm needs 3 positive values")
    for name in ("femoral_thickness_mm", "medial_tibial_thickness_mm",
                 "lateral_tibial_thickness_mm", "patellar_thickness_mm", "femur_radius_mm"):
        if getattr(spec, name) <= 0:
            raise ConfigError(f"phantom {name} must be > 0")
    if spec.full_defect_radius_mm < 0 or spec.partial_defect_radius_mm < 0:
        raise ConfigError("phantom defect radii must be >= 0")
    if spec.noise_sigma < 0 or spec.bias_field < 0 or spec.bone_margin_mm < 0:
        raise ConfigError("phantom noise_sigma, bias_field and bone_margin_mm must be >= 0")


def knee_model(spec: PhantomSpec) -> KneeModel:
    """The continuous right-knee model described by ``spec``."""
    m = KneeModel(
        R=float(spec.femur_radius_mm), condyle_x=tuple(map(float, spec.condyle_x_mm)),
        arc_deg=float(spec.femoral_arc_deg), T_f=float(spec.femoral_thickness_mm),
        T_mt=float(spec.medial_tibial_thickness_mm), T_lt=float(spec.lateral_tibial_thickness_mm),
        T_p=float(spec.patellar_thickness_mm), gap=float(spec.joint_gap_mm),
        patellar_gap=float(spec.patellar_gap_mm),
        plate_axes=tuple(map(float, spec.tibial_plate_semi_axes_mm)),
        patella_axes=tuple(map(float, spec.patella_semi_axes_mm)),
        meniscus_height=float(spec.meniscus_height_mm), menisci=bool(spec.menisci),
        bone_margin=float(spec.bone_margin_mm),
        full_r=float(spec.full_defect_radius_mm),
        full_centre=tuple(map(float, spec.full_defect_centre)),
        partial_r=float(spec.partial_defect_radius_mm),
        partial_depth=float(spec.partial_defect_depth_fraction),
        partial_centre=tuple(map(float, spec.partial_defect_centre_mm)),
        femur_bml=_opt3(spec.femur_bml_radii_mm),
        femur_bml_centre=tuple(map(float, spec.femur_bml_centre_mm)),
        tibia_bml=_opt3(spec.tibia_bml_radii_mm),
    )
    problems = m.check()
    if problems:
        raise ConfigError("inconsistent phantom geometry: " + "; ".join(problems))
    return m


def _opt3(v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
    return None if v is None else tuple(float(a) for a in v)  # type: ignore[return-value]


def _rotation(deg: tuple[float, ...], seq: str) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler(seq, deg, degrees=True).as_matrix()


def _motion(spec: PhantomSpec) -> np.ndarray:
    return _rotation(tuple(spec.rotation_deg), "xyz")


def _direction(spec: PhantomSpec) -> np.ndarray:
    base = "sagittal" if spec.orientation == "oblique_sagittal" else spec.orientation
    d = np.array(_BASE_DIRECTIONS[base], dtype=float).T  # columns = axis directions
    if np.linalg.det(d) < 0:
        d[:, 2] *= -1.0
    if spec.orientation == "oblique_sagittal":
        d = _rotation(tuple(spec.oblique_deg), "zx") @ d
    return d


def grid_geometry(spec: PhantomSpec) -> Geometry:
    """The scanner grid: fixed in the world (independent of the knee's rigid motion)."""
    d = _direction(spec)
    sp = np.asarray(spec.spacing_mm, dtype=float)
    world_axis = np.argmax(np.abs(d), axis=0)  # world axis each index axis mostly follows
    fov = np.asarray(spec.fov_mm, dtype=float)[world_axis]
    shape = np.maximum(2, np.round(fov / sp).astype(int))
    # FOV centre: 5 mm anterior and 5 mm superior of the joint centre
    centre = np.asarray(spec.world_offset_mm, dtype=float) + np.array([0.0, -5.0, 5.0])
    origin = centre - d @ ((shape - 1) / 2.0 * sp)
    return Geometry(shape=tuple(int(s) for s in shape), spacing=tuple(float(s) for s in sp),
                    origin=tuple(float(o) for o in origin),
                    direction=tuple(float(v) for v in d.ravel()))


def world_to_model(spec: PhantomSpec, world: np.ndarray) -> np.ndarray:
    """LPS world mm (N, 3) to right-knee model coordinates (N, 3)."""
    rm = _motion(spec)
    shift = np.asarray(spec.world_offset_mm, float) + np.asarray(spec.translation_mm, float)
    p = (np.atleast_2d(world) - shift) @ rm  # = Rm^T (w - shift) row-wise
    if spec.side == "left":
        p = p * np.array([-1.0, 1.0, 1.0])
    return p


def model_to_world(spec: PhantomSpec, p: np.ndarray) -> np.ndarray:
    """Right-knee model coordinates (N, 3) to LPS world mm (N, 3)."""
    p = np.atleast_2d(np.asarray(p, float))
    if spec.side == "left":
        p = p * np.array([-1.0, 1.0, 1.0])
    shift = np.asarray(spec.world_offset_mm, float) + np.asarray(spec.translation_mm, float)
    return p @ _motion(spec).T + shift


def _label_grid(spec: PhantomSpec, m: KneeModel,
                geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Labels (uint8) and float32 model coordinates (ni, nj, nk, 3) of every voxel centre.

    ``model = A @ index + b`` is composed once (grid affine, rigid motion, mirroring) and
    evaluated in float64 by broadcasting, on slabs of the slice axis (about 2 M points each).
    """
    ni, nj, nk = geo.shape
    b = world_to_model(spec, np.asarray(geo.origin)[None])[0]
    A = world_to_model(spec, np.asarray(geo.origin)[None] + geo.affine[:3, :3].T) - b
    A = A.T  # columns: model displacement per unit step of i, j, k
    labels = np.zeros(geo.shape, dtype=np.uint8)
    coords = np.empty((ni, nj, nk, 3), dtype=np.float32)
    ii = np.arange(ni, dtype=float)[:, None, None]
    jj = np.arange(nj, dtype=float)[None, :, None]
    step = max(1, int(2_000_000 // (ni * nj)))
    for k0 in range(0, nk, step):
        ks = np.arange(k0, min(nk, k0 + step), dtype=float)[None, None, :]
        p = np.empty((ni, nj, ks.size, 3))
        for c in range(3):
            p[..., c] = b[c] + A[c, 0] * ii + A[c, 1] * jj + A[c, 2] * ks
        labels[:, :, k0:k0 + ks.size] = m.labels_at(p.reshape(-1, 3)).reshape(ni, nj, ks.size)
        coords[:, :, k0:k0 + ks.size] = p
    return labels, coords


# ----------------------------------------------------------------------------- image

def _render(spec: PhantomSpec, m: KneeModel, labels: np.ndarray, coords: np.ndarray,
            geo: Geometry, rng: np.random.Generator) -> np.ndarray:
    """MR-like int16 image from the labels and the model coordinates of the voxels."""
    from scipy.ndimage import gaussian_filter

    scheme = default_scheme()
    lut = np.full(256, _INTENSITY["soft_tissue"], dtype=np.float32)
    for name, value in scheme.labels.items():
        if name in _INTENSITY and value < 256:
            lut[value] = _INTENSITY[name]
    img = lut[labels]
    # air outside an elliptic "leg" cylinder around the knee
    bg = labels == 0
    leg = (coords[..., 0] / 48.0) ** 2 + ((coords[..., 1] + 6.0) / 44.0) ** 2 < 1.0
    img[bg & ~leg] = _INTENSITY["air"]
    # joint fluid: background in the femorotibial gap under the condyles (not the notch)
    ax = np.abs(coords[..., 0])
    fluid = bg & leg & (coords[..., 2] > m.z_t) & (coords[..., 2] < 0.5) & (
        np.abs(coords[..., 1]) < 20.0) & (ax >= m.condyle_x[0]) & (ax <= m.condyle_x[1] + 3.0)
    del ax
    img[fluid] = _INTENSITY["fluid"]
    del leg, fluid, bg
    if spec.blur_voxels > 0:
        img = gaussian_filter(img, sigma=spec.blur_voxels, mode="nearest")
    if spec.bias_field > 0:
        img *= _bias(geo.shape, spec.bias_field, rng)
    sigma = spec.noise_sigma * _INTENSITY["femoral_cartilage"]
    if sigma > 0:
        n1 = rng.standard_normal(img.shape, dtype=np.float32)
        n1 *= sigma
        img += n1
        rng.standard_normal(img.shape, dtype=np.float32, out=n1)
        n1 *= sigma
        img = np.sqrt(img * img + n1 * n1)
    return np.clip(np.round(img), 0, 32767).astype(np.int16)


def _bias(shape: tuple[int, int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """exp of a random quadratic polynomial in normalised grid coordinates, |log| <= amplitude."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    c = rng.uniform(-1.0, 1.0, size=9).astype(np.float32)
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    log_b = (c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * y * z + c[5] * x * z
             + c[6] * (x * x - 1 / 3) + c[7] * (y * y - 1 / 3) + c[8] * (z * z - 1 / 3))
    scale = amplitude / max(float(np.abs(log_b).max()), 1e-6)
    return np.exp(log_b * scale).astype(np.float32)


# ----------------------------------------------------------------------------- truth

def _truth(spec: PhantomSpec, m: KneeModel, geo: Geometry, labels: np.ndarray) -> dict[str, Any]:
    scheme = default_scheme()
    vv = geo.voxel_volume_mm3
    plates = {}
    for name, row in plate_truth(m, TRUTH_STEP_MM).items():
        row = dict(row)
        row["label_volume_mm3"] = float(np.count_nonzero(labels == scheme[name]) * vv)
        plates[name] = row
    defects = []
    if m.full_r > 0:
        fx, fphi = m.full_centre
        ph = math.radians(fphi)
        c = model_to_world(spec, [[fx, m.R * math.sin(ph), m.z_c - m.R * math.cos(ph)]])[0]
        defects.append({"plate": "femoral_cartilage", "kind": "full",
                        "area_mm2": math.pi * m.full_r ** 2, "depth_fraction": 1.0,
                        "radius_mm": m.full_r, "centre_world_mm": _r(c)})
    if m.partial_r > 0:
        px, py = m.partial_centre
        c = model_to_world(spec, [[px, py, m.z_t]])[0]
        defects.append({"plate": "lateral_tibial_cartilage", "kind": "partial",
                        "area_mm2": math.pi * m.partial_r ** 2,
                        "depth_fraction": m.partial_depth, "radius_mm": m.partial_r,
                        "centre_world_mm": _r(c)})
    lesions = []
    n_bml = np.count_nonzero(labels == scheme["bone_marrow_lesion"])
    for bone, radii, centre in m.lesions():
        lesions.append({"bone": bone, "volume_mm3": 4.0 / 3.0 * math.pi * float(np.prod(radii)),
                        "semi_axes_mm": list(radii), "max_diameter_mm": 2.0 * max(radii),
                        "centre_world_mm": _r(model_to_world(spec, [centre])[0])})
    return {
        "format": "cartiq-phantom-truth/1",
        "seed": spec.seed,
        "side": spec.side,
        "orientation": spec.orientation,
        "spacing_mm": list(geo.spacing),
        "direction": [round(float(v), 12) for v in geo.direction],
        "geometry": geo.to_json(),
        "rotation_deg": list(spec.rotation_deg),
        "translation_mm": list(spec.translation_mm),
        "knee_to_world": {"rotation_matrix": _motion(spec).round(10).tolist(),
                          "translation_mm": _r(np.asarray(spec.world_offset_mm)
                                               + np.asarray(spec.translation_mm)),
                          "mirror_x": spec.side == "left"},
        "plates": plates,
        "defects": defects,
        "lesions": lesions,
        "bone_marrow_lesion_label_volume_mm3": float(n_bml * vv),
        "menisci": {name: {"volume_mm3": vol,
                           "label_volume_mm3": float(np.count_nonzero(labels == scheme[name]) * vv)}
                    for name, vol in meniscus_volumes(m).items()},
        "truth_sampling_step_mm": TRUTH_STEP_MM,
        "truth_sampling_error_mm": TRUTH_SAMPLING_ERROR_MM,
        "spec": spec.to_dict(),
    }


def _r(v: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in v]


# ----------------------------------------------------------------------------- API

def _triplet(text: str | None, name: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} needs three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def spec_from_options(*, seed: int = 0, orientation: str = "oblique_sagittal",
                      spacing: str | None = None, side: str = "right",
                      rotation: str | None = None, translation: str | None = None) -> PhantomSpec:
    """A :class:`PhantomSpec` from CLI strings (``"0.45,0.45,1.0"`` style triplets)."""
    kw: dict[str, Any] = {"seed": seed, "orientation": orientation, "side": side}
    for key, text, name in (("spacing_mm", spacing, "--spacing"),
                            ("rotation_deg", rotation, "--rotation"),
                            ("translation_mm", translation, "--translation")):
        value = _triplet(text, name)
        if value is not None:
            kw[key] = value
    spec = PhantomSpec(**kw)
    _validate(spec)
    return spec


def make_phantom(spec: PhantomSpec | None = None) -> Phantom:
    """Build the phantom: image (int16), labels (uint8, cartiq scheme) and truth dict."""
    spec = spec or PhantomSpec()
    _validate(spec)
    m = knee_model(spec)
    geo = grid_geometry(spec)
    labels, coords = _label_grid(spec, m, geo)
    rng = np.random.default_rng(spec.seed)
    image = _render(spec, m, labels, coords, geo, rng)
    del coords
    truth = _truth(spec, m, geo, labels)
    meta = {"phantom": True, "side": spec.side}
    log.info("phantom %s, %s voxels of %s mm", spec.orientation, "x".join(map(str, geo.shape)),
             "x".join(f"{s:g}" for s in geo.spacing))
    return Phantom(image=Volume(image, geo, meta=dict(meta)),
                   labels=Volume(labels, geo, meta=dict(meta)), truth=truth)


def write_phantom(ph: Phantom, folder: str | Path) -> dict[str, Path]:
    """Write ``image.nii.gz``, ``seg.nii.gz`` and ``truth.json`` (each atomically)."""
    folder = Path(folder)
    paths = {"image": folder / "image.nii.gz", "seg": folder / "seg.nii.gz",
             "truth": folder / "truth.json"}
    write_volume(paths["image"], ph.image.array, ph.image.geometry)
    write_volume(paths["seg"], ph.labels.array, ph.labels.geometry)
    atomic_write_text(paths["truth"], json.dumps(ph.truth, indent=2) + "\n")
    return paths
