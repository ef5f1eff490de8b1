"""Running nnU-Net v2 models (single configuration or a cascade) through nnU-Net's own
predictor API, in memory.

Imported only when an nnU-Net model is used; ``nnunetv2`` (the optional extra
``cartiq[nnunet]``) is imported on the first :func:`load_nnunet`.

What cartiq does around nnU-Net's ``nnUNetPredictor.predict_single_npy_array``:

* **Checkpoints are verified before loading.**  nnU-Net checkpoints are pickles loaded with
  ``weights_only=False``, so every ``fold_<f>/<checkpoint>`` is hashed and compared with the
  sha256 recorded in the package first.
* **Orientation.**  nnU-Net takes the voxel array as stored and ignores the direction
  cosines; its plans only transpose axes by spacing.  cartiq therefore re-stores the scan
  (axis permutation and flips, no resampling) in the model's training orientation
  (``nnunet.orientation``, an ITK code such as ``LPS``) before prediction and undoes it
  afterwards, so that results do not depend on how a scan is stored.
* **Arrays.**  nnU-Net wants SimpleITK array order ``(k, j, i)`` and the spacing in the same
  order; cartiq's arrays are ``(i, j, k)``.
* **Cascade.**  Each stage's segmentation is handed to the next as ``int16`` (nnU-Net writes
  ``-1`` into it while cropping); a cascade stage without its previous stage is refused.
* **No global state.**  nnU-Net's chatter on stdout goes to the debug log; no environment
  variable is set.  Torch's thread count is restored after each prediction.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError, ModelError
from cartiq.io.orient import reorient
from cartiq.io.volume import Geometry, Volume, sha256_file
from cartiq.segmentation.nnunet_results import combined_sha256

__all__ = ["NnunetRunner", "load_nnunet", "require_nnunet", "to_orientation",
           "from_orientation", "verify_stage"]

log = logging.getLogger(__name__)

INSTALL_HINT = "nnU-Net v2 models need the optional extra: pip install 'cartiq[nnunet]'"
_AXIS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0),
         "I": (2, -1.0)}


# ----------------------------------------------------------------------------- orientation


def to_orientation(array: np.ndarray, geometry: Geometry,
                   code: str | None) -> tuple[np.ndarray, Geometry, tuple[list[int], list[bool]]]:
    """Re-store ``array`` so that its index axes point along ``code`` (ITK letters: ``LPS``
    means i toward patient left, j posterior, k superior); world positions are unchanged.

    Oblique scans get the nearest axis permutation and flips (as ``DICOMOrient`` does).
    Returns the array, its geometry and ``(order, flip)`` for :func:`from_orientation`.
    """
    if code is None:
        return array, geometry, ([0, 1, 2], [False, False, False])
    code = code.upper()
    if len(code) != 3 or any(c not in _AXIS for c in code) or \
            len({_AXIS[c][0] for c in code}) != 3:
        raise ModelError(f"invalid orientation code {code!r} (three of L/R, A/P, S/I, e.g. LPS)")
    m = geometry.matrix  # columns: world direction of i, j, k
    order, flip, used = [], [], set()
    # assign the target axes in order of how clearly an input axis matches them
    pairs = sorted(((abs(m[_AXIS[c][0], o]), t, o) for t, c in enumerate(code)
                    for o in range(3)), reverse=True)
    chosen: dict[int, int] = {}
    for _, t, o in pairs:
        if t not in chosen and o not in used:
            chosen[t] = o
            used.add(o)
    for t, c in enumerate(code):
        o = chosen[t]
        order.append(o)
        flip.append(bool(np.sign(m[_AXIS[c][0], o]) != _AXIS[c][1]))
    if order == [0, 1, 2] and not any(flip):
        return array, geometry, (order, flip)
    out, geom = reorient(array, geometry, order, flip)
    return out, geom, (order, flip)


def from_orientation(array: np.ndarray, how: tuple[list[int], list[bool]]) -> np.ndarray:
    """Undo :func:`to_orientation` on an array of the re-stored grid."""
    order, flip = how
    flips = [a for a in range(3) if flip[a]]
    if flips:
        array = np.flip(array, axis=flips)
    return np.ascontiguousarray(np.transpose(array, np.argsort(order)))


# ----------------------------------------------------------------------------- checkpoints


# ``spec``/``stage`` below are :class:`cartiq.segmentation.models.NnunetSpec` /
# ``NnunetStage`` (not imported here: models imports this module when it loads a model)


def stage_folder(stage: Any, package: Path) -> Path:
    p = Path(stage.folder)
    return p if p.is_absolute() else (package / p)


def checkpoint_paths(stage: Any, folder: Path) -> dict[str, Path]:
    return {f"fold_{f}/{stage.checkpoint}": folder / f"fold_{f}" / stage.checkpoint
            for f in stage.folds}


def verify_stage(stage: Any, folder: Path, *, require_sha: bool = True) -> dict[str, str]:
    """sha256 of every checkpoint the stage uses, checked against the recorded ones."""
    if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
        raise ModelError(f"nnU-Net {stage.configuration} folder is missing or incomplete "
                         "(no plans.json/dataset.json)", folder)
    out = {}
    for rel, path in checkpoint_paths(stage, folder).items():
        if not path.is_file():
            raise ModelError(f"{stage.configuration}: {rel} is missing (fold not trained, "
                             "not downloaded, or moved)", folder)
        actual = sha256_file(path)
        expected = stage.sha256.get(rel)
        if expected is None and require_sha:
            log.warning("no sha256 recorded for %s; not verified", path)
        elif expected is not None and actual != expected.lower():
            raise ModelError(f"checkpoint sha256 mismatch (expected {expected[:12]}..., got "
                             f"{actual[:12]}...): file corrupt or replaced", path)
        out[rel] = actual
    return out


# ----------------------------------------------------------------------------- runner


def _import_predictor():
    """nnU-Net's predictor class; its import-time prints go to the debug log."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as exc:
        raise ModelError(f"{INSTALL_HINT} ({exc})") from None
    finally:
        if buf.getvalue().strip():
            log.debug("nnunetv2: %s", buf.getvalue().strip())
    return nnUNetPredictor


class NnunetRunner:
    """The loaded predictors of an nnU-Net model's stages; ``predict(volume)`` gives the
    model's own label values on the volume's grid."""

    def __init__(self, spec: Any, package: Path, device: str) -> None:
        import torch

        self.spec = spec
        self.device = device
        self.hashes: dict[str, dict[str, str]] = {}
        for stage in spec.stages:  # hash everything before unpickling anything
            self.hashes[stage.configuration] = verify_stage(stage, stage_folder(stage, package))
        predictor_cls = _import_predictor()
        self.predictors = []
        for stage in spec.stages:
            folder = stage_folder(stage, package)
            folds = tuple(f if f == "all" else int(f) for f in stage.folds)
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    pred = predictor_cls(tile_step_size=spec.tile_step_size, use_gaussian=True,
                                         use_mirroring=spec.use_mirroring,
                                         perform_everything_on_device=device.startswith("cuda"),
                                         device=torch.device(device), verbose=False,
                                         verbose_preprocessing=False, allow_tqdm=False)
                    pred.initialize_from_trained_model_folder(str(folder), use_folds=folds,
                                                              checkpoint_name=stage.checkpoint)
            except Exception as exc:  # noqa: BLE001 - nnU-Net raises many types here
                msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise ModelError(f"nnU-Net cannot load {stage.configuration} ({msg})",
                                 folder) from None
            log.debug("nnunetv2 %s: %s", stage.configuration, buf.getvalue().strip())
            self.predictors.append(pred)
        first = self.predictors[0].configuration_manager
        if first.previous_stage_name is not None:
            raise ModelError(f"{spec.stages[0].configuration} is a cascade stage; its "
                             f"low-res stage {first.previous_stage_name!r} is missing from "
                             "the model", package)

    @property
    def combined_sha256(self) -> str:
        """One hash over every checkpoint (the model's identity, e.g. for batch re-runs)."""
        return combined_sha256([{"configuration": c, "sha256": h}
                                for c, h in self.hashes.items()])

    def provenance(self) -> dict[str, Any]:
        return {"nnunet": {
            "trainer": self.spec.trainer, "plans": self.spec.plans,
            "dataset": self.spec.dataset, "configuration": self.spec.configuration,
            "orientation": self.spec.orientation, "use_mirroring": self.spec.use_mirroring,
            "tile_step_size": self.spec.tile_step_size,
            "stages": [{"configuration": s.configuration, "folds": list(s.folds),
                        "checkpoint": s.checkpoint,
                        "checkpoint_sha256": self.hashes[s.configuration]}
                       for s in self.spec.stages]}}

    def predict(self, volume: Volume) -> np.ndarray:
        """nnU-Net label values (uint8/uint16) on ``volume``'s grid."""
        import torch

        arr, geom, how = to_orientation(volume.array, volume.geometry, self.spec.orientation)
        x = np.ascontiguousarray(arr.transpose(2, 1, 0)[None], dtype=np.float32)
        spacing = [float(s) for s in geom.spacing[::-1]]
        threads = torch.get_num_threads()
        prev = None
        try:
            for stage, pred in zip(self.spec.stages, self.predictors):
                buf = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buf):
                        seg = pred.predict_single_npy_array(x, {"spacing": list(spacing)},
                                                            prev, None, False)
                except RuntimeError as exc:
                    raise ModelError(f"nnU-Net {stage.configuration} prediction failed "
                                     f"({str(exc).splitlines()[0][:200]})") from None
                log.debug("nnunetv2 %s: %s", stage.configuration, buf.getvalue().strip())
                prev = np.asarray(seg)[None].astype(np.int16)
        finally:
            torch.set_num_threads(threads)
        out = np.asarray(seg).transpose(2, 1, 0)
        if out.shape != arr.shape:
            raise InputError(f"nnU-Net returned shape {out.shape} for input {arr.shape}",
                             volume.path)
        return from_orientation(out, how)


def require_nnunet() -> None:
    """A clear error when the optional extra is not installed (before anything is read)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("nnunetv2") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModelError(INSTALL_HINT)


def load_nnunet(spec: Any, package: Path, device: str) -> NnunetRunner:
    """Verify the checkpoints of an nnU-Net model (its ``NnunetSpec``) and load them."""
    return NnunetRunner(spec, package, device)
