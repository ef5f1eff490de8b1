"""Post-processing of a raw segmentation: anatomical clean-up, then the cartiq scheme.

The network's output values (its own ``labels``, e.g. ``tibial_cartilage`` or ``meniscus``
without a medial/lateral distinction) are cleaned up per structure
(:func:`clean_prediction`) and mapped into the cartiq scheme (:func:`to_cartiq_scheme`),
splitting tibial cartilage and menisci into medial and lateral; see :mod:`cartiq.segmentation.segmenter`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cartiq.errors import InputError
from cartiq.io.volume import Geometry, Volume

__all__ = ["clean_prediction", "to_cartiq_scheme", "check_medial_lateral", "bone_cartilage_values",
           "shell_outside_fraction", "CARTILAGE_BAND_MM", "MENISCUS_BAND_MM", "BML_MAX_OUTSIDE",
           "FEMUR_BELOW_PLATEAU_MM"]

log = logging.getLogger(__name__)


def clean_prediction(raw: np.ndarray, geom: Geometry, labels: dict[int, str],
                     min_component_mm3: float) -> np.ndarray:
    """Anatomical clean-up of the raw prediction (model output values, ``labels``).

    Bones: one component each, the one the bone's cartilage lies on, else the largest; for
    the patella only among components anterior to the femur (when any is).  Fibula:
    dropped unless plausible (>= 1000 mm3, within 10 mm of the tibia, centroid below the
    tibial plateau) since it decides the side.
    Cartilage, menisci, BML: components below ``min_component_mm3`` or farther than
    2 mm (cartilage), 4 mm (menisci) or 1 mm (BML) from their bone are removed; then

    * cartilage only in a band along its own bone surface: voxels farther than
      ``CARTILAGE_BAND_MM`` from it are removed;
    * menisci only between femur and tibia: voxels farther than ``MENISCUS_BAND_MM`` from
      either bone are removed;
    * BMLs only inside bone: a lesion whose boundary faces mostly soft tissue (more than
      ``BML_MAX_OUTSIDE`` of its 6-neighbour shell is neither bone, cartilage nor lesion)
      is removed;
    * islands that this trimming detaches (below ``min_component_mm3``) are removed;
    * the femur only above the tibial plateau: femur voxels more than
      ``FEMUR_BELOW_PLATEAU_MM`` below the lowest tibial cartilage (its 1st percentile in
      patient S-I) are removed, before the cartilage is checked against its bone.  The
      default model draws pieces of "femur" in random tissue at the field of view's edge
      slices, from the condyles down beside the tibia; on the four real maps the femur's
      lowest voxel lies 3.9-7.0 mm *above* that level.

    The bands hold every voxel of the four real label maps (farthest cartilage voxel
    6.9 mm from its bone; meniscus voxels up to 11.5 mm from the tibia, 14.1 mm from the
    femur).
    """
    import cc3d
    import edt

    by_name = {n: v for v, n in labels.items()}
    out = raw.copy()
    vox = geom.voxel_volume_mm3
    sp = np.asarray(geom.spacing)
    bone_carts = bone_cartilage_values(labels)
    for name in ("femur", "tibia", "patella", "fibula"):
        if name in by_name:
            box = bbox(raw == by_name[name])
            if box is None:
                continue
            sub = raw[box]
            mask = sub == by_name[name]
            comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
            carts = bone_carts.get(by_name[name], [])
            cart = np.isin(sub, carts) if carts and n > 1 else None
            sizes, score = _component_scores(comps, n, cart)
            keep = _choose_component(sizes, score)
            if name == "patella" and n > 1 and "femur" in by_name:
                allowed = _anterior_to_femur(comps, n, box, out == by_name["femur"], geom)
                chosen = _choose_component(sizes, score, allowed)
                if chosen != keep:
                    log.info("patella: kept the component in front of the femur (%.0f mm3), "
                             "not the one behind it (%.0f mm3)", sizes[chosen] * vox,
                             sizes[keep] * vox)
                    keep = chosen
            out[box][mask & (comps != keep)] = 0
    if "femur" in by_name:
        _femur_above_plateau(out, by_name, geom)
    if "fibula" in by_name and "tibia" in by_name:
        _check_fibula(out, by_name["fibula"], by_name["tibia"], geom)
    for name, (bones, max_mm) in _NEAR.items():
        if name not in by_name:
            continue
        value = by_name[name]
        box = bbox(out == value)
        if box is None:
            continue
        pad_mm = max(max_mm, CARTILAGE_BAND_MM if "cartilage" in name else
                     max(MENISCUS_BAND_MM.values()) if "meniscus" in name else 0.0)
        m = np.ceil(pad_mm / sp).astype(int) + 1
        box = tuple(slice(max(0, b.start - k), b.stop + k) for b, k in zip(box, m))
        sub = out[box]
        mask = sub == value
        comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        counts = np.bincount(comps.ravel(), minlength=n + 1)
        keep = counts * vox >= min_component_mm3
        # distance to each bone the label is limited by (reused by _trim), else to their union
        own = [b for b in bones if b in by_name] if "bone_marrow" not in name else []
        dists = {b: edt.edt(sub != by_name[b], anisotropy=tuple(sp), black_border=False)
                 for b in own if (sub == by_name[b]).any()}
        bone = np.isin(sub, [by_name[b] for b in bones if b in by_name])
        if bone.any():
            dist = np.minimum.reduce(list(dists.values())) if dists else \
                edt.edt(~bone, anisotropy=tuple(sp), black_border=False)
            touching = np.zeros(n + 1, bool)
            touching[np.unique(comps[mask & (dist <= max_mm)])] = True
            keep &= touching
        keep[0] = True
        sub[mask & ~keep[comps]] = 0
        _trim(sub, value, name, by_name, dists, vox, min_component_mm3)
    return out


CARTILAGE_BAND_MM = 8.0
MENISCUS_BAND_MM = {"tibia": 14.0, "femur": 17.0}
BML_MAX_OUTSIDE = 0.35
FEMUR_BELOW_PLATEAU_MM = 10.0


def _component_scores(comps: np.ndarray, n: int,
                      cart: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per label 0..n of ``comps``: its voxel count, and how many voxels of the bone's
    cartilage (``cart``, a mask, if any) lie on it (within 2 voxels); index 0 is zero."""
    from scipy import ndimage

    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    sizes[0] = 0
    if cart is None or not cart.any():
        return sizes, None
    near = ndimage.maximum_filter(comps, size=5)
    score = np.bincount(near[cart], minlength=n + 1)
    score[0] = 0
    return sizes, score


def _choose_component(sizes: np.ndarray, score: np.ndarray | None,
                      allowed: np.ndarray | None = None) -> int:
    """The bone's component (:func:`_component_scores`): the one most of its cartilage
    lies on, not just the largest; else the largest; only ``allowed`` ones (bool per
    label, index 0 background) when given."""
    ok = np.ones(len(sizes), bool) if allowed is None else allowed
    if score is not None and (score * ok).max() > 0:
        return int(np.argmax(score * ok))
    return int(np.argmax(sizes * ok))


def _anterior_to_femur(comps: np.ndarray, n: int, box: tuple[slice, ...], femur: np.ndarray,
                       geom: Geometry) -> np.ndarray:
    """Which of the ``n`` components (labels 1..n of ``comps``, a crop at ``box``) have
    their centroid anterior to the femur's centroid (LPS world y, +y posterior); index 0
    is background.  All True when the femur is empty or no component qualifies, so the
    constraint only ever chooses among candidates.  On the four real label maps the
    patella's centroid lies 35.6-40.5 mm anterior to the femur's; a "patella" drawn in
    the popliteal fossa lies behind it."""
    allowed = np.ones(n + 1, bool)
    fem = np.argwhere(femur)
    if not len(fem):
        return allowed
    fem_y = geom.index_to_world(fem.mean(axis=0))[0, 1]
    from scipy import ndimage

    centre = np.asarray(ndimage.center_of_mass(comps > 0, comps, range(1, n + 1)))
    anterior = geom.index_to_world(centre + [b.start for b in box])[:, 1] < fem_y
    if anterior.any():
        allowed[1:] = anterior
    return allowed


def _femur_above_plateau(out: np.ndarray, by_name: dict[str, int], geom: Geometry) -> None:
    """Remove femur voxels more than FEMUR_BELOW_PLATEAU_MM below the tibial plateau's
    lowest cartilage (1st percentile of patient S-I, LPS z; needs 100 tibial-cartilage
    voxels)."""
    tib = [by_name[n] for n in _BONE_CART["tibia"] if n in by_name]
    cart = np.argwhere(np.isin(out, tib)) if tib else np.zeros((0, 3))
    if len(cart) < 100:
        return
    limit = float(np.percentile(geom.index_to_world(cart)[:, 2], 1)) - FEMUR_BELOW_PLATEAU_MM
    femur = np.argwhere(out == by_name["femur"])
    drop = femur[geom.index_to_world(femur)[:, 2] < limit]
    if len(drop):
        log.info("removed %.0f mm3 of femur more than %g mm below the tibial plateau",
                 len(drop) * geom.voxel_volume_mm3, FEMUR_BELOW_PLATEAU_MM)
        out[tuple(drop.T)] = 0


def _trim(sub: np.ndarray, value: int, name: str, by_name: dict[str, int],
          dists: dict[str, np.ndarray], vox: float, min_component_mm3: float) -> None:
    """Voxel-level anatomical limits of one soft label (in place, on a padded crop;
    ``dists``: distance (mm) of every crop voxel to each of its bones)."""
    import cc3d

    mask = sub == value
    if not mask.any():
        return
    if "meniscus" in name:
        bands = {b: mm for b, mm in MENISCUS_BAND_MM.items() if b in by_name}
    elif "cartilage" in name:
        bands = {b: CARTILAGE_BAND_MM for b in _NEAR[name][0] if b in by_name}
    else:
        bands = {}
    for bone, mm in bands.items():
        if bone in dists:
            far = mask & (dists[bone] > mm)
            sub[far] = 0
            mask &= ~far
    if name == "bone_marrow_lesion":
        inside = [by_name[n] for n in by_name
                  if n in ("femur", "tibia", "patella", "fibula", "bone_marrow_lesion")
                  or "cartilage" in n]
        comps, n, outside = shell_outside_fraction(mask, sub, inside)
        bad = np.flatnonzero(outside > BML_MAX_OUTSIDE)
        if len(bad):
            log.info("removed %d bone-marrow lesion(s) lying outside bone", len(bad))
            sub[np.isin(comps, bad)] = 0
            mask = sub == value
    if bands or name == "bone_marrow_lesion":  # islands the trimming detached
        comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        small = np.bincount(comps.ravel(), minlength=n + 1) * vox < min_component_mm3
        small[0] = False
        sub[small[comps]] = 0


def shell_outside_fraction(mask: np.ndarray, context: np.ndarray,
                           inside_values: list[int]) -> tuple[np.ndarray, int, np.ndarray]:
    """Per 26-connected component of ``mask``: the share of its 6-neighbour shell whose
    ``context`` value is not in ``inside_values`` (0 for a lesion enclosed by bone, about
    0.5 or more for one lying on the bone's outer surface or in soft tissue).

    Returns the component image, their number and the shares (index 0 unused, 0.0).
    """
    import cc3d
    from scipy import ndimage

    comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    if n == 0:
        return comps, 0, np.zeros(1)
    cross = ndimage.generate_binary_structure(3, 1)
    near = ndimage.grey_dilation(comps, footprint=cross)
    shell = (near > 0) & ~mask
    total = np.bincount(near[shell], minlength=n + 1).astype(float)
    out = np.bincount(near[shell & ~np.isin(context, inside_values)], minlength=n + 1)
    frac = np.divide(out, total, out=np.zeros(n + 1), where=total > 0)
    frac[0] = 0.0
    return comps, n, frac


def to_cartiq_scheme(raw: np.ndarray, volume: Volume, labels: dict[int, str], model_name: str,
                     side: str | None, *, side_override: bool = False,
                     side_source: str = "flag") -> tuple[np.ndarray, dict[str, Any]]:
    """Map a cleaned prediction (model output values) into the cartiq scheme (uint8).

    Returns the label map on ``volume``'s grid and ``side``, ``side_source`` and the
    ``structures`` present.
    """
    from cartiq.io.labels import LabelMapping, default_scheme, to_default_scheme

    scheme = default_scheme()
    mapping = LabelMapping(name=model_name, description="model outputs",
                           map={v: n for v, n in labels.items() if n != "meniscus"},
                           unmapped="background")
    header_side = volume.meta.get("side") if volume.meta else None
    try:
        out, info = to_default_scheme(raw, mapping, volume.geometry.affine, side=side,
                                      header_side=header_side, path=volume.path,
                                      side_source=side_source, side_override=side_override)
    except InputError as exc:
        if not exc.problem.startswith("cannot tell the knee side"):
            raise  # a given side that the predicted anatomy contradicts
        raise InputError("cannot tell the knee side to split medial/lateral tibial "
                         "cartilage and menisci (no header laterality, no fibula found); "
                         "pass --side left|right", volume.path) from None
    men_values = [v for v, n in labels.items() if n == "meniscus"]
    if men_values:
        _split_menisci(out, np.isin(raw, men_values), volume.geometry, info.get("side"))
    ml_check = check_medial_lateral(out, volume.geometry, info.get("side"))
    keep = {"side": info.get("side"), "side_source": info.get("side_source"),
            "side_check": info.get("side_check", {})}
    present = sorted(scheme.name_of(int(v)) for v in np.unique(out) if v)
    keep["structures"] = present
    keep["medial_lateral_check"] = {"tibial_split": info.get("tibial_split"), **ml_check}
    return out.astype(np.uint8), keep


def check_medial_lateral(out: np.ndarray, geom: Geometry, side: str | None) -> dict[str, Any]:
    """Check the medial/lateral split of tibial cartilage and menisci against the side.

    Every 26-connected component of a medial (lateral) label whose centroid lies on the
    lateral (medial) side of the tibial midline - the midpoint between the two tibial
    plates' centroids, else the tibia's centroid, along patient x - is relabelled (in
    place).  Returns ``{"checked": bool, "relabelled_voxels": {label: n}}``.
    """
    import cc3d

    from cartiq.io.labels import default_scheme, lateral_sign

    if side not in ("left", "right"):
        return {"checked": False, "relabelled_voxels": {}}
    s = default_scheme()
    sign = lateral_sign(side)
    values = [s[f"{m}_{k}"] for k in ("tibial_cartilage", "meniscus") for m in ("medial", "lateral")]
    box = bbox(np.isin(out, values))
    if box is None:
        return {"checked": False, "relabelled_voxels": {}}
    sub = out[box]  # a view: relabelling writes through
    start = np.array([b.start for b in box])
    aff = geom.affine

    def x_of(idx: np.ndarray) -> np.ndarray:
        return (idx + start) @ aff[0, :3] + aff[0, 3]

    cents = [np.argwhere(sub == s[n]).mean(0) for n in
             ("medial_tibial_cartilage", "lateral_tibial_cartilage") if (sub == s[n]).any()]
    if len(cents) == 2:
        mid = float(x_of(np.array(cents)).mean())
    elif (out == s["tibia"]).any():
        mid = float((np.argwhere(out == s["tibia"]).mean(0) @ aff[0, :3]) + aff[0, 3])
    else:
        return {"checked": False, "relabelled_voxels": {}}
    moved: dict[str, int] = {}
    for kind in ("tibial_cartilage", "meniscus"):
        med, lat = s[f"medial_{kind}"], s[f"lateral_{kind}"]
        masks = {med: sub == med, lat: sub == lat}
        for value, mask in masks.items():
            if not mask.any():
                continue
            comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
            stats = cc3d.statistics(comps)
            lateral = (x_of(np.asarray(stats["centroids"][1:n + 1])) - mid) * sign > 0
            wrong = np.flatnonzero(lateral != (value == lat)) + 1
            if len(wrong):
                sel = np.isin(comps, wrong)
                sub[sel] = lat if value == med else med
                moved[s.name_of(value)] = int(sel.sum())
    if moved:
        log.warning("medial/lateral split checked against the %s side: relabelled %s", side,
                    ", ".join(f"{n} voxels of {k}" for k, n in moved.items()))
    return {"checked": True, "relabelled_voxels": moved}


_BONE_CART = {"femur": ("femoral_cartilage",),
              "tibia": ("tibial_cartilage", "medial_tibial_cartilage",
                        "lateral_tibial_cartilage"),
              "patella": ("patellar_cartilage",)}
_NEAR = {  # soft label -> (bones it must lie on, max distance mm)
    "femoral_cartilage": (("femur",), 2.0),
    "tibial_cartilage": (("tibia",), 2.0),
    "medial_tibial_cartilage": (("tibia",), 2.0),
    "lateral_tibial_cartilage": (("tibia",), 2.0),
    "patellar_cartilage": (("patella",), 2.0),
    "meniscus": (("tibia", "femur"), 4.0),
    "medial_meniscus": (("tibia", "femur"), 4.0),
    "lateral_meniscus": (("tibia", "femur"), 4.0),
    "bone_marrow_lesion": (("femur", "tibia", "patella"), 1.0),
}


def _check_fibula(out: np.ndarray, fib: int, tib: int, geom: Geometry) -> None:
    """Remove a predicted fibula that is implausible (it would decide the knee side)."""
    f, t = out == fib, out == tib
    if not f.any():
        return
    ok = t.any() and f.sum() * geom.voxel_volume_mm3 >= 1000
    if ok:
        zf = geom.index_to_world(np.argwhere(f).mean(0))[0, 2]
        tz = geom.index_to_world(np.argwhere(t))[:, 2]
        ok = zf < np.percentile(tz, 90) - 5  # below the tibial plateau
        if ok:
            import edt

            box = bbox(f | t)
            d = edt.edt(~t[box], anisotropy=tuple(geom.spacing), black_border=False)
            ok = float(d[f[box]].min()) <= 10.0
    if not ok:
        log.info("predicted fibula is implausible; not used for the knee side")
        out[f] = 0


def bone_cartilage_values(labels: dict[int, str]) -> dict[int, list[int]]:
    """Each bone's label value -> the values of the cartilage on it (``labels``: value ->
    name, a model's outputs or the cartiq scheme)."""
    by_name = {n: v for v, n in labels.items()}
    return {by_name[b]: [by_name[c] for c in carts if c in by_name]
            for b, carts in _BONE_CART.items() if b in by_name}


def bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a mask as slices (None if empty)."""
    out = []
    for ax in range(mask.ndim):
        proj = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if proj.size == 0:
            return None
        out.append(slice(int(proj[0]), int(proj[-1]) + 1))
    return tuple(out)


def _split_menisci(out: np.ndarray, men: np.ndarray, geom: Geometry, side: str | None) -> None:
    """Label meniscus voxels medial/lateral by the nearer tibial plate (LPS x)."""
    from cartiq.io.labels import default_scheme, lateral_sign

    if not men.any():
        return
    s = default_scheme()
    aff = geom.affine

    def cx(mask: np.ndarray) -> float:
        idx = np.argwhere(mask)
        return float(idx.mean(0) @ aff[0, :3] + aff[0, 3]) if len(idx) else float("nan")

    xm = cx(out == s["medial_tibial_cartilage"])
    xl = cx(out == s["lateral_tibial_cartilage"])
    idx = np.argwhere(men)
    x = idx @ aff[0, :3] + aff[0, 3]
    if np.isfinite(xm) and np.isfinite(xl):
        lateral = np.abs(x - xl) < np.abs(x - xm)
    elif side is not None:
        center = cx(out == s["tibia"])
        if not np.isfinite(center):
            center = float(np.median(x))
        lateral = (x - center) * lateral_sign(side) > 0
    else:
        return  # cannot tell: menisci stay background rather than guessed
    vals = np.where(lateral, s["lateral_meniscus"], s["medial_meniscus"]).astype(out.dtype)
    out[tuple(idx.T)] = vals
