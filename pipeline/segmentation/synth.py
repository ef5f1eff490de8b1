"""SynthSeg-style synthetic MR images rendered from label maps (training data).

No real labelled knee MRI is available, so the default model is trained the way SynthSeg
(Billot et al., Medical Image Analysis 2023, doi:10.1016/j.media.2023.102789) is: every
training sample is a random image rendered from a real label map.  One sample is made by

1. a random affine (rotation, per-axis scale) + elastic deformation and optional
   left/right mirroring of the label map, sampled on a crop of the canonical LPS grid;
2. optional bone-marrow lesions planted as random ellipsoids in subchondral femur/tibia;
   optional cartilage defects (random spheres on a plate; full-thickness, or partial:
   only the cartilage not touching bone is removed), plate thinning (the articular
   surface layer of every plate removed; removed cartilage is rendered as joint fluid) and
   plate thickening (a layer added on the articular side of every plate): plates thinner and
   thicker than the maps draw them; and per-plate thickness variety (each plate class on its
   own gains or loses a random number of articular layers), so that no plate's thickness is
   tied to the training maps' own, or to another plate's;
3. rendering-only sub-labels: the unmeasured tissues a map names (a label mapping's
   ``tissues:``: fat, muscle, ligament, vessel; the SPL atlas has the cruciate ligaments in
   the intercondylar notch, Hoffa's fat pad and the thigh and calf muscles), random smooth
   "soft tissue" regions splitting the rest of the background, a cortical-bone rim, a
   joint-fluid shell around cartilage and menisci and, optionally, an effusion: random
   smooth pockets of joint fluid in the background along the bones near the joint (the
   recesses and the suprapatellar pouch of an OA knee), labelled background; and,
   optionally, cartilage-like decoys: smooth patches of a thin layer along the bones' bare
   (non-articular) surfaces, away from every plate and meniscus, drawn at a random fraction
   of the cartilage intensity and labelled background (the periosteum, synovium and fat over
   the anterior femur and in the notch, which an MR image can show as grey as cartilage),
   so that the network must place cartilage by where it lies, not by its grey level alone;
4. per-label Gaussian intensities (fully random, or MR-like contrast families: DESS-,
   PD-fat-sat-, T1- and T2-FSE-like, jittered; :data:`CONTRAST_FAMILIES`);
5. per-axis Gaussian blur for a random acquisition resolution (slice thickness across the
   sagittal axis, in-plane resolution) and partial volume, a multiplicative smooth bias
   field, Rician noise, percentile normalisation and a random gamma.

Everything runs vectorised in torch on one crop (``D x H x W`` voxels, axis 0 = patient
left-right, the sagittal slice axis).  Label values are the network's training classes
:data:`MODEL_CLASSES` (tibial cartilage and menisci not split into medial/lateral; fibula
kept to tell the knee side).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field

from cartiq.config import Strict
from cartiq.io.labels import RENDER_TISSUES
from cartiq.segmentation.grid import normalize_array

__all__ = ["MODEL_CLASSES", "CONTRAST_FAMILIES", "SynthConfig", "Renderer", "to_model_classes",
           "add_tissues", "load_label_map_canonical"]

log = logging.getLogger(__name__)

MODEL_CLASSES = ("background", "femur", "tibia", "patella", "femoral_cartilage",
                 "tibial_cartilage", "patellar_cartilage", "meniscus", "fibula",
                 "bone_marrow_lesion")
_C = {n: i for i, n in enumerate(MODEL_CLASSES)}
_BONES = (_C["femur"], _C["tibia"], _C["patella"], _C["fibula"])
_PLATES = (_C["femoral_cartilage"], _C["tibial_cartilage"], _C["patellar_cartilage"])
_BONE_OR_BML = _BONES + (_C["bone_marrow_lesion"],)
_SOFT = _PLATES + (_C["meniscus"],)
N_BG, CORTEX, FLUID = 4, len(MODEL_CLASSES) + 4, len(MODEL_CLASSES) + 5
N_RENDER = len(MODEL_CLASSES) + 6
#: A canonical training map stores a named unmeasured tissue (fat, muscle, ...) as
#: TISSUE0 + its index in RENDER_TISSUES: background for the network, its own intensity
#: here.  Their intensities are drawn only for crops that hold one, after the others, so
#: maps without named tissues render exactly as before.
TISSUE0 = N_RENDER

# MR-like contrast families: (low, high) mean intensity per rendering class.  Tendons and
# ligaments are dark in every sequence; fat is dark with fat suppression (the qDESS is
# water-excited: muscle there is mid-grey, subcutaneous fat dark) and bright without.
_FAMILIES = {
    "dess": {"bone": (0.2, 0.45), "femoral_cartilage": (0.5, 0.8), "cart": (0.5, 0.8),
             "meniscus": (0.0, 0.12), "bml": (0.55, 1.0), "cortex": (0.0, 0.08),
             "fluid": (0.75, 1.0), "bg": [(0.15, 0.35), (0.05, 0.6), (0.0, 0.3), (0.2, 0.7)],
             "fat": (0.0, 0.2), "muscle": (0.2, 0.5), "ligament": (0.0, 0.1),
             "vessel": (0.05, 0.8)},
    "pdfs": {"bone": (0.05, 0.2), "cart": (0.3, 0.55), "meniscus": (0.0, 0.08),
             "bml": (0.5, 0.9), "cortex": (0.0, 0.06), "fluid": (0.75, 1.0),
             "bg": [(0.2, 0.4), (0.03, 0.15), (0.0, 0.3), (0.1, 0.5)],
             "fat": (0.0, 0.12), "muscle": (0.1, 0.3), "ligament": (0.0, 0.08),
             "vessel": (0.05, 0.8)},
    "t1": {"bone": (0.65, 0.95), "cart": (0.25, 0.45), "meniscus": (0.0, 0.08),
           "bml": (0.1, 0.3), "cortex": (0.0, 0.06), "fluid": (0.08, 0.2),
           "bg": [(0.2, 0.35), (0.75, 1.0), (0.0, 0.3), (0.3, 0.6)],
           "fat": (0.75, 1.0), "muscle": (0.2, 0.4), "ligament": (0.0, 0.08),
           "vessel": (0.0, 0.5)},
    # T2-weighted fast spin echo without fat suppression (and the early echoes of a
    # multi-echo spin echo): bright fluid, darker cartilage, fatty marrow and fat fairly bright
    "t2": {"bone": (0.35, 0.65), "cart": (0.1, 0.3), "meniscus": (0.0, 0.08),
           "bml": (0.55, 0.85), "cortex": (0.0, 0.06), "fluid": (0.8, 1.0),
           "bg": [(0.08, 0.25), (0.4, 0.75), (0.0, 0.3), (0.1, 0.5)],
           "fat": (0.4, 0.75), "muscle": (0.08, 0.25), "ligament": (0.0, 0.08),
           "vessel": (0.1, 0.9)},
}
CONTRAST_FAMILIES = tuple(_FAMILIES)


def _ordered_from(low: float, what: str = "a range"):
    """Validator of a (low, high) pair: ``low <= value[0] <= value[1]``."""
    def check(value: tuple) -> tuple:
        lo, hi = value
        if not low <= lo <= hi:
            raise ValueError(f"{what} must be (low, high) with {low:g} <= low <= high, "
                             f"got {list(value)}")
        return value
    return check


Family = Literal["dess", "pdfs", "t1", "t2"]
"""An MR-like contrast family of :data:`CONTRAST_FAMILIES`."""

Range = Annotated[tuple[float, float], AfterValidator(_ordered_from(0))]
"""A (low, high) range a value is drawn from uniformly, per crop: non-negative and ordered."""

VoxelRange = Annotated[tuple[int, int], AfterValidator(_ordered_from(1, "a voxel range"))]
"""A (low, high) range of whole voxels, at least 1 and ordered."""

FamilyTissue = Literal["bone", "cart", "meniscus", "bml", "cortex", "fluid", "fat", "muscle",
                       "ligament", "vessel"]
"""A rendering class whose mean a contrast family draws from one (low, high) range."""


class SynthConfig(Strict):
    """Randomisation ranges of the generative model (units in the key names)."""

    spacing_mm: float = Field(0.5, gt=0, description="isotropic grid the labels are sampled on")
    render_spacing_mm: float | None = Field(None, gt=0, description="training: load the maps "
        "and render each crop on this finer isotropic grid, then resample the crop linearly "
        "onto spacing_mm, as inference resamples a finer scan (the image then has the maps' "
        "detail and a resampled scan's texture). None: render on spacing_mm")
    crop_depth: int = Field(16, ge=4, description="voxels across the slice axis per crop")
    rotation_deg: float = Field(15.0, ge=0)
    scale_fraction: float = Field(0.15, ge=0, lt=1)
    elastic_mm: float = Field(3.0, ge=0, description="max displacement of the elastic field")
    mirror_probability: float = Field(0.5, ge=0, le=1)
    bml_probability: float = Field(0.35, ge=0, le=1)
    bml_radius_mm: Range = (2.0, 7.0)
    random_contrast_probability: float = Field(0.5, ge=0, le=1,
        description="fully random per-label means; else an MR-like family, jittered")
    contrast_families: tuple[Family, ...] = Field(
        CONTRAST_FAMILIES, min_length=1,
        description="MR-like families drawn from (uniformly) when the means are not random")
    intensity_std: Range = (0.0, 0.06)
    slice_thickness_mm: Range = (0.5, 3.0)
    inplane_resolution_mm: Range = (0.3, 0.9)
    bias_std: float = Field(0.3, ge=0)
    noise_std: Range = (0.0, 0.06)
    gamma_std: float = Field(0.25, ge=0)
    fluid_probability: float = Field(0.7, ge=0, le=1, description="chance per crop of a "
        "joint-fluid film on the background surface of cartilage and menisci")
    fluid_film_voxels: VoxelRange = Field(
        (1, 2), description="range of the film's "
        "thickness in voxels of the rendering grid (whole numbers, drawn uniformly per crop)")
    cartilage_fluid_ratio: dict[Family, Range] = Field(
        default_factory=dict, description="per contrast family, range of the cartilage mean "
        "as a fraction of the joint-fluid mean (drawn per crop; each plate keeps its jitter); "
        "a family not named keeps its own cartilage range")
    family_ranges: dict[Family, dict[FamilyTissue, Range]] = Field(
        default_factory=dict, description="per contrast family, mean-intensity ranges that "
        "replace the family's own for the classes named (for example dess: {bone: [0.03, "
        "0.45]} adds the dark marrow of water-excited DESS); families and classes not named "
        "keep their own ranges")
    cortex_probability: float = Field(0.8, ge=0, le=1)
    defect_probability: float = Field(0.0, ge=0, le=1,
        description="chance per crop of planting 1-3 cartilage defects (filled with fluid)")
    defect_radius_mm: Range = (2.0, 7.0)
    partial_defect_fraction: float = Field(0.5, ge=0, le=1,
        description="share of planted defects that keep the cartilage touching bone")
    thinning_probability: float = Field(0.0, ge=0, le=1,
        description="chance per crop of removing the articular surface layer (1 voxel)")
    thickening_probability: float = Field(0.0, ge=0, le=1, description="chance per crop of "
        "adding a layer (1 voxel) to the articular surface of every plate")
    plate_thickness_probability: float = Field(0.0, ge=0, le=1, description="chance per crop "
        "of changing each plate class's thickness on its own: a whole number of articular "
        "layers drawn from -plate_thickness_layers..plate_thickness_layers per class, removed "
        "(rendered as joint fluid) or added")
    plate_thickness_layers: int = Field(2, ge=1, le=4, description="largest number of voxel "
        "layers one plate gains or loses (at spacing_mm each)")
    effusion_probability: float = Field(0.0, ge=0, le=1,
        description="chance per crop of fluid pockets in the background along the bones")
    effusion_mm: Range = Field((5.0, 20.0), description="range of the largest "
        "distance of an effusion from cartilage and menisci (drawn per crop)")
    effusion_bone_mm: Range = Field((1.0, 4.0), description="range of the "
        "largest distance of an effusion from a bone surface (drawn per crop; large values "
        "give the wide collections of the recesses and gutters beside the condyles)")
    edge_crop_probability: float = Field(0.0, ge=0, le=1, description="chance per crop of "
        "moving its centre across the slices by up to edge_crop_mm, so that slices beyond "
        "the knee's structures (no bone in them, as at a scan's field-of-view edge) are seen")
    edge_crop_mm: float = Field(25.0, ge=0, description="largest such move")
    decoy_probability: float = Field(0.0, ge=0, le=1, description="chance per crop of "
        "cartilage-like decoys: smooth patches of a layer along the bare bone surfaces "
        "(farther than decoy_margin_mm from cartilage and menisci), rendered at "
        "decoy_intensity times the cartilage mean and labelled background")
    decoy_layers: int = Field(3, ge=1, le=8, description="deepest decoy layer, in voxels "
        "of spacing_mm (each crop draws its depth from 1..decoy_layers)")
    decoy_margin_mm: float = Field(3.0, ge=0, description="nearest a decoy comes to cartilage "
        "or a meniscus")
    decoy_intensity: Range = Field((0.5, 1.0), description="range of a decoy's "
        "intensity as a fraction of the femoral cartilage mean (drawn per crop)")


def to_model_classes(cartiq: np.ndarray, fibula: np.ndarray | None = None) -> np.ndarray:
    """Cartiq-scheme labels (+ optional fibula mask) to the network's training classes."""
    from cartiq.io.labels import default_scheme

    s = default_scheme()
    lut = np.zeros(max(s.labels.values()) + 1, np.uint8)
    same = ("femur", "tibia", "patella", "femoral_cartilage", "patellar_cartilage",
            "bone_marrow_lesion")
    for name in same:
        lut[s[name]] = _C[name]
    lut[s["medial_tibial_cartilage"]] = lut[s["lateral_tibial_cartilage"]] = _C["tibial_cartilage"]
    lut[s["medial_meniscus"]] = lut[s["lateral_meniscus"]] = _C["meniscus"]
    out = lut[np.asarray(cartiq)]
    if fibula is not None:
        out[np.asarray(fibula, bool) & (out == 0)] = _C["fibula"]
    return out


def add_tissues(classes: np.ndarray, source: np.ndarray, tissues: dict[int, str]) -> np.ndarray:
    """Code the background voxels of ``classes`` whose ``source`` value a mapping names as a
    tissue (``LabelMapping.tissues``) as ``TISSUE0 + i`` for the renderer (in place)."""
    for i, tissue in enumerate(RENDER_TISSUES):
        values = [v for v, t in tissues.items() if t == tissue]
        if values:
            classes[np.isin(source, values) & (classes == 0)] = TISSUE0 + i
    return classes


def load_label_map_canonical(path: Path, mapping: str, spacing_mm: float) -> np.ndarray:
    """Read a real label map, convert to training classes, resample onto an LPS grid.  The
    unmeasured tissues the mapping names (``tissues:``) are stored as ``TISSUE0 + i``
    (:class:`Renderer` draws them and hands the network background)."""
    from cartiq.io.volume import read_volume
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.segmentation.segmenter import canonical_geometry, resample_array

    vol = read_volume(path, kind="labels")
    mp = load_mapping(mapping)
    cart, _ = to_default_scheme(vol.array, mp, vol.geometry.affine, path=path)
    fib_values = [v for v, t in mp.map.items() if t == "fibula"]
    fib = np.isin(vol.array, fib_values) if fib_values else None
    classes = add_tissues(to_model_classes(cart, fib), vol.array, mp.tissues)
    dst = canonical_geometry(vol.geometry, (spacing_mm,) * 3)
    return resample_array(classes, vol.geometry, dst, nearest=True)


# ---------------------------------------------------------------------------- renderer


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur3d(img: torch.Tensor, sigmas: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of a (D, H, W) tensor; sigma in voxels per axis."""
    x = img[None, None]
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        k = _gauss_kernel(sigma)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        r = k.numel() // 2
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x[0, 0]


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    """Grey dilation of a (D, H, W) float tensor by a (2r+1)^3 box, separably."""
    y = x[None, None]
    for k in ((2 * r + 1, 1, 1), (1, 2 * r + 1, 1), (1, 1, 2 * r + 1)):
        y = F.max_pool3d(y, k, stride=1, padding=tuple(v // 2 for v in k))
    return y[0, 0]


def _any_of(lab: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """Mask of the voxels of ``lab`` whose class is one of ``classes``."""
    return torch.isin(lab, torch.tensor(classes, dtype=lab.dtype))


def _coords(shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel index coordinates of a crop, (D, H, W, 3) float."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _smooth_field(shape: tuple[int, ...], coarse: int, gen: torch.Generator,
                  n: int = 1) -> torch.Tensor:
    small = torch.randn((1, n) + tuple(max(2, s // coarse) for s in shape), generator=gen)
    return F.interpolate(small, size=shape, mode="trilinear", align_corners=True)[0]


class Renderer:
    """Random image + label crops from canonical label maps (see module docstring)."""

    def __init__(self, config: SynthConfig, seed: int = 0) -> None:
        self.cfg = config
        self.gen = torch.Generator().manual_seed(seed)
        self._fg: dict[int, torch.Tensor] = {}
        self._float: torch.Tensor | None = None
        self._float_key: int | None = None
        self.last_slice_thickness_mm = config.spacing_mm  # of the latest render()
        self.last_plate_layers: dict[int, int] = {}  # plate class -> layers (+added/-removed)

    def _u(self, lo: float, hi: float, n: int | tuple = ()) -> torch.Tensor:
        shape = (n,) if isinstance(n, int) else n
        return lo + (hi - lo) * torch.rand(shape, generator=self.gen)

    def _center(self, labels: torch.Tensor) -> torch.Tensor:
        key = id(labels)
        if key not in self._fg:  # crops centre on the knee's structures, not on muscle
            idx = torch.nonzero((labels > 0) & (labels < len(MODEL_CLASSES)))
            self._fg[key] = idx[torch.randperm(len(idx), generator=self.gen)[:20000]].float()
        pts = self._fg[key]
        return pts[int(torch.randint(len(pts), (1,), generator=self.gen))]

    def _grid(self, labels: torch.Tensor, shape: tuple[int, int, int],
              center: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        c = self._center(labels) if center is None else center
        a = torch.deg2rad(self._u(-cfg.rotation_deg, cfg.rotation_deg, 3))
        cx, cy, cz = torch.cos(a)
        sx, sy, sz = torch.sin(a)
        rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        scale = self._u(1 - cfg.scale_fraction, 1 + cfg.scale_fraction, 3)
        rot = rz @ ry @ rx
        m = rot @ torch.diag(scale)
        if cfg.edge_crop_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < cfg.edge_crop_probability:
            # centres are on the knee's structures, so a crop sees at most half its depth
            # beyond them; this move shows the slices past the condyles too
            c = c + rot[:, 0] * float(self._u(-cfg.edge_crop_mm, cfg.edge_crop_mm)) / cfg.spacing_mm
        if float(torch.rand(1, generator=self.gen)) < cfg.mirror_probability:
            m = m @ torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
        axes = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in shape]
        q = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # D,H,W,3
        p = q @ m.T + c
        if cfg.elastic_mm > 0:
            amp = float(self._u(0, cfg.elastic_mm / cfg.spacing_mm))
            disp = _smooth_field(shape, 16, self.gen, n=3).permute(1, 2, 3, 0)
            p = p + amp * disp / 2.0
        size = torch.tensor(labels.shape, dtype=torch.float32)
        norm = 2 * p / (size - 1) - 1
        return norm.flip(-1)[None]  # grid_sample wants (z, y, x) = (W, H, D) order

    def _plant_bml(self, lab: torch.Tensor) -> None:
        cfg = self.cfg
        bone_c = _C["femur"] if float(torch.rand(1, generator=self.gen)) < 0.5 else _C["tibia"]
        bone = lab == bone_c
        if bone.sum() < 100:
            return
        cart = ((lab == _C["femoral_cartilage"]) | (lab == _C["tibial_cartilage"])).float()
        near = _dilate(cart, 10) > 0
        cand = torch.nonzero(bone & near)
        if len(cand) == 0:
            return
        c = cand[int(torch.randint(len(cand), (1,), generator=self.gen))].float()
        r = self._u(*cfg.bml_radius_mm, 3) / cfg.spacing_mm
        g = _coords(tuple(lab.shape))
        d = (((g - c) / r) ** 2).sum(-1)
        d = d + 0.3 * _smooth_field(tuple(lab.shape), 4, self.gen)[0]
        lab[(d < 1) & bone] = _C["bone_marrow_lesion"]

    def _plant_defects(self, lab: torch.Tensor) -> torch.Tensor:
        """Remove cartilage in 1-3 random spheres (in place); returns the removed voxels."""
        cfg = self.cfg
        cart = _any_of(lab, _PLATES)
        removed = torch.zeros_like(cart)
        cand = torch.nonzero(cart)
        if len(cand) < 50:
            return removed
        on_bone = (_dilate(_any_of(lab, _BONES).float(), 1) > 0) & cart
        g = _coords(tuple(lab.shape))
        for _ in range(int(torch.randint(1, 4, (1,), generator=self.gen))):
            c = cand[int(torch.randint(len(cand), (1,), generator=self.gen))].float()
            r = float(self._u(*cfg.defect_radius_mm)) / cfg.spacing_mm
            ball = (((g - c) ** 2).sum(-1) < r * r) & cart
            if float(torch.rand(1, generator=self.gen)) < cfg.partial_defect_fraction:
                ball &= ~on_bone
            removed |= ball
        lab[removed] = 0
        return removed

    def _thin(self, lab: torch.Tensor, plates: tuple[int, ...] = _PLATES) -> torch.Tensor:
        """Remove the articular surface layer of the ``plates`` (in place); returns it."""
        cart = _any_of(lab, _PLATES)
        bone = _any_of(lab, _BONE_OR_BML)
        outside = ~(cart | bone)  # joint space, menisci, soft tissue
        surface = _any_of(lab, plates) & (_dilate(outside.float(), 1) > 0) & ~(_dilate(bone.float(), 1) > 0)
        lab[surface] = 0
        return surface

    def _thicken(self, lab: torch.Tensor, fluid: torch.Tensor | None,
                 plates: tuple[int, ...] = _PLATES) -> torch.Tensor:
        """Add one voxel layer of the plate's own class on the articular side of each of the
        ``plates`` (background voxels touching the plate, not touching bone and not ``fluid``,
        the cartilage a defect or thinning removed; in place); returns the layer."""
        bone = _any_of(lab, _BONE_OR_BML)
        free = (lab == 0) & ~(_dilate(bone.float(), 1) > 0)
        if fluid is not None:
            free &= ~fluid
        added = torch.zeros_like(free)
        for c in plates:
            grow = free & ~added & (_dilate((lab == c).float(), 1) > 0)
            lab[grow] = c
            added |= grow
        return added

    def _vary_plates(self, lab: torch.Tensor, fluid: torch.Tensor | None) -> torch.Tensor | None:
        """Per-plate thickness variety (in place): each plate class gains or loses its own
        random number of articular layers; returns ``fluid`` with the removed layers added."""
        most = self.cfg.plate_thickness_layers
        for c in _PLATES:
            k = int(torch.randint(-most, most + 1, (1,), generator=self.gen))
            self.last_plate_layers[c] = k
            for _ in range(abs(k)):
                if k > 0:
                    self._thicken(lab, fluid, (c,))
                else:
                    gone = self._thin(lab, (c,))
                    fluid = gone if fluid is None else fluid | gone
        return fluid

    def _effusion(self, lab: torch.Tensor, bone: torch.Tensor,
                  soft: torch.Tensor) -> torch.Tensor:
        """Random smooth pockets within a random ``effusion_bone_mm`` of a bone surface and
        within a random ``effusion_mm`` of cartilage or menisci (where a knee's fluid
        collects); ``bone`` and ``soft``: the crop's bone (+ BML) and cartilage + menisci
        masks."""
        cfg = self.cfg
        sp = cfg.spacing_mm
        reach = float(self._u(*cfg.effusion_bone_mm))
        along = _dilate(bone.float(), max(1, round(reach / sp))) > 0
        near = _dilate(soft.float(), max(1, round(float(self._u(*cfg.effusion_mm)) / sp))) > 0
        blobs = _smooth_field(tuple(lab.shape), 8, self.gen)[0] > float(self._u(-0.5, 0.8))
        return along & near & blobs & (lab == 0)

    def _decoy(self, lab: torch.Tensor, fluid: torch.Tensor | None) -> torch.Tensor:
        """Mask of random smooth patches of a layer (1..``decoy_layers`` voxels deep) of the
        background along the bone surfaces, no nearer than ``decoy_margin_mm`` to cartilage or
        a meniscus and outside ``fluid`` (the cartilage that defects and thinning removed)."""
        cfg = self.cfg
        bone = _any_of(lab, _BONE_OR_BML)
        soft = _any_of(lab, _SOFT)
        depth = int(torch.randint(1, cfg.decoy_layers + 1, (1,), generator=self.gen))
        margin = math.ceil(cfg.decoy_margin_mm / cfg.spacing_mm)  # 0: may touch them
        layer = (_dilate(bone.float(), depth) > 0) & (lab == 0)
        away = ~(_dilate(soft.float(), margin) > 0)
        patches = _smooth_field(tuple(lab.shape), 8, self.gen)[0] > float(self._u(-0.5, 0.5))
        mask = layer & away & patches
        if fluid is not None:
            mask &= ~fluid
        return mask

    def _means(self) -> tuple[torch.Tensor, dict | None]:
        """Mean intensity per rendering class, and the contrast family (None: random)."""
        cfg = self.cfg
        if float(torch.rand(1, generator=self.gen)) < cfg.random_contrast_probability:
            return torch.rand(N_RENDER, generator=self.gen), None
        fams = cfg.contrast_families
        name = fams[int(torch.randint(len(fams), (1,), generator=self.gen))]
        fam = {**_FAMILIES[name], **cfg.family_ranges.get(name, {})}
        mu = torch.zeros(N_RENDER)

        def pick(rng: tuple[float, float]) -> float:
            return float(self._u(*rng))

        bone = pick(fam["bone"])
        for b in _BONES:
            mu[b] = min(1.0, max(0.0, bone + float(self._u(-0.04, 0.04))))
        cart = pick(fam["cart"])
        for c in _PLATES:
            mu[c] = min(1.0, max(0.0, cart + float(self._u(-0.05, 0.05))))
        mu[_C["meniscus"]] = pick(fam["meniscus"])
        mu[_C["bone_marrow_lesion"]] = pick(fam["bml"])
        for i, rng in enumerate(fam["bg"]):
            mu[len(MODEL_CLASSES) + i] = pick(rng)
        mu[_C["background"]] = pick(fam["bg"][0])
        mu[CORTEX] = pick(fam["cortex"])
        mu[FLUID] = pick(fam["fluid"])
        ratio = cfg.cartilage_fluid_ratio.get(name)
        if ratio is not None:  # the plates' common mean moves to ratio x fluid
            scale = float(mu[FLUID]) * pick(ratio) / max(cart, 1e-6)
            mu[list(_PLATES)] = (mu[list(_PLATES)] * scale).clamp(0.0, 1.0)
        return mu, fam

    def _tissue_means(self, fam: dict | None) -> torch.Tensor:
        if fam is None:
            return torch.rand(len(RENDER_TISSUES), generator=self.gen)
        return torch.stack([self._u(*fam[t]) for t in RENDER_TISSUES])

    def render(self, lab: torch.Tensor, fluid: torch.Tensor | None = None,
               tissue: torch.Tensor | None = None,
               decoy: torch.Tensor | None = None) -> torch.Tensor:
        """Random MR-like image (float32, normalised to [0, 1]) for a (D, H, W) label crop;
        ``fluid`` (optional mask) is rendered as joint fluid (removed cartilage), ``tissue``
        (optional, 0 or a ``TISSUE0 + i`` code per voxel) as the named unmeasured tissues,
        ``decoy`` (optional mask of background) as cartilage dimmed by a random
        ``decoy_intensity`` factor."""
        cfg = self.cfg
        shape = tuple(lab.shape)
        rl = lab.clone().long()
        bgsub = _smooth_field(shape, 32, self.gen, n=N_BG).argmax(0) + len(MODEL_CLASSES)
        bg = lab == 0
        rl[bg] = bgsub[bg]
        if tissue is not None:
            named = tissue > 0
            rl[named] = tissue[named].long()
            bg = bg & ~named  # the fluid shell below only replaces unnamed background
        bone = _any_of(lab, _BONE_OR_BML)
        soft = _any_of(lab, _SOFT)
        if float(torch.rand(1, generator=self.gen)) < cfg.cortex_probability:
            eroded = -_dilate(-bone.float(), 1)
            rl[bone & (eroded < 0.5) & (lab != _C["bone_marrow_lesion"])] = CORTEX
        if float(torch.rand(1, generator=self.gen)) < cfg.fluid_probability:
            lo, hi = cfg.fluid_film_voxels
            r = lo + int(float(torch.rand(1, generator=self.gen)) * (hi - lo + 1))
            near = _dilate(soft.float(), r)  # torch.rand < 1: r <= hi
            rl[bg & (near > 0)] = FLUID
        if cfg.effusion_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < cfg.effusion_probability:
            rl[bg & self._effusion(lab, bone, soft)] = FLUID
        if fluid is not None:
            rl[fluid] = FLUID
        if decoy is not None:
            rl[decoy] = _C["femoral_cartilage"]
        mu, fam = self._means()
        sd = self._u(*cfg.intensity_std, N_RENDER)
        if tissue is not None:
            mu = torch.cat([mu, self._tissue_means(fam)])
            sd = torch.cat([sd, self._u(*cfg.intensity_std, len(RENDER_TISSUES))])
        img = mu[rl] + sd[rl] * torch.randn(shape, generator=self.gen)
        if decoy is not None:
            img[decoy] *= float(self._u(*cfg.decoy_intensity))
        thick = float(self._u(*cfg.slice_thickness_mm))
        self.last_slice_thickness_mm = thick
        inpl = float(self._u(*cfg.inplane_resolution_mm))
        base = float(self._u(0.0, 0.6))
        sig = [max(base, 0.42 * thick / cfg.spacing_mm)] + [max(base, 0.42 * inpl /
                                                               cfg.spacing_mm)] * 2
        img = blur3d(img, tuple(sig))
        if cfg.bias_std > 0:
            img = img * torch.exp(cfg.bias_std * _smooth_field(shape, 32, self.gen)[0])
        ns = float(self._u(*cfg.noise_std))
        n1 = torch.randn(shape, generator=self.gen)
        n2 = torch.randn(shape, generator=self.gen)
        img = torch.sqrt((img + ns * n1) ** 2 + (ns * n2) ** 2)
        # the same normalisation as at inference (segmentation.grid.normalize_array)
        img = torch.from_numpy(normalize_array(img.numpy(), (0.5, 99.5)))
        gamma = math.exp(float(torch.randn(1, generator=self.gen)) * cfg.gamma_std)
        return img.clamp(0, 1) ** gamma

    def sample(self, labels: torch.Tensor, shape: tuple[int, int, int], *,
               center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One random (image, labels) crop of ``shape`` from a canonical label volume."""
        grid = self._grid(labels, shape, center)
        key = id(labels)
        if self._float_key != key:
            self._float, self._float_key = labels[None, None].float(), key
        lab = F.grid_sample(self._float, grid, mode="nearest",
                            padding_mode="zeros", align_corners=True)[0, 0].round().to(torch.uint8)
        tissue = None
        if int(lab.max()) >= TISSUE0:
            named = lab >= TISSUE0
            tissue = torch.where(named, lab, torch.zeros_like(lab))
            lab[named] = 0
        if float(torch.rand(1, generator=self.gen)) < self.cfg.bml_probability:
            self._plant_bml(lab)
        fluid = None
        if self.cfg.defect_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < self.cfg.defect_probability:
            fluid = self._plant_defects(lab)
        if self.cfg.thinning_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < self.cfg.thinning_probability:
            thin = self._thin(lab)
            fluid = thin if fluid is None else fluid | thin
        if self.cfg.thickening_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < self.cfg.thickening_probability:
            self._thicken(lab, fluid)
        self.last_plate_layers = {}
        if self.cfg.plate_thickness_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < self.cfg.plate_thickness_probability:
            fluid = self._vary_plates(lab, fluid)
        decoy = None
        if self.cfg.decoy_probability > 0 and \
                float(torch.rand(1, generator=self.gen)) < self.cfg.decoy_probability:
            decoy = self._decoy(lab, fluid)
        return self.render(lab, fluid, tissue, decoy), lab.long()
