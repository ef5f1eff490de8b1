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
* an nnU-Net v2 model (``format: nnunetv2``): a package written by ``cartiq models add``
  (its ``nnunet`` entry names the results folder, configuration or cascade, folds, checkpoint
  and the sha256 of every checkpoint), a trained-model folder with a ``cartiq.json``, or a
  results folder itself (labels mapped from ``dataset.json``); needs the optional extra
  ``cartiq[nnunet]`` and runs through :mod:`cartiq.segmentation.nnunet`.

Registry: the packages shipped in ``models/`` (read-only inside an installed wheel), then the
user's model folder (:func:`user_models_dir`: ``$CARTIQ_MODELS_DIR``, else the platform's user
data folder, e.g. ``~/.local/share/cartiq/models``), where ``cartiq models add``/``fetch`` write.

Every package maps its output labels into the cartiq scheme (``labels``: output value ->
structure name).  Besides the scheme's names, ``tibial_cartilage`` and ``meniscus`` (split
into medial/lateral after inference) and ``fibula`` (used to tell the knee side, then
dropped) are allowed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from cartiq._resources import MODELS, resource_dir
from cartiq.config import Strict
from cartiq.errors import ModelError
from cartiq.io.volume import sha256_file

__all__ = ["MODELS_DIR", "DEFAULT_MODEL", "NetworkSpec", "InputSpec", "ModelMetadata",
           "check_input_channels", "expected_in_channels",
           "NnunetStage", "NnunetSpec", "LoadedModel", "list_models", "resolve_model",
           "read_metadata", "load_model", "build_network", "EXTRA_TARGETS", "user_models_dir"]

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
    normalization: Literal["percentile"] = Field("percentile", description="intensity "
                                                 "percentiles to 0..1, clipped (the only "
                                                 "normalisation the segmenter implements)")
    percentiles: tuple[float, float] = (0.5, 99.5)
    patch_size: tuple[int, ...] = Field((256, 256), description="training patch / sliding "
                                        "window size in voxels")
    expected_spacing_range_mm: tuple[float, float] = Field((0.2, 1.2), description="in-plane "
                                        "spacing the card was validated for")
    expected_slice_spacing_max_mm: float = 4.0
    context_slices: int = Field(0, ge=0, le=4, description="2D nets (2.5D input): this many "
                                "neighbouring slices on each side of a slice, at the grid's "
                                "slice spacing, as extra input channels in slice order "
                                "(network.in_channels = 1 + 2 x context_slices)")
    grid_shifts: list[tuple[float, float]] = Field(
        default_factory=list, description="2D nets, test-time grid shifts: for each (a, b), "
        "a second pass on the canonical grid moved by a and b voxels along the two in-plane "
        "axes (in LPS order); the class probabilities of all passes are averaged on the "
        "scan's grid. Empty: one pass")
    grid_scales: list[float] = Field(
        default_factory=list, description="2D nets, test-time grid scales: for each s, one "
        "more pass on a canonical grid whose in-plane spacing is spacing_mm times s (the "
        "anatomy drawn smaller for s > 1, so each convolution sees more of it); averaged with "
        "the other passes on the scan's grid. Empty: none")

    @field_validator("grid_scales")
    @classmethod
    def _scales_near_one(cls, v):
        for s in v:
            if not 0.5 <= s <= 2.0 or s == 1.0:
                raise ValueError(f"grid scale {s} must be in [0.5, 2] and not 1")
        return v

    @field_validator("grid_shifts")
    @classmethod
    def _shifts_inside_a_voxel(cls, v):
        for a, b in v:
            if not (-1 < a < 1 and -1 < b < 1) or (a == 0 and b == 0):
                raise ValueError(f"grid shift {(a, b)} must be a non-zero fraction of a voxel "
                                 "(each component in (-1, 1))")
        return v

    def grid_slice_spacing_mm(self, scan_slice_spacing_mm: float) -> float:
        """Spacing across a 2D net's slices on the canonical grid for a scan with this slice
        spacing: the scan's own, clipped to ``slice_spacing_range_mm`` (else ``spacing_mm``)."""
        if not self.keep_slice_spacing:
            return float(self.spacing_mm[self.slice_axis])
        lo, hi = self.slice_spacing_range_mm
        return float(min(max(scan_slice_spacing_mm, lo), hi))


class NnunetStage(Strict):
    """One trained nnU-Net configuration folder and the checkpoints cartiq runs."""

    configuration: str
    folder: str = Field(..., description="trained-model folder (absolute, or relative to "
                        "the package)")
    folds: list[str] = Field(..., min_length=1, description="fold_<f> folders used "
                             "(logits averaged over folds, as nnU-Net does)")
    checkpoint: str = "checkpoint_final.pth"
    sha256: dict[str, str] = Field(default_factory=dict, description="fold_<f>/<checkpoint> "
                                   "-> sha256, checked before loading")


class NnunetSpec(Strict):
    """How to run an nnU-Net v2 model: its stages in order (a cascade has two)."""

    trainer: str = ""
    plans: str = ""
    dataset: str = ""
    configuration: str = Field(..., description="final configuration, e.g. 3d_cascade_fullres")
    stages: list[NnunetStage] = Field(..., min_length=1)
    orientation: str | None = Field(None, description="ITK orientation code (e.g. LPS) of "
                                    "the training images' voxel storage; scans are re-stored "
                                    "that way before nnU-Net sees them. None: as stored")
    use_mirroring: bool = Field(True, description="nnU-Net's test-time mirroring")
    tile_step_size: float = Field(0.5, gt=0, le=1)
    known_model: str | None = None
    expected_input: dict[str, Any] = Field(default_factory=dict, description="channels, "
                                           "sequence, normalisation, training spacing")


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
    class_weights: dict[str, float] = Field(default_factory=dict, description="structure "
                                            "name (one of labels) -> factor on its "
                                            "probability before the arg-max (a prior "
                                            "correction fitted on training renderings; "
                                            "1 for names not listed)")
    class_weights_fit: dict[str, Any] = Field(default_factory=dict, description="how "
                                              "class_weights were fitted (renderings, "
                                              "grid, the numbers behind each factor)")
    source: str = ""
    nnunet: NnunetSpec | None = None


@dataclass
class LoadedModel:
    """A network ready for inference plus its metadata and provenance."""

    metadata: ModelMetadata
    folder: Path
    network: Any  # torch.nn.Module, or a callable for nnU-Net
    weights_path: Path | None
    weights_sha256: str | None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. nnU-Net stages, folds, hashes

    def provenance(self) -> dict[str, Any]:
        return {"name": self.metadata.name, "version": self.metadata.version,
                "format": self.metadata.format, "folder": str(self.folder),
                "weights": None if self.weights_path is None else str(self.weights_path),
                "weights_sha256": self.weights_sha256,
                **({"class_weights": dict(self.metadata.class_weights)}
                   if self.metadata.class_weights else {}), **self.extra}


# ------------------------------------------------------------------------- registry


def user_models_dir() -> Path:
    """Where ``cartiq models add``/``fetch`` write packages: ``$CARTIQ_MODELS_DIR``, else the
    platform's user data folder (``platformdirs`` when installed, else
    ``$XDG_DATA_HOME`` or ``~/.local/share``) + ``cartiq/models``."""
    env = os.environ.get("CARTIQ_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("cartiq", appauthor=False)) / "models"
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "cartiq" / "models"


def _registry_dirs(models_dir: Path | None) -> list[Path]:
    return [models_dir] if models_dir is not None else [MODELS_DIR, user_models_dir()]


def list_models(models_dir: Path | None = None) -> list[ModelMetadata]:
    """Metadata of every package folder in ``models_dir`` (default: the shipped packages,
    then the user's model folder; unreadable ones are skipped)."""
    out, seen = [], set()
    for base in _registry_dirs(models_dir):
        for folder in sorted(p for p in base.glob("*") if p.is_dir()):
            if (folder / "metadata.json").exists():
                try:
                    meta = read_metadata(folder / "metadata.json")
                except ModelError as exc:
                    log.warning("skipping %s", exc)
                    continue
                if meta.name not in seen:
                    seen.add(meta.name)
                    out.append(meta)
    return out


def resolve_model(name_or_path: str | Path | None, models_dir: Path | None = None) -> Path:
    """Path of the metadata file for a registry name or a folder/file path (an nnU-Net
    results folder without metadata resolves to itself; see :func:`read_model`)."""
    if name_or_path in (None, "", "default"):
        name_or_path = DEFAULT_MODEL
    p = Path(str(name_or_path))
    if p.exists():
        if p.is_dir():
            for cand in ("metadata.json", "cartiq.json"):
                if (p / cand).exists():
                    return p / cand
            if any(p.rglob("plans.json")):
                return p
            raise ModelError("model folder has no metadata.json or cartiq.json (and is not "
                             "an nnU-Net results folder)", p)
        if p.suffix == ".json":
            return p
        side = p.with_suffix(".json")
        if side.exists():
            return side
        raise ModelError(f"model file needs a metadata file {side.name} beside it", p)
    for base in _registry_dirs(models_dir):
        folder = base / str(name_or_path)
        if (folder / "metadata.json").exists():
            return folder / "metadata.json"
    known = ", ".join(m.name for m in list_models(models_dir)) or "(none)"
    hint = ""
    if str(name_or_path) in _known_nnunet_names():
        hint = f"; get it with `cartiq models fetch {name_or_path}` or `cartiq models add`"
    raise ModelError(f"unknown model {str(name_or_path)!r}; known models: {known} "
                     f"(or pass a package folder){hint}")


def _known_nnunet_names() -> set[str]:
    from cartiq.segmentation.nnunet_results import known_models

    try:
        return set(known_models())
    except ModelError:  # only a hint
        return set()


def read_model(meta_path: Path) -> tuple[ModelMetadata, Path]:
    """Metadata and package folder of a resolved model (an nnU-Net results folder gets its
    metadata built on the fly, labels mapped from its ``dataset.json``)."""
    if meta_path.is_dir():
        from cartiq.segmentation.nnunet_results import describe_results

        return _validate(describe_results(meta_path), meta_path), meta_path
    return read_metadata(meta_path), meta_path.parent


def read_metadata(path: Path) -> ModelMetadata:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError("metadata file does not exist", path) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read model metadata ({exc})", path) from None
    return _validate(data, path)


def _validate(data: Any, path: Path) -> ModelMetadata:
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
    named = set(meta.labels.values())
    for name, w in meta.class_weights.items():
        if name not in named:
            raise ModelError(f"class_weights names {name!r}, which is not one of the model's "
                             "labels", path)
        if not (0.0 < w < float("inf")):
            raise ModelError(f"class_weights[{name!r}] must be a positive number, not {w}",
                             path)
    if meta.network is not None and meta.format != "nnunetv2":
        check_input_channels(meta.network, meta.input, path)
    extra = [k for k in ("grid_shifts", "grid_scales") if getattr(meta.input, k)]
    if extra and (meta.format == "nnunetv2" or meta.network is None
                  or meta.network.spatial_dims != 2):
        raise ModelError(f"input.{extra[0]} applies to cartiq's own 2D networks only; this "
                         "package would ignore it", path)
    if meta.class_weights and meta.format == "nnunetv2":
        raise ModelError("class_weights apply to cartiq's own inference, not to nnU-Net "
                         "models (nnU-Net's predictor takes the arg-max itself)", path)


def expected_in_channels(spec: InputSpec) -> int:
    """Input channels a cartiq 2D/2.5D network takes: the slice and its neighbours."""
    return 1 + 2 * spec.context_slices


def check_input_channels(network: NetworkSpec, spec: InputSpec, path: Path | None) -> None:
    """A :class:`ModelError` unless the network takes the channels cartiq feeds it."""
    if spec.context_slices and network.spatial_dims != 2:
        raise ModelError("input.context_slices (2.5D) applies to 2D networks only", path)
    if network.in_channels != expected_in_channels(spec):
        raise ModelError(f"network.in_channels is {network.in_channels}, but cartiq feeds "
                         f"{expected_in_channels(spec)} (one image channel"
                         + (f" and {spec.context_slices} neighbouring slice(s) on each side"
                            if spec.context_slices else "") + ")", path)


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
               models_dir: Path | None = None) -> LoadedModel:
    """Load a model package by registry name or path; checks the weights' sha256."""
    meta, folder = read_model(resolve_model(name_or_path, models_dir))
    meta_path = folder / "metadata.json"
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
    from cartiq.segmentation.nnunet import load_nnunet, require_nnunet
    from cartiq.segmentation.nnunet_results import inspect_results

    require_nnunet()
    spec = meta.nnunet
    if spec is None:  # a trained-model folder with a bare cartiq.json: as nnU-Net would
        spec = NnunetSpec.model_validate(inspect_results(folder))
    runner = load_nnunet(spec, folder, device)
    return LoadedModel(metadata=meta, folder=folder, network=runner, weights_path=None,
                       weights_sha256=runner.combined_sha256, extra=runner.provenance())


def model_info(name_or_path: str | Path, models_dir: Path | None = None) -> dict[str, Any]:
    """Metadata of a model as a plain dict, plus its card's path (no weights loaded)."""
    meta, folder = read_model(resolve_model(name_or_path, models_dir))
    info = meta.model_dump(mode="json")
    card = folder / "README.md"
    info["folder"] = str(folder)
    info["card"] = str(card) if card.exists() else None
    return info
