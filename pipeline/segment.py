"""Segmentation inference: scan in, cartiq label map on the scan's own grid out.

Geometry
--------
The network works on a *canonical grid*: axes aligned with the LPS world axes (axis 0 =
patient right->left, axis 1 = anterior->posterior, axis 2 = inferior->superior), so a 2D
network's slices across axis 0 are sagittal whatever the scan's on-disk orientation.  The
scan is resampled (SimpleITK, linear) onto that grid at the model's spacing (2D models keep
the scan's own spacing across slices, clipped to the card's range), the network predicts
class probabilities slice batch by slice batch (2D) or by MONAI sliding-window inference
(3D), the probabilities are resampled back (linear) onto the exact input grid and
arg-maxed there, so that the output overlays the input in any viewer.

Labels
------
Model outputs are mapped into the cartiq scheme through the package's ``labels``.  Tibial
cartilage and menisci predicted without a medial/lateral distinction are split by the
sagittal plane between the two tibial plates (:func:`pipeline.labels.to_default_scheme`);
the side comes from ``side=``, the DICOM header, or the predicted fibula.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError, ModelError
from pipeline.io import Geometry, Volume

__all__ = ["canonical_geometry", "resample_array", "select_device", "Segmenter",
           "SegmentResult", "segment_file", "check_knee_like"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- geometry


def _axis_spacing_along(geom: Geometry, world_axis: int) -> float:
    """Spacing of the index axis that points most nearly along ``world_axis``."""
    m = np.abs(geom.matrix)
    return float(geom.spacing[int(np.argmax(m[world_axis]))])


def canonical_geometry(geom: Geometry, spacing_mm: tuple[float, float, float]) -> Geometry:
    """LPS-aligned grid covering ``geom``'s field of view at ``spacing_mm``."""
    sp = np.asarray(spacing_mm, float)
    n = np.asarray(geom.shape, float)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5)
                        for k in (-0.5, n[2] - 0.5)])
    world = geom.index_to_world(corners)
    lo, hi = world.min(0), world.max(0)
    size = np.maximum(1, np.ceil((hi - lo) / sp - 1e-6)).astype(int)
    center = (lo + hi) / 2
    origin = center - (size - 1) / 2 * sp
    return Geometry(shape=tuple(int(s) for s in size), spacing=tuple(float(s) for s in sp),
                    origin=tuple(float(o) for o in origin),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _to_sitk(array: np.ndarray, geom: Geometry):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    geom.apply_to_sitk(img)
    return img


def resample_array(array: np.ndarray, src: Geometry, dst: Geometry, *, nearest: bool = False,
                   default: float = 0.0) -> np.ndarray:
    """Resample an ITK-ordered array from grid ``src`` onto grid ``dst`` (SimpleITK)."""
    import SimpleITK as sitk

    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in dst.shape])
    f.SetOutputSpacing(dst.spacing)
    f.SetOutputOrigin(dst.origin)
    f.SetOutputDirection(dst.direction)
    f.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    f.SetDefaultPixelValue(default)
    out = f.Execute(_to_sitk(array, src))
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)  # a view: no copy


def normalize_array(array: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the intensity percentiles to 0 and 1 and clip to [0, 1] (float32)."""
    a = np.asarray(array, np.float32)
    flat = a.ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 2_000_000]
    lo, hi = np.percentile(flat, percentiles)
    return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- checks


def check_knee_like(volume: Volume) -> None:
    """Reject inputs no knee model can segment: 2D-like stacks and absurd fields of view."""
    g = volume.geometry
    if min(g.shape) < 8:
        raise InputError(f"has only {min(g.shape)} voxels along one axis "
                         f"({'x'.join(map(str, g.shape))}); a 3D knee scan is needed",
                         volume.path)
    fov = np.asarray(g.shape) * np.asarray(g.spacing)
    if fov.max() > 400 or fov.max() < 40:
        raise InputError(f"field of view {np.round(fov).astype(int).tolist()} mm is not that "
                         "of a knee scan (expected roughly 80-250 mm)", volume.path)
    if np.ptp(volume.array) == 0:
        raise InputError("image is constant (no contrast to segment)", volume.path)


def _range_warnings(volume: Volume, spec: Any) -> list[str]:
    g = volume.geometry
    sp = np.sort(np.asarray(g.spacing))
    lo, hi = spec.expected_spacing_range_mm
    out = []
    if sp[0] < lo or sp[1] > hi:
        out.append(f"in-plane spacing {np.round(sp[:2], 3).tolist()} mm is outside the model "
                   f"card's range {lo}-{hi} mm; resampled, accuracy unknown")
    if sp[2] > spec.expected_slice_spacing_max_mm:
        out.append(f"slice spacing {sp[2]:.2f} mm exceeds the model card's maximum "
                   f"{spec.expected_slice_spacing_max_mm} mm; accuracy unknown")
    if spec.slice_axis == 0:
        # the scan's slices should be roughly sagittal for a 2D sagittal model
        k = g.slice_axis()
        if g.spacing[k] > 1.2 * min(g.spacing) and abs(g.matrix[0, k]) < 0.7:
            out.append("scan slices are not sagittal; the 2D sagittal model sees reformatted "
                       "slices (through-plane blur), accuracy unknown")
    return out


# ----------------------------------------------------------------------------- device


def select_device(requested: str = "auto") -> str:
    """``auto`` -> CUDA when present (logged) else CPU (warning); ``cuda`` without GPU fails."""
    import torch

    req = (requested or "auto").lower()
    if req == "auto":
        if torch.cuda.is_available():
            log.info("using CUDA device 0 (%s)", torch.cuda.get_device_name(0))
            return "cuda:0"
        log.warning("no CUDA GPU found; running on the CPU (slower)")
        return "cpu"
    if req == "cpu":
        return "cpu"
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} requested but no CUDA GPU is available "
                             "(use --device cpu or auto)")
        idx = int(req.split(":")[1]) if ":" in req and req.split(":")[1].isdigit() else 0
        if idx >= torch.cuda.device_count():
            raise ModelError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) present")
        log.info("using CUDA device %d (%s)", idx, torch.cuda.get_device_name(idx))
        return f"cuda:{idx}"
    raise ModelError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")


# ----------------------------------------------------------------------------- segmenter


@dataclass
class SegmentResult:
    labels: np.ndarray  # cartiq scheme, input grid, uint8
    info: dict[str, Any] = field(default_factory=dict)


class Segmenter:
    """A loaded model ready to segment many scans (load once per worker).

    Parameters
    ----------
    model : registry name, package folder or metadata file (default model if None).
    device : ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    amp : mixed precision (CUDA only; default on for CUDA).
    batch_size : 2D slices per forward pass (bounds memory).
    """

    def __init__(self, model: str | Path | None = None, *, device: str = "auto",
                 amp: bool | None = None, batch_size: int = 8,
                 min_component_mm3: float = 20.0) -> None:
        from pipeline.models import load_model

        self.device = select_device(device)
        t0 = time.monotonic()
        self.model = load_model(model, device=self.device)
        self.load_seconds = time.monotonic() - t0
        meta = self.model.metadata
        if meta.format != "nnunetv2":
            if meta.network is None:
                raise ModelError("model metadata needs a 'network' entry (spatial_dims, "
                                 "in_channels, out_channels)", self.model.folder)
            if meta.network.in_channels != 1:
                raise ModelError(f"model expects {meta.network.in_channels} input channels; "
                                 "cartiq feeds it one image channel (one scan/echo)",
                                 self.model.folder)
        cuda = self.device.startswith("cuda")
        if amp and not cuda:
            log.warning("mixed precision (--amp) needs CUDA; running in float32 on the CPU")
        self.amp = bool(cuda if amp is None else amp) and cuda
        self.batch_size = batch_size
        self.min_component_mm3 = min_component_mm3

    # -- public API
    def segment(self, volume: Volume, *, side: str | None = None) -> np.ndarray:
        """Cartiq label map (uint8) on ``volume``'s grid."""
        return self.run(volume, side=side).labels

    def run(self, volume: Volume, *, side: str | None = None) -> SegmentResult:
        """Segment and return labels plus provenance, warnings and timings."""
        check_knee_like(volume)
        meta = self.model.metadata
        warnings = _range_warnings(volume, meta.input)
        for w in warnings:
            log.warning("%s: %s", volume.path or "image", w)
        t0 = time.monotonic()
        if meta.format == "nnunetv2":
            raw = self._predict_nnunet(volume)
        else:
            raw = self._predict(volume)
        t1 = time.monotonic()
        labels, side_info = self._to_scheme(raw, volume, side)
        info = {"model": self.model.provenance(), "device": self.device, "amp": self.amp,
                "warnings": warnings, **side_info,
                "timings_s": {"load_model": round(self.load_seconds, 3),
                              "inference": round(t1 - t0, 3),
                              "postprocess": round(time.monotonic() - t1, 3)}}
        return SegmentResult(labels=labels, info=info)

    # -- inference
    def _canonical(self, volume: Volume) -> tuple[np.ndarray, Geometry]:
        spec = self.model.metadata.input
        sp = list(spec.spacing_mm)
        if self.model.metadata.network.spatial_dims == 2 and spec.keep_slice_spacing:
            a = spec.slice_axis
            lo, hi = spec.slice_spacing_range_mm
            sp[a] = float(np.clip(_axis_spacing_along(volume.geometry, a), lo, hi))
        dst = canonical_geometry(volume.geometry, tuple(sp))
        arr = volume.array.astype(np.float32, copy=False)
        flat = arr.ravel()[:: max(1, arr.size // 2_000_000)]
        lo, hi = np.percentile(flat, spec.percentiles)
        norm = np.clip((arr - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)
        return resample_array(norm, volume.geometry, dst, default=0.0), dst

    def _forward(self, x):
        import torch

        try:
            with torch.autocast("cuda", enabled=self.amp):
                return self.model.network(x).float()
        except RuntimeError as exc:
            msg = str(exc).splitlines()[0][:200]
            raise ModelError(f"model forward pass failed ({msg}); does the model take one "
                             "input channel of the declared spatial dims?",
                             self.model.folder) from None

    def _predict(self, volume: Volume) -> np.ndarray:
        """Class index per input voxel (model's own output values)."""
        import torch

        net = self.model.metadata.network
        canon, cgeom = self._canonical(volume)
        n_out = net.out_channels
        probs = np.zeros((n_out,) + canon.shape, np.float16)
        with torch.inference_mode():
            if net.spatial_dims == 2:
                a = self.model.metadata.input.slice_axis
                stack = np.moveaxis(canon, a, 0)
                pview = np.moveaxis(probs, a + 1, 1)
                h, w = stack.shape[1:]
                ph, pw = (-h) % 16, (-w) % 16
                for s in range(0, stack.shape[0], self.batch_size):
                    x = torch.from_numpy(np.ascontiguousarray(stack[s:s + self.batch_size]))
                    x = torch.nn.functional.pad(x[:, None], (0, pw, 0, ph)).to(self.device)
                    y = torch.softmax(self._forward(x), 1)[:, :, :h, :w]
                    if y.shape[1] != n_out:
                        raise ModelError(f"model returned {y.shape[1]} channels, metadata "
                                         f"says {n_out}", self.model.folder)
                    pview[:, s:s + self.batch_size] = y.permute(1, 0, 2, 3).cpu().numpy()
            else:
                from monai.inferers import sliding_window_inference

                x = torch.from_numpy(canon)[None, None].to(self.device)
                roi = tuple(int(v) for v in self.model.metadata.input.patch_size)
                y = sliding_window_inference(x, roi, sw_batch_size=2,
                                             predictor=self._forward, overlap=0.25,
                                             mode="gaussian", sw_device=self.device,
                                             device="cpu")
                probs[:] = torch.softmax(y[0].float(), 0).numpy()
        del canon
        return self._probs_back(probs, cgeom, volume.geometry)

    @staticmethod
    def _probs_back(probs: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
        """Resample each class probability onto the input grid (linear) and arg-max."""
        best = np.full(dst.shape, -1.0, np.float32)
        arg = np.zeros(dst.shape, np.uint8)
        for c in range(probs.shape[0]):
            p = resample_array(probs[c].astype(np.float32), src, dst,
                               default=1.0 if c == 0 else 0.0)
            better = p > best
            arg[better] = c
            best[better] = p[better]
        return arg

    def _predict_nnunet(self, volume: Volume) -> np.ndarray:
        arr = volume.array.transpose(2, 1, 0)[None].astype(np.float32)
        props = {"spacing": tuple(float(s) for s in volume.geometry.spacing[::-1])}
        seg = self.model.network.predict_single_npy_array(arr, props, None, None, False)
        return np.asarray(seg).transpose(2, 1, 0).astype(np.uint8)

    # -- labels
    def _clean(self, raw: np.ndarray, geom: Geometry) -> np.ndarray:
        """Anatomical clean-up of the raw prediction (model output values).

        Bones: largest component.  Fibula: dropped unless plausible (>= 1000 mm3, within
        10 mm of the tibia, centroid below the tibial plateau) since it decides the side.
        Cartilage, menisci, BML: components below ``min_component_mm3`` or farther than
        2 mm (cartilage), 4 mm (menisci) or 1 mm (BML) from their bone are removed.
        """
        import cc3d
        import edt
        from scipy import ndimage

        labels = self.model.metadata.labels
        by_name = {n: v for v, n in labels.items()}
        out = raw.copy()
        vox = geom.voxel_volume_mm3
        sp = np.asarray(geom.spacing)
        for name in ("femur", "tibia", "patella", "fibula"):
            if name in by_name:
                box = _bbox(raw == by_name[name])
                if box is None:
                    continue
                sub = raw[box]
                mask = sub == by_name[name]
                comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
                keep = int(np.argmax(np.bincount(comps.ravel(), minlength=n + 1)[1:])) + 1
                carts = [by_name[c] for c in _BONE_CART.get(name, ()) if c in by_name]
                cart = np.isin(sub, carts) if carts and n > 1 else None
                if cart is not None and cart.any():
                    # the bone is the component its cartilage lies on, not just the largest
                    near = ndimage.maximum_filter(comps, size=5)
                    score = np.bincount(near[cart], minlength=n + 1)
                    score[0] = 0
                    if score.max() > 0:
                        keep = int(np.argmax(score))
                out[box][mask & (comps != keep)] = 0
        if "fibula" in by_name and "tibia" in by_name:
            _check_fibula(out, by_name["fibula"], by_name["tibia"], geom)
        for name, (bones, max_mm) in _NEAR.items():
            if name not in by_name:
                continue
            value = by_name[name]
            box = _bbox(out == value)
            if box is None:
                continue
            m = np.ceil(max_mm / sp).astype(int) + 1
            box = tuple(slice(max(0, b.start - k), b.stop + k) for b, k in zip(box, m))
            sub = out[box]
            mask = sub == value
            comps, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
            counts = np.bincount(comps.ravel(), minlength=n + 1)
            keep = counts * vox >= self.min_component_mm3
            bone = np.isin(sub, [by_name[b] for b in bones if b in by_name])
            if bone.any():
                dist = edt.edt(~bone, anisotropy=tuple(sp), black_border=False)
                touching = np.zeros(n + 1, bool)
                touching[np.unique(comps[mask & (dist <= max_mm)])] = True
                keep &= touching
            keep[0] = True
            sub[mask & ~keep[comps]] = 0
        return out

    def _to_scheme(self, raw: np.ndarray, volume: Volume,
                   side: str | None) -> tuple[np.ndarray, dict[str, Any]]:
        from pipeline.labels import LabelMapping, default_scheme, to_default_scheme

        scheme = default_scheme()
        raw = self._clean(raw, volume.geometry)
        labels = self.model.metadata.labels
        mapping = LabelMapping(name=self.model.metadata.name, description="model outputs",
                               map={v: n for v, n in labels.items() if n != "meniscus"},
                               unmapped="background")
        header_side = volume.meta.get("side") if volume.meta else None
        try:
            out, info = to_default_scheme(raw, mapping, volume.geometry.affine, side=side,
                                          header_side=header_side, path=volume.path)
        except InputError:
            raise InputError("cannot tell the knee side to split medial/lateral tibial "
                             "cartilage and menisci (no header laterality, no fibula found); "
                             "pass --side left|right", volume.path) from None
        men_values = [v for v, n in labels.items() if n == "meniscus"]
        if men_values:
            _split_menisci(out, np.isin(raw, men_values), volume.geometry, info.get("side"))
        keep = {"side": info.get("side"), "side_source": info.get("side_source")}
        present = sorted(scheme.name_of(int(v)) for v in np.unique(out) if v)
        keep["structures"] = present
        return out.astype(np.uint8), keep


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

            box = _bbox(f | t)
            d = edt.edt(~t[box], anisotropy=tuple(geom.spacing), black_border=False)
            ok = float(d[f[box]].min()) <= 10.0
    if not ok:
        log.info("predicted fibula is implausible; not used for the knee side")
        out[f] = 0


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
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
    from pipeline.labels import default_scheme, lateral_sign

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


# ----------------------------------------------------------------------------- files


def _describe(vol: Volume) -> dict[str, Any]:
    from pipeline.io import sha256_file

    meta = {k: v for k, v in vol.meta.items() if k != "files"}
    return {"path": str(Path(vol.path).resolve()), "sha256": sha256_file(vol.path),
            "geometry": vol.geometry.to_json(), **meta}


def segment_file(image: Path, out_dir: Path, *, model: str | Path | None = None,
                 device: str = "auto", amp: bool | None = None, side: str | None = None,
                 series: str | None = None, echo: int | None = None,
                 segmenter: Segmenter | None = None,
                 write_manifest_file: bool = True) -> tuple[Path, dict[str, Any]]:
    """Segment one scan into ``out_dir/segmentation.nii.gz`` (+ ``manifest.json`` last).

    Everything is checked (input readable and knee-like, model loadable, device present)
    before anything is written.  Returns the segmentation path and the manifest dict.
    """
    from pipeline.io import read_volume, write_volume
    from pipeline.outputs import begin_folder, check_writable, write_manifest

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    check_writable(out_dir)
    vol = read_volume(image, series=series, echo=echo, kind="image")
    check_knee_like(vol)
    t_read = time.monotonic() - t0
    seg = segmenter or Segmenter(model, device=device, amp=amp)
    result = seg.run(vol, side=side)
    t1 = time.monotonic()
    begin_folder(out_dir)
    path = write_volume(out_dir / "segmentation.nii.gz", result.labels, vol.geometry)
    info = result.info
    manifest = {
        "stage": "segment",
        "inputs": {"image": _describe(vol)},
        "model": info["model"],
        "device": info["device"],
        "amp": info["amp"],
        "side": info.get("side"),
        "side_source": info.get("side_source"),
        "structures": info.get("structures", []),
        "timings_s": {"read": round(t_read, 3), **info["timings_s"],
                      "write": round(time.monotonic() - t1, 3)},
        "warnings": info["warnings"],
        "outputs": ["segmentation.nii.gz"],
        "geometry": vol.geometry.to_json(),
    }
    if write_manifest_file:
        write_manifest(out_dir, manifest)
    return path, manifest


def run_file(image: Path, out_dir: Path, *, model: str | Path | None = None,
             device: str = "auto", amp: bool | None = None, side: str | None = None,
             series: str | None = None, echo: int | None = None, bml: str = "model",
             bml_config: Path | None = None, measure_config: Path | None = None,
             segmenter: Segmenter | None = None):
    """Segment, optionally add intensity BMLs, then measure (``cartiq run``)."""
    from pipeline.measure import run_measure

    if bml not in ("model", "intensity", "both"):
        raise InputError(f"--bml must be model, intensity or both, not {bml!r}")
    seg_path, manifest = segment_file(image, out_dir, model=model, device=device, amp=amp,
                                      side=side, series=series, echo=echo,
                                      segmenter=segmenter, write_manifest_file=False)
    bml_info: dict[str, Any] = {"mode": bml}
    if bml != "model":
        from pipeline.bml import apply_bml, load_bml_config
        from pipeline.config import resolved
        from pipeline.io import read_volume, write_volume

        cfg = load_bml_config(bml_config)
        vol = read_volume(image, series=series, echo=echo)
        lab = read_volume(seg_path, kind="labels")
        new = apply_bml(lab.array.astype(np.uint8), vol.array, vol.geometry.spacing, bml, cfg)
        write_volume(seg_path, new, vol.geometry)
        bml_info["config"] = resolved(cfg)
    extra = {"stage": "run",
             "segmentation": {k: manifest[k] for k in ("model", "device", "amp", "structures",
                                                       "timings_s")},
             "bml": bml_info,
             "warnings": manifest["warnings"]}
    return run_measure(image, seg_path, out_dir, side=side or manifest.get("side"),
                       config_path=measure_config, series=series, echo=echo,
                       extra_manifest=extra)
