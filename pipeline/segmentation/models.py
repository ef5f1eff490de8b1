"""Segmentation model packages: metadata schema, registry, sha256 check and loaders.

A cartiq model package is a folder ``models/<name>/`` in the manner of a MONAI bundle::

    metadata.json   network definition, expected input (orientation, spacing, intensity
                    normalisation), output labels, version, training data, license,
                    sha256 of the weights
    model.pt        weights (a torch ``state_dict``)
    README.md       model card with the measured accuracy

Besides our own packages, :func:`load_model` accepts

* a MONAI bundle folder (``configs/metadata.json`` + ``models/model.pt``) together with a
  ``cartiq.json`` (our metadata schema, ``format: monai_bundle``) in the bundle folder;
* a TorchScript file ``X.ts``/``X.pt`` with a ``X.json`` (our schema, ``format: torchscript``)
  beside it;
* an nnU-Net v2 trained-model folder (``dataset.json`` + ``plans.json`` + ``fold_*``) with a
  ``cartiq.json`` (``format: nnunetv2``); needs the optional extra ``nnunetv2``.

Every package maps its output labels into the cartiq scheme (``labels``: output value ->
structure name).  Besides the scheme's names, ``tibial_cartilage`` and ``meniscus`` (split
into medial/lateral after inference) and ``fibula`` (used to tell the knee side, then
dropped) are allowed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from cartiq._resources import MODELS, resource_dir
from cartiq.config import Strict
from cartiq.errors import ModelError
from cartiq.io.volume import sha256_file

__all__ = ["MODELS_DIR", "DEFAULT_MODEL", "NetworkSpec", "InputSpec", "ModelMetadata",
           "LoadedModel", "list_models", "resolve_model", "read_metadata", "load_model",
           "build_network", "EXTRA_TARGETS"]

log = logging.getLogger(__name__)

MODELS_DIR = resource_dir(MODELS)
DEFAULT_MODEL = "cartiq_unet2d_synth"
EXTRA_TARGETS = ("tibial_cartilage", "meniscus", "fibula")


class NetworkSpec(Strict):
    """A MONAI network: class name in ``monai.networks.nets`` and its keyword arguments."""

    name: str = Field(..., description="UNet, BasicUNet or DynUNet (any name for TorchScript)")
    spatial_dims: Literal[2, 3]
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(..., ge=2)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class InputSpec(Strict):
    """What the network expects: canonical LPS-aligned grid, spacing, normalisation."""

    orientation: Literal["LPS"] = "LPS"
    slice_axis: int = Field(0, ge=0, le=2, description="2D nets: slices across this axis "
                            "of the LPS grid (0 = sagittal)")
    spacing_mm: tuple[float, float, float] = (0.5, 0.5, 0.5)
    keep_slice_spacing: bool = Field(True, description="2D nets: keep the scan's own spacing "
                                     "across slices (clipped to slice_spacing_range_mm)")
    slice_spacing_range_mm: tuple[float, float] = (0.5, 2.0)
    normalization: Literal["percentile", "zscore"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    patch_size: tuple[int, ...] = Field((256, 256), description="training patch / sliding "
                                        "window size in voxels")
    expected_spacing_range_mm: tuple[float, float] = Field((0.2, 1.2), description="in-plane "
                                        "spacing the card was validated for")
    expected_slice_spacing_max_mm: float = 4.0


class ModelMetadata(Strict):
    name: str
    version: str = "0.1.0"
    format: Literal["cartiq", "monai_bundle", "torchscript", "nnunetv2"] = "cartiq"
    description: str = ""
    network: NetworkSpec | None = None
    input: InputSpec = InputSpec()
    labels: dict[int, str] = Field(..., description="output value -> structure name")
    weights: str = Field("model.pt", description="weights file relative to the package")
    weights_sha256: str | None = None
    license: str = ""
    training_data: str = ""
    authors: str = ""
    references: list[str] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict, description="how it was trained")


@dataclass
class LoadedModel:
    """A network ready for inference plus its metadata and provenance."""

    metadata: ModelMetadata
    folder: Path
    network: Any  # torch.nn.Module, or a callable for nnU-Net
    weights_path: Path | None
    weights_sha256: str | None

    def provenance(self) -> dict[str, Any]:
        return {"name": self.metadata.name, "version": self.metadata.version,
                "format": self.metadata.format, "folder": str(self.folder),
                "weights": None if self.weights_path is None else str(self.weights_path),
                "weights_sha256": self.weights_sha256}


# ------------------------------------------------------------------------- registry


def list_models(models_dir: Path = MODELS_DIR) -> list[ModelMetadata]:
    """Metadata of every package folder in ``models_dir`` (unreadable ones are skipped)."""
    out = []
    for folder in sorted(p for p in models_dir.glob("*") if p.is_dir()):
        if (folder / "metadata.json").exists():
            try:
                out.append(read_metadata(folder / "metadata.json"))
            except ModelError as exc:
                log.warning("skipping %s", exc)
    return out


def resolve_model(name_or_path: str | Path | None, models_dir: Path = MODELS_DIR) -> Path:
    """Path of the metadata file for a registry name or a folder/file path."""
    if name_or_path in (None, "", "default"):
        name_or_path = DEFAULT_MODEL
    p = Path(str(name_or_path))
    if p.exists():
        if p.is_dir():
            for cand in ("metadata.json", "cartiq.json"):
                if (p / cand).exists():
                    return p / cand
            raise ModelError("model folder has no metadata.json or cartiq.json", p)
        if p.suffix == ".json":
            return p
        side = p.with_suffix(".json")
        if side.exists():
            return side
        raise ModelError(f"model file needs a metadata file {side.name} beside it", p)
    folder = models_dir / str(name_or_path)
    if (folder / "metadata.json").exists():
        return folder / "metadata.json"
    known = ", ".join(m.name for m in list_models(models_dir)) or "(none)"
    raise ModelError(f"unknown model {str(name_or_path)!r}; known models: {known} "
                     "(or pass a package folder)")


def read_metadata(path: Path) -> ModelMetadata:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError("metadata file does not exist", path) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model metadata ({exc})", path) from None
    try:
        meta = ModelMetadata.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ModelError(f"invalid model metadata: {where}: {err['msg']}", path) from None
    _check_labels(meta, path)
    return meta


def _check_labels(meta: ModelMetadata, path: Path) -> None:
    from cartiq.io.labels import default_scheme

    valid = set(default_scheme().labels) | set(EXTRA_TARGETS)
    bad = {k: v for k, v in meta.labels.items() if v not in valid}
    if bad:
        raise ModelError(f"labels map to unknown structures {bad}; valid: "
                         + ", ".join(sorted(valid)), path)
    if meta.network is not None and max(meta.labels) >= meta.network.out_channels:
        raise ModelError("labels name an output channel beyond network.out_channels", path)


# ------------------------------------------------------------------------- loading


def build_network(spec: NetworkSpec):
    """Instantiate a MONAI network from its spec (weights not loaded)."""
    from monai.networks import nets

    if spec.name not in ("UNet", "BasicUNet", "DynUNet"):
        raise ModelError(f"unknown network {spec.name!r}; use UNet, BasicUNet or DynUNet")
    kwargs = dict(spec.kwargs)
    try:
        if spec.name == "UNet":
            return nets.UNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                             out_channels=spec.out_channels, **kwargs)
        if spec.name == "BasicUNet":
            return nets.BasicUNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                                  out_channels=spec.out_channels, **kwargs)
        return nets.DynUNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels,
                            out_channels=spec.out_channels, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build network {spec.name} ({exc})") from None


def _verify_sha(weights: Path, expected: str | None) -> str:
    if not weights.exists():
        raise ModelError("weights file is missing", weights)
    actual = sha256_file(weights)
    if expected is not None and actual != expected.lower():
        raise ModelError(f"weights sha256 mismatch (expected {expected[:12]}..., got "
                         f"{actual[:12]}...): file corrupt or replaced", weights)
    if expected is None:
        log.warning("model metadata gives no weights_sha256; %s is not verified", weights)
    return actual


def load_model(name_or_path: str | Path | None = None, *, device: str = "cpu",
               models_dir: Path = MODELS_DIR) -> LoadedModel:
    """Load a model package by registry name or path; checks the weights' sha256."""
    meta_path = resolve_model(name_or_path, models_dir)
    meta = read_metadata(meta_path)
    folder = meta_path.parent
    if meta.format == "nnunetv2":
        return _load_nnunet(meta, folder, device)
    weights = folder / meta.weights
    if meta.format == "monai_bundle" and not weights.exists():
        weights = folder / "models" / "model.pt"
    sha = _verify_sha(weights, meta.weights_sha256)
    import torch

    if meta.format == "torchscript":
        try:
            net = torch.jit.load(str(weights), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"cannot load TorchScript model ({str(exc).splitlines()[0]})",
                             weights) from None
    else:
        if meta.network is None:
            raise ModelError("metadata has no 'network' definition", meta_path)
        net = build_network(meta.network)
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types on corrupt files
            raise ModelError(f"cannot read weights ({str(exc).splitlines()[0][:120]})",
                             weights) from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError("weights do not fit the network in metadata.json ("
                             f"{str(exc).splitlines()[0][:160]})", weights) from None
        net.to(device)
    net.eval()
    return LoadedModel(metadata=meta, folder=folder, network=net, weights_path=weights,
                       weights_sha256=sha)


def _load_nnunet(meta: ModelMetadata, folder: Path, device: str) -> LoadedModel:
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError:
        raise ModelError("nnU-Net v2 models need the optional extra: pip install nnunetv2",
                         folder) from None
    import torch

    folds = sorted(int(p.name.split("_")[1]) for p in folder.glob("fold_*")
                   if p.name.split("_")[1].isdigit())
    if not folds:
        raise ModelError("nnU-Net folder has no fold_N subfolders", folder)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device(device), verbose=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds),
                                                   checkpoint_name="checkpoint_final.pth")
    return LoadedModel(metadata=meta, folder=folder, network=predictor, weights_path=None,
                       weights_sha256=sha256_file(folder / f"fold_{folds[0]}"))


def model_info(name_or_path: str | Path) -> dict[str, Any]:
    """Metadata of a model as a plain dict, plus its card's path (no weights loaded)."""
    meta_path = resolve_model(name_or_path)
    meta = read_metadata(meta_path)
    info = meta.model_dump(mode="json")
    card = meta_path.parent / "README.md"
    info["folder"] = str(meta_path.parent)
    info["card"] = str(card) if card.exists() else None
    return info
