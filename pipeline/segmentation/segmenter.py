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
sagittal plane between the two tibial plates (:func:`cartiq.io.labels.to_default_scheme`);
the side comes from ``side=``, the DICOM header, or the predicted fibula.

Modules
-------
The canonical grid and resampling live in :mod:`cartiq.segmentation.grid`, the clean-up and
the mapping into the cartiq scheme in :mod:`cartiq.segmentation.post` (with the image: bone
drawn over tissue unlike its marrow at a bone's ends, :mod:`cartiq.segmentation.marrow`); this module holds the
input checks, the device choice, the :class:`Segmenter` and the file-level entry points
(:func:`segment_file`; ``cartiq run`` is :func:`cartiq.measurement.run.run_file`).  Every name is importable from here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError, ModelError
from cartiq.io.volume import Geometry, Volume
from cartiq.segmentation.grid import (
    axis_spacing_along,
    canonical_geometry,
    normalize_array,
    resample_array,
)
from cartiq.segmentation.marrow import BoneGreyLimits, drop_unlike_marrow
from cartiq.segmentation.post import (
    bone_cartilage_values,
    clean_prediction,
    to_cartiq_scheme,
)

__all__ = ["canonical_geometry", "resample_array", "select_device", "Segmenter",
           "SegmentResult", "segment_file", "check_knee_like", "check_knee_found"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- checks


MAX_SLICE_SPACING_MM = 6.0  # coarser slices cannot hold a 2-3 mm cartilage plate
MAX_IN_PLANE_SPACING_MM = 2.0  # every model card here declares at most 1.0 mm in plane
MIN_BONE_MM3 = {"femur": 10000.0, "tibia": 5000.0}  # a knee in the field of view


def check_knee_like(volume: Volume) -> None:
    """Reject inputs no knee model can segment: 2D-like stacks, absurd fields of view and
    voxel sizes far outside every model's input range (slices > 6 mm, in plane > 2 mm)."""
    g = volume.geometry
    if min(g.shape) < 8:
        raise InputError(f"has only {min(g.shape)} voxels along one axis "
                         f"({'x'.join(map(str, g.shape))}); a 3D knee scan is needed",
                         volume.path)
    fov = np.asarray(g.shape) * np.asarray(g.spacing)
    if fov.max() > 400 or fov.max() < 40:
        raise InputError(f"field of view {np.round(fov).astype(int).tolist()} mm is not that "
                         "of a knee scan (expected roughly 80-250 mm)", volume.path)
    sp = np.sort(np.asarray(g.spacing, float))
    if sp[2] > MAX_SLICE_SPACING_MM:
        raise InputError(f"slice spacing {sp[2]:.1f} mm is far outside the segmentation "
                         f"models' input range (at most {MAX_SLICE_SPACING_MM:g} mm; cartilage "
                         "is 1-4 mm thick)", volume.path)
    if sp[1] > MAX_IN_PLANE_SPACING_MM:
        raise InputError(f"in-plane spacing {np.round(sp[:2], 2).tolist()} mm is far outside "
                         f"the segmentation models' input range (at most "
                         f"{MAX_IN_PLANE_SPACING_MM:g} mm)", volume.path)
    if np.ptp(volume.array) == 0:
        raise InputError("image is constant (no contrast to segment)", volume.path)


def check_knee_found(labels: np.ndarray, geometry: Geometry, path: Any = None) -> None:
    """Reject a segmentation that found no knee (femur and tibia below ``MIN_BONE_MM3``):
    the field of view holds no knee, or nothing the model recognises as one."""
    from cartiq.io.labels import default_scheme

    s = default_scheme()
    counts = np.bincount(np.asarray(labels).ravel(), minlength=max(s.values) + 1)
    found = {b: float(counts[s[b]]) * geometry.voxel_volume_mm3 for b in MIN_BONE_MM3}
    if any(found[b] < MIN_BONE_MM3[b] for b in MIN_BONE_MM3):
        raise InputError("no knee found in the field of view (the model found "
                         + ", ".join(f"{b} {v / 1000:.1f} ml" for b, v in found.items())
                         + "; a knee scan shows at least "
                         + ", ".join(f"{b} {v / 1000:g} ml" for b, v in MIN_BONE_MM3.items())
                         + ")", path)


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
                 min_component_mm3: float = 20.0, drop_unlike_marrow: bool = True) -> None:
        from cartiq.segmentation.models import load_model

        self.device = select_device(device)
        t0 = time.monotonic()
        self.model = load_model(model, device=self.device)
        self.load_seconds = time.monotonic() - t0
        meta = self.model.metadata
        if meta.format != "nnunetv2":
            if meta.network is None:
                raise ModelError("model metadata needs a 'network' entry (spatial_dims, "
                                 "in_channels, out_channels)", self.model.folder)
        cuda = self.device.startswith("cuda")
        if amp and not cuda:
            log.warning("mixed precision (--amp) needs CUDA; running in float32 on the CPU")
        self.amp = bool(cuda if amp is None else amp) and cuda
        self.batch_size = batch_size
        self.min_component_mm3 = min_component_mm3
        self.drop_unlike_marrow = drop_unlike_marrow

    # -- public API
    def segment(self, volume: Volume, *, side: str | None = None,
                side_override: bool = False, side_source: str = "flag") -> np.ndarray:
        """Cartiq label map (uint8) on ``volume``'s grid."""
        return self.run(volume, side=side, side_override=side_override,
                        side_source=side_source).labels

    def run(self, volume: Volume, *, side: str | None = None,
            side_override: bool = False, side_source: str = "flag") -> SegmentResult:
        """Segment and return labels plus provenance, warnings and timings.

        A given ``side`` (from ``side_source``: flag, manifest; or the header's) that the
        predicted anatomy contradicts is an :class:`InputError` unless ``side_override``
        (see :mod:`cartiq.io.side`; the message names the flag or the manifest column)."""
        check_knee_like(volume)
        meta = self.model.metadata
        # nnU-Net models resample to their own plans; the card's ranges are cartiq's
        warnings = [] if meta.format == "nnunetv2" else _range_warnings(volume, meta.input)
        for w in warnings:
            log.warning("%s: %s", volume.path or "image", w)
        t0 = time.monotonic()
        if meta.format == "nnunetv2":
            raw = self._predict_nnunet(volume)
        else:
            raw = self._predict(volume)
        t1 = time.monotonic()
        labels, side_info = self._to_scheme(raw, volume, side, side_override, side_source)
        info = {"model": self.model.provenance(), "device": self.device, "amp": self.amp,
                "warnings": warnings, **side_info,
                "timings_s": {"load_model": round(self.load_seconds, 3),
                              "inference": round(t1 - t0, 3),
                              "postprocess": round(time.monotonic() - t1, 3)}}
        return SegmentResult(labels=labels, info=info)

    # -- inference
    def _canonical(self, volume: Volume, shift: tuple[float, float] = (0.0, 0.0),
                   scale: float = 1.0) -> tuple[np.ndarray, Geometry]:
        """The normalised scan on the canonical grid, moved by ``shift`` voxels along the two
        in-plane axes and with its in-plane spacing times ``scale`` (2D nets)."""
        spec = self.model.metadata.input
        sp = [v * scale if a != spec.slice_axis else v for a, v in enumerate(spec.spacing_mm)]
        if self.model.metadata.network.spatial_dims == 2 and spec.keep_slice_spacing:
            sp[spec.slice_axis] = spec.grid_slice_spacing_mm(
                axis_spacing_along(volume.geometry, spec.slice_axis))
        dst = canonical_geometry(volume.geometry, tuple(sp))
        if shift != (0.0, 0.0):
            origin = np.asarray(dst.origin, float)
            inplane = [a for a in range(3) if a != spec.slice_axis]
            origin[inplane] += np.asarray(shift, float) * np.asarray(sp)[inplane]
            dst = replace(dst, origin=tuple(float(o) for o in origin))
        norm = normalize_array(volume.array, spec.percentiles)  # the same as in training
        return resample_array(norm, volume.geometry, dst, default=0.0), dst

    def _forward(self, x):
        import torch

        try:
            with torch.autocast("cuda", enabled=self.amp):
                return self.model.network(x).float()
        except RuntimeError as exc:
            msg = str(exc).splitlines()[0][:200]
            raise ModelError(f"model forward pass failed ({msg}); does the model take the "
                             "declared input channels and spatial dims?",
                             self.model.folder) from None

    def _predict(self, volume: Volume) -> np.ndarray:
        """Class index per input voxel (model's own output values); with the input spec's
        ``grid_shifts`` or ``grid_scales``, the mean of the passes' probabilities."""
        return self._probs_back(self._passes(volume), volume.geometry, self.class_weights)

    def _passes(self, volume: Volume) -> list[tuple[np.ndarray, Geometry]]:
        """One ``(probabilities, canonical grid)`` pass on the canonical grid, plus one per
        in-plane ``grid_shifts`` entry and one per ``grid_scales`` entry (2D nets)."""
        spec = self.model.metadata.input
        grids: list[tuple[tuple[float, float], float]] = [((0.0, 0.0), 1.0)]
        if self.model.metadata.network.spatial_dims == 2:
            grids += [(tuple(map(float, s)), 1.0) for s in spec.grid_shifts]
            grids += [((0.0, 0.0), float(s)) for s in spec.grid_scales]
        return [self._canonical_probs(volume, shift, scale) for shift, scale in grids]

    def probabilities(self, volume: Volume) -> np.ndarray:
        """Class probabilities (C, *scan shape), float16, on ``volume``'s own grid, as the
        arg-max of a prediction sees them before the class weights: every pass resampled
        linearly and averaged.  For fitting and checking ``class_weights``; the prediction
        itself streams one class at a time instead of holding them all."""
        if self.model.metadata.format == "nnunetv2":
            raise ModelError("probabilities come from cartiq's own inference, not from "
                             "nnU-Net packages", self.model.folder)
        passes = self._passes(volume)
        out = np.empty((passes[0][0].shape[0],) + tuple(volume.geometry.shape), np.float16)
        for c in range(out.shape[0]):
            out[c] = self._class_back(passes, c, volume.geometry)
        return out

    def _canonical_probs(self, volume: Volume, shift: tuple[float, float] = (0.0, 0.0),
                         scale: float = 1.0) -> tuple[np.ndarray, Geometry]:
        """Class probabilities (C, ...) on the network's canonical grid (moved by ``shift``
        in-plane voxels, in-plane spacing times ``scale``), and that grid."""
        import torch

        net = self.model.metadata.network
        canon, cgeom = self._canonical(volume, shift, scale)
        n_out = net.out_channels
        probs = np.zeros((n_out,) + canon.shape, np.float16)
        with torch.inference_mode():
            if net.spatial_dims == 2:
                spec = self.model.metadata.input
                stack = np.moveaxis(canon, spec.slice_axis, 0)
                pview = np.moveaxis(probs, spec.slice_axis + 1, 1)
                n, h, w = stack.shape
                ph, pw = (-h) % 16, (-w) % 16
                offsets = np.arange(-spec.context_slices, spec.context_slices + 1)
                for s in range(0, n, self.batch_size):
                    # each slice with its neighbours (the edge slice repeated beyond the grid)
                    idx = np.clip(np.arange(s, min(s + self.batch_size, n))[:, None] + offsets,
                                  0, n - 1)
                    x = torch.from_numpy(np.ascontiguousarray(stack[idx]))
                    x = torch.nn.functional.pad(x, (0, pw, 0, ph)).to(self.device)
                    y = torch.softmax(self._forward(x), 1)[:, :, :h, :w]
                    if y.shape[1] != n_out:
                        raise ModelError(f"model returned {y.shape[1]} channels, metadata "
                                         f"says {n_out}", self.model.folder)
                    # to float16 in torch (vectorised; the same rounding as numpy's cast)
                    y = y.permute(1, 0, 2, 3).to(torch.float16)
                    pview[:, s:s + self.batch_size] = y.cpu().numpy()
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
        return probs, cgeom

    @property
    def class_weights(self) -> np.ndarray:
        """Factor per output channel on its probability before the arg-max (the package's
        ``class_weights``; 1 elsewhere)."""
        meta = self.model.metadata
        w = np.ones(meta.network.out_channels, np.float32)
        for value, name in meta.labels.items():
            w[value] = meta.class_weights.get(name, 1.0)
        return w

    @staticmethod
    def _class_back(passes: list[tuple[np.ndarray, Geometry]], c: int,
                    dst: Geometry) -> np.ndarray:
        """Class ``c``'s probability on ``dst``: each pass resampled linearly (outside its
        grid: background), then averaged over the passes (float32)."""
        p = sum(resample_array(probs[c].astype(np.float32), src, dst,
                               default=1.0 if c == 0 else 0.0) for probs, src in passes)
        if len(passes) > 1:
            p /= len(passes)
        return p

    @staticmethod
    def _probs_back(passes: list[tuple[np.ndarray, Geometry]], dst: Geometry,
                    weights: np.ndarray | None = None) -> np.ndarray:
        """Resample each class probability of each ``(probs, grid)`` pass onto the input
        grid (linear), average the passes, scale by the class weight and arg-max (scaling
        after the linear resampling is the same as before it)."""
        best = np.full(dst.shape, -1.0, np.float32)
        arg = np.zeros(dst.shape, np.uint8)
        for c in range(passes[0][0].shape[0]):
            p = Segmenter._class_back(passes, c, dst)
            if weights is not None and weights[c] != 1.0:
                p *= weights[c]
            better = p > best
            arg[better] = c
            best[better] = p[better]
        return arg

    def _predict_nnunet(self, volume: Volume) -> np.ndarray:
        """nnU-Net's own predictor (cascade included): :mod:`cartiq.segmentation.nnunet`."""
        return self.model.network.predict(volume)

    # -- labels
    def _clean(self, raw: np.ndarray, geom: Geometry) -> np.ndarray:
        """Anatomical clean-up of the raw prediction (:func:`clean_prediction`)."""
        return clean_prediction(raw, geom, self.model.metadata.labels, self.min_component_mm3)

    def _to_scheme(self, raw: np.ndarray, volume: Volume, side: str | None,
                   side_override: bool = False,
                   side_source: str = "flag") -> tuple[np.ndarray, dict[str, Any]]:
        raw = self._clean(raw, volume.geometry)
        dropped = self._drop_unlike_marrow(raw, volume) if self.drop_unlike_marrow else []
        labels, info = to_cartiq_scheme(raw, volume, self.model.metadata.labels,
                                        self.model.metadata.name, side,
                                        side_override=side_override, side_source=side_source)
        info["cleanup"] = {"bone_unlike_marrow": dropped}
        return labels, info

    def _drop_unlike_marrow(self, raw: np.ndarray, volume: Volume) -> list[dict[str, Any]]:
        """Bone and its cartilage removed (in place) on the slices that end a bone and show
        tissue far brighter than its marrow (:func:`cartiq.segmentation.marrow.drop_unlike_marrow`)."""
        names = self.model.metadata.labels
        return drop_unlike_marrow(raw, np.asarray(volume.array, np.float32), volume.geometry,
                                  bone_cartilage_values(names), BoneGreyLimits(), names=names)


# ----------------------------------------------------------------------------- files


def _describe(vol: Volume) -> dict[str, Any]:
    from cartiq.io.volume import sha256_file

    meta = {k: v for k, v in vol.meta.items() if k != "files"}
    return {"path": str(Path(vol.path).resolve()), "sha256": sha256_file(vol.path),
            "geometry": vol.geometry.to_json(), **meta}


def segment_file(image: Path, out_dir: Path, *, model: str | Path | None = None,
                 device: str = "auto", amp: bool | None = None, side: str | None = None,
                 series: str | None = None, echo: int | None = None,
                 segmenter: Segmenter | None = None,
                 write_manifest_file: bool = True, side_override: bool = False,
                 side_source: str = "flag") -> tuple[Path, dict[str, Any]]:
    """Segment one scan into ``out_dir/segmentation.nii.gz`` (+ ``manifest.json`` last).
    ``side_source``: where a given ``side`` came from (flag, manifest).

    Everything is checked (input readable and knee-like, model loadable, device present)
    before anything is written.  Returns the segmentation path and the manifest dict.
    """
    from cartiq.io.volume import read_volume, write_volume
    from cartiq.io.outputs import begin_folder, check_writable, write_manifest

    t0 = time.monotonic()
    out_dir = Path(out_dir)
    check_writable(out_dir, inputs=(image,))
    vol = read_volume(image, series=series, echo=echo, kind="image")
    check_knee_like(vol)
    t_read = time.monotonic() - t0
    seg = segmenter or Segmenter(model, device=device, amp=amp)
    result = seg.run(vol, side=side, side_override=side_override, side_source=side_source)
    t1 = time.monotonic()
    check_knee_found(result.labels, vol.geometry, image)
    begin_folder(out_dir, inputs=(image,))
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
        "side_check": info.get("side_check", {}),
        "structures": info.get("structures", []),
        "medial_lateral_check": info.get("medial_lateral_check", {}),
        "cleanup": info.get("cleanup", {}),
        "timings_s": {"read": round(t_read, 3), **info["timings_s"],
                      "write": round(time.monotonic() - t1, 3)},
        "warnings": info["warnings"],
        "outputs": ["segmentation.nii.gz"],
        "geometry": vol.geometry.to_json(),
    }
    if write_manifest_file:
        write_manifest(out_dir, manifest)
    return path, manifest
