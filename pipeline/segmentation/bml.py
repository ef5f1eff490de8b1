"""Intensity-based bone-marrow-lesion (BML) detector for fluid-sensitive scans.

On fluid-sensitive sequences (PD/T2 fat-saturated, STIR, DESS) a BML is marrow that is much
brighter than the *same bone's* normal marrow.  For each bone (femur, tibia, patella):

1. the marrow mask - the bone label plus existing BML labels that lie inside that bone
   (enclosed by bone: :func:`cartiq.segmentation.post.shell_outside_fraction` at most
   ``BML_MAX_OUTSIDE``; a lesion label on the bone's outer surface or in soft tissue is not
   marrow) - is eroded by ``erosion_mm`` so that partial volume with bright
   cartilage/fluid at the bone surface does not count;
2. the image is smoothed (Gaussian, ``smoothing_sigma_mm``) against noise;
3. normal marrow statistics are robust: median ``m`` and ``s = 1.4826 * MAD`` of the
   smoothed intensities in the eroded bone;
4. seeds are voxels brighter than ``m + threshold_sigma * s`` (and, for positive images,
   than ``min_ratio * m``);
5. each seed component's extent is the half-maximum region around it: voxels of the
   smoothed image above ``m + 0.5 * (peak - m)`` (``peak`` = 95th percentile of the seed),
   connected to the seed, inside the eroded bone - the usual full-width-at-half-maximum
   convention, which keeps the volume of a blurred lesion close to its true volume;
6. components smaller than ``min_lesion_volume_mm3`` are dropped.

Not validated on real BMLs (no labelled data here); a research aid, not a diagnosis.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from cartiq.config import Strict, load_config

__all__ = ["BMLConfig", "detect_bml", "apply_bml", "load_bml_config"]

log = logging.getLogger(__name__)


class BMLConfig(Strict):
    bones: tuple[str, ...] = ("femur", "tibia", "patella")
    erosion_mm: float = Field(1.0, ge=0, description="ignore this rim of each bone")
    smoothing_sigma_mm: float = Field(0.5, ge=0)
    threshold_sigma: float = Field(5.0, gt=0, description="seed: median + k * robust SD")
    min_ratio: float = Field(1.4, ge=1, description="seed: also > ratio * median (if > 0)")
    half_max_fraction: float = Field(0.5, gt=0, lt=1,
        description="lesion extent: above median + fraction * (peak - median)")
    min_lesion_volume_mm3: float = Field(20.0, ge=0)
    connectivity: Literal[6, 18, 26] = Field(26, description="voxel neighbourhood: 6, 18 or 26")


def load_bml_config(path: Path | None = None) -> BMLConfig:
    return load_config(path, BMLConfig, default_name="bml.yaml")


def detect_bml(image: np.ndarray, labels: np.ndarray, spacing_mm: tuple[float, float, float],
               config: BMLConfig = BMLConfig()) -> np.ndarray:
    """Boolean BML mask (same shape as ``image``) from intensity inside each bone.

    Parameters
    ----------
    image : scan intensities (any units), ITK index order.
    labels : cartiq-scheme label map on the same grid.
    spacing_mm : voxel spacing per index axis, mm.
    """
    import cc3d
    import edt
    from scipy import ndimage

    from cartiq.io.labels import PLATES, default_scheme
    from cartiq.segmentation.post import BML_MAX_OUTSIDE, bbox, shell_outside_fraction

    s = default_scheme()
    sp = np.asarray(spacing_mm, float)
    img = np.asarray(image, np.float32)
    if config.smoothing_sigma_mm > 0:
        img = ndimage.gaussian_filter(img, config.smoothing_sigma_mm / sp, mode="nearest")
    out = np.zeros(labels.shape, bool)
    vox_mm3 = float(np.prod(sp))
    for bone in config.bones:
        box = bbox(labels == s[bone])
        if box is None:
            continue
        box = tuple(slice(max(0, b.start - 2), b.stop + 2) for b in box)
        lab = labels[box]
        mask = (lab == s[bone]) | (lab == s["bone_marrow_lesion"])
        # only BML voxels touching this bone and enclosed by it are its marrow
        comps = cc3d.connected_components(mask, connectivity=26)
        own = np.unique(comps[lab == s[bone]])
        mask = np.isin(comps, own[own > 0])
        marrow_like = [s[bone], s["bone_marrow_lesion"]] + [s[p] for p in PLATES]
        bml_cc, _, outside = shell_outside_fraction(mask & (lab == s["bone_marrow_lesion"]),
                                                    lab, marrow_like)
        mask &= ~np.isin(bml_cc, np.flatnonzero(outside > BML_MAX_OUTSIDE))
        dist = edt.edt(mask, anisotropy=tuple(sp), black_border=True)
        inner = dist > config.erosion_mm
        if inner.sum() < 50:
            continue
        sub = img[box]
        vals = sub[inner]
        med = float(np.median(vals))
        sd = 1.4826 * float(np.median(np.abs(vals - med)))
        thr = med + config.threshold_sigma * max(sd, 1e-6)
        if med > 0:
            thr = max(thr, config.min_ratio * med)
        seeds = inner & (sub > thr)
        if not seeds.any():
            continue
        seed_cc, n = cc3d.connected_components(seeds, connectivity=config.connectivity,
                                               return_N=True)
        stats = cc3d.statistics(seed_cc)
        margin = np.ceil(10.0 / sp).astype(int)  # a lesion grows at most 10 mm past its seed
        lesion = np.zeros(mask.shape, bool)
        for i in range(1, n + 1):
            bb = stats["bounding_boxes"][i]
            win = tuple(slice(max(0, b.start - m), b.stop + m) for b, m in zip(bb, margin))
            seed = seed_cc[win] == i
            w_img, w_inner = sub[win], inner[win]
            peak = float(np.percentile(w_img[seed], 95))
            level = med + config.half_max_fraction * (peak - med)
            rc = cc3d.connected_components(w_inner & (w_img >= level),
                                           connectivity=config.connectivity)
            ids = np.unique(rc[seed])
            comp = np.isin(rc, ids[ids > 0])
            if comp.sum() * vox_mm3 >= config.min_lesion_volume_mm3:
                lesion[win] |= comp
        out[box] |= lesion
        log.debug("%s: marrow median %.1f, robust SD %.1f, BML %.0f mm3", bone, med, sd,
                  lesion.sum() * vox_mm3)
    return out


def apply_bml(labels: np.ndarray, image: np.ndarray, spacing_mm: tuple[float, float, float],
              mode: str, config: BMLConfig = BMLConfig()) -> np.ndarray:
    """Combine model and intensity BMLs: ``mode`` is ``model``, ``intensity`` or ``both``.

    ``intensity`` first returns the model's BML voxels to the bone they lie in.
    """
    from scipy import ndimage

    from cartiq.io.labels import default_scheme

    if mode not in ("model", "intensity", "both"):
        raise ValueError(f"bml mode must be model, intensity or both, got {mode!r}")
    if mode == "model":
        return labels
    s = default_scheme()
    bml_val = s["bone_marrow_lesion"]
    out = labels.copy()
    if mode == "intensity" and (out == bml_val).any():
        bml = out == bml_val
        tmp = np.where(bml, 0, out)
        idx = ndimage.distance_transform_edt(tmp == 0, return_distances=False,
                                             return_indices=True)
        out[bml] = tmp[tuple(i[bml] for i in idx)]
    found = detect_bml(image, out, spacing_mm, config)
    bones = np.isin(out, [s[b] for b in config.bones])
    out[found & (bones | (out == bml_val))] = bml_val
    return out
