"""Training of segmentation models: synthetic (SynthSeg-style) or supervised.

``cartiq train --labels DIR [--images DIR] --config configs/train_2d.yaml -o models/NEW``

* Without ``--images`` every sample is rendered from a label map in ``DIR`` by
  :class:`cartiq.segmentation.synth.Renderer` (random contrast, resolution, bias, noise, deformation).
* With ``--images`` each label map is paired with the image of the same file stem and the
  same random deformation is applied to both, plus intensity augmentation.

The output folder becomes a model package (``metadata.json``, ``model.pt``) holding the
best weights by mean validation Dice; ``checkpoints/last.pt`` (model, optimiser, step,
random state) allows ``--resume``; ``train.log`` records the per-label validation Dice of
every epoch.  Validation uses held-out label maps (``--val-labels``), rendered once with a
fixed seed, else the last training map.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from cartiq.config import Strict, load_config, resolved
from cartiq.errors import ConfigError, InputError, ModelError
from cartiq.io.volume import IMAGE_SUFFIXES, atomic_path, atomic_write_text, sha256_file
from cartiq.segmentation.models import InputSpec, ModelMetadata, NetworkSpec, build_network
from cartiq.segmentation.synth import MODEL_CLASSES, Renderer, SynthConfig, load_label_map_canonical

__all__ = ["TrainConfig", "train", "dice_per_class", "compact_checkpoint", "export_package",
           "context_stack", "inflate_input_channels", "resample_crop"]

log = logging.getLogger(__name__)


class TrainConfig(Strict):
    name: str = "cartiq_model"
    description: str = ""
    network: NetworkSpec
    input: InputSpec = InputSpec()
    synth: SynthConfig = SynthConfig()
    label_mappings: dict[str, str] = Field(default_factory=lambda: {"*": "cartiq"},
        description="file-name glob -> label mapping of the training label maps")
    sample_weights: dict[str, float] = Field(default_factory=dict,
        description="file-name glob -> relative sampling weight of a training map (default 1)")
    epochs: int = Field(20, ge=1)
    iterations_per_epoch: int = Field(200, ge=1)
    crops_per_batch: int = Field(2, ge=1)
    slices_per_crop: int = Field(4, ge=1, description="2D nets: slices taken from each crop")
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    dice_weight: float = Field(1.0, ge=0, description="weight of the soft Dice term of the loss")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    batch_dice: bool = Field(False, description="Dice over the whole batch, not per slice")
    val_crops: int = Field(8, ge=1)
    seed: int = 0
    num_threads: int = Field(1, ge=1, description="CPU threads for torch")
    max_minutes: float | None = Field(None, gt=0, description="stop (and save) after this")
    license: str = ""
    training_data: str = ""

    @model_validator(mode="after")
    def _loss_has_a_term(self) -> "TrainConfig":
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight are both 0: the loss would be 0")
        return self

    @model_validator(mode="after")
    def _render_grid_is_finer(self) -> "TrainConfig":
        fine = self.synth.render_spacing_mm
        if fine is not None and fine >= self.synth.spacing_mm:
            raise ValueError(f"synth.render_spacing_mm {fine} must be finer than "
                             f"synth.spacing_mm {self.synth.spacing_mm}")
        return self

    @model_validator(mode="after")
    def _channels_fit_the_input(self) -> "TrainConfig":
        from cartiq.segmentation.models import check_input_channels

        try:
            check_input_channels(self.network, self.input, None)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        ctx = self.input.context_slices
        if ctx and self.network.spatial_dims == 2:
            widest = self.input.grid_slice_spacing_mm(self.synth.slice_thickness_mm[1])
            reach = ctx * max(1, round(widest / self.synth.spacing_mm))
            first = self.synth.crop_depth // 2 - self.slices_per_crop // 2
            if first - reach < 0 or first + self.slices_per_crop - 1 + reach >= self.synth.crop_depth:
                raise ValueError(f"synth.crop_depth {self.synth.crop_depth} is too small for "
                                 f"{self.slices_per_crop} slices with {ctx} neighbour(s) "
                                 f"{reach // ctx} voxels apart on each side")
        return self


@dataclass
class _Sample:
    name: str
    labels: torch.Tensor  # canonical grid, training classes
    image: torch.Tensor | None  # canonical grid, normalised (supervised mode)
    slice_spacing_mm: float | None = None  # the image's own spacing across the model's slices


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError("is not a folder of label maps", folder)
    out = sorted(p for p in folder.iterdir()
                 if any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES))
    if not out:
        raise InputError("holds no label maps (.nii.gz, .nrrd, .mha)", folder)
    return out


def _mapping_for(path: Path, cfg: TrainConfig) -> str:
    hits = [(len(p), m) for p, m in cfg.label_mappings.items() if fnmatch.fnmatch(path.name, p)]
    return max(hits)[1] if hits else "cartiq"  # the most specific (longest) glob wins


def _stem(p: Path) -> str:
    name = p.name
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return p.stem


def _load_samples(labels_dir: Path, images_dir: Path | None, cfg: TrainConfig,
                  role: str = "training") -> list[_Sample]:
    from cartiq.io.volume import read_volume
    from cartiq.segmentation.grid import (axis_spacing_along, canonical_geometry,
                                          normalize_array, resample_array)

    sp = cfg.synth.render_spacing_mm or cfg.synth.spacing_mm
    if images_dir is not None and cfg.synth.render_spacing_mm is not None:
        raise InputError("synth.render_spacing_mm is for rendered crops; training on images "
                         "(--images) takes them on synth.spacing_mm", images_dir)
    images = {_stem(p): p for p in _files(images_dir)} if images_dir else {}
    out = []
    for path in _files(labels_dir):
        lab = load_label_map_canonical(path, _mapping_for(path, cfg), sp)
        img, slice_sp = None, None
        if images_dir is not None:
            ip = images.get(_stem(path))
            if ip is None:
                raise InputError(f"no image with the stem {_stem(path)!r} in {images_dir}", path)
            vol = read_volume(ip)
            dst = canonical_geometry(vol.geometry, (sp,) * 3)
            arr = resample_array(vol.array.astype(np.float32), vol.geometry, dst)
            if arr.shape != lab.shape:
                raise InputError("image and label map cover different fields of view", ip)
            img = torch.from_numpy(normalize_array(arr, cfg.input.percentiles))
            slice_sp = axis_spacing_along(vol.geometry, cfg.input.slice_axis)
        log.info("%s map %s: %s voxels at %.2f mm", role, path.name, lab.shape, sp)
        out.append(_Sample(path.name, torch.from_numpy(lab.astype(np.uint8)), img, slice_sp))
    return out


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, n: int) -> np.ndarray:
    """Dice of each class 1..n-1 (NaN where absent in both)."""
    d = np.full(n - 1, np.nan)
    for c in range(1, n):
        p, t = pred == c, truth == c
        s = int(p.sum() + t.sum())
        if s:
            d[c - 1] = 2 * int((p & t).sum()) / s
    return d


class _Batcher:
    """Makes (image, label) batches for 2D or 3D networks."""

    def __init__(self, cfg: TrainConfig, samples: list[_Sample], seed: int) -> None:
        self.cfg, self.samples = cfg, samples
        fine = cfg.synth.render_spacing_mm
        # the renderer works in its own grid's voxels
        rcfg = cfg.synth if fine is None else cfg.synth.model_copy(update={"spacing_mm": fine})
        self.renderer = Renderer(rcfg, seed=seed)
        self.dims = cfg.network.spatial_dims
        w = []
        for smp in samples:
            hits = [(len(p), v) for p, v in cfg.sample_weights.items()
                    if fnmatch.fnmatch(smp.name, p)]
            w.append(max(hits)[1] if hits else 1.0)
        self.weights = torch.tensor(w, dtype=torch.float64)

    def crop_shape(self) -> tuple[int, int, int]:
        ps = self.cfg.input.patch_size
        if self.dims == 2:
            return (self.cfg.synth.crop_depth, int(ps[0]), int(ps[1]))
        return tuple(int(s) for s in ps)  # type: ignore[return-value]

    def context_step(self, slice_spacing_mm: float) -> int:
        """Voxels of the training crop between a slice and its neighbour: the slice spacing
        of the inference grid for a scan of this spacing, on the rendering grid."""
        grid_mm = self.cfg.input.grid_slice_spacing_mm(slice_spacing_mm)
        return max(1, round(grid_mm / self.cfg.synth.spacing_mm))

    def _one(self, s: _Sample) -> tuple[torch.Tensor, torch.Tensor, int]:
        """An (image, labels) crop and the neighbour step for 2.5D input."""
        r = self.renderer
        if s.image is None:
            fine = self.cfg.synth.render_spacing_mm
            if fine is None:
                img, lab = r.sample(s.labels, self.crop_shape())
            else:
                shape = self.crop_shape()
                ratio = self.cfg.synth.spacing_mm / fine
                img, lab = r.sample(s.labels, tuple(round(n * ratio) for n in shape))
                img, lab = resample_crop(img, lab, shape, ratio)
            return img, lab, self.context_step(r.last_slice_thickness_mm)
        both = torch.stack([s.labels.float(), s.image])
        grid = r._grid(s.labels, self.crop_shape(), None)
        lab = F.grid_sample(both[:1, None], grid, mode="nearest", align_corners=True)[0, 0]
        img = F.grid_sample(both[1:, None], grid, mode="bilinear", align_corners=True)[0, 0]
        gamma = math.exp(float(torch.randn(1, generator=r.gen)) * self.cfg.synth.gamma_std)
        return (img.clamp(0, 1) ** gamma, lab.round().long(),
                self.context_step(s.slice_spacing_mm or self.cfg.synth.spacing_mm))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labs = [], []
        for _ in range(self.cfg.crops_per_batch):
            s = self.samples[int(torch.multinomial(self.weights, 1,
                                                   generator=self.renderer.gen))]
            img, lab, step = self._one(s)
            if self.dims == 2:
                k = self.cfg.slices_per_crop
                mid = img.shape[0] // 2
                idx = torch.arange(mid - k // 2, mid - k // 2 + k)
                imgs.append(context_stack(img, idx, self.cfg.input.context_slices, step))
                labs.append(lab[idx, None])
            else:
                imgs.append(img[None, None])
                labs.append(lab[None, None])
        return torch.cat(imgs).float(), torch.cat(labs)


def resample_crop(img: torch.Tensor, lab: torch.Tensor, shape: tuple[int, int, int],
                  ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop rendered on a grid ``ratio`` times finer, resampled onto ``shape`` voxels of the
    coarser grid about the same centre: the image linearly (as inference resamples a scan),
    the labels by nearest neighbour."""
    axes = []
    for n, m in zip(shape, img.shape):
        half = (m - 1) / 2
        # coarse voxel i lies (i - (n-1)/2) * ratio fine voxels from the centre
        axes.append((torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * ratio / max(half, 1e-6))
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)[None]
    out_img = F.grid_sample(img[None, None].float(), grid, mode="bilinear",
                            padding_mode="border", align_corners=True)[0, 0]
    out_lab = F.grid_sample(lab[None, None].float(), grid, mode="nearest",
                            padding_mode="border", align_corners=True)[0, 0]
    return out_img, out_lab.round().to(lab.dtype)


def context_stack(img: torch.Tensor, idx: torch.Tensor, context: int,
                  step: int) -> torch.Tensor:
    """Slices ``idx`` of a (D, H, W) crop as (len(idx), 1 + 2 context, H, W) network input:
    each slice with ``context`` neighbours on either side, ``step`` voxels apart, in slice
    order (the same layout as at inference; the edge slice repeats past the crop)."""
    offsets = torch.arange(-context, context + 1) * step
    return img[(idx[:, None] + offsets).clamp(0, img.shape[0] - 1)]


def inflate_input_channels(state: dict[str, torch.Tensor],
                           target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Initial weights of a 1-channel network for its 2.5D (1 + 2c channel) twin: a weight
    whose input-channel dimension grew from 1 goes to the middle (own-slice) channel, the
    neighbours' channels start at zero - so the new network starts out computing exactly
    what the old one did.  Other shapes must match (``load_state_dict`` says so if not)."""
    out = dict(state)
    for name, w in state.items():
        t = target.get(name)
        if (t is not None and w.ndim >= 3 and w.shape[1] == 1 and t.shape[1] > 1
                and t.shape[1] % 2 == 1 and w.shape[:1] + w.shape[2:] == t.shape[:1] + t.shape[2:]):
            grown = torch.zeros_like(t)
            grown[:, t.shape[1] // 2] = w[:, 0]
            out[name] = grown
    return out


def package_metadata(cfg: TrainConfig, sha: str, extra: dict[str, Any]) -> dict[str, Any]:
    """A package's ``metadata.json`` content: the config's network, input and labels, the
    weights' sha256, and ``extra`` under ``training``."""
    from cartiq.io.labels import default_scheme

    names = set(default_scheme().labels) | {"tibial_cartilage", "meniscus", "fibula"}
    labels = {i: n for i, n in enumerate(MODEL_CLASSES) if n in names and n != "background"}
    meta = ModelMetadata(name=cfg.name, description=cfg.description, network=cfg.network,
                         input=cfg.input, labels=labels, weights="model.pt",
                         weights_sha256=sha, license=cfg.license,
                         training_data=cfg.training_data)
    out = meta.model_dump(mode="json")
    out["training"] = extra
    return out


def compact_checkpoint(src: Path, dst: Path) -> Path:
    """A smaller resumable copy of ``checkpoints/last.pt`` for committing between sessions:
    the weights stay float32; the optimiser's moment estimates are stored as bfloat16 (they
    are cast back to float32 when ``--resume`` loads them)."""
    ck = torch.load(src, map_location="cpu", weights_only=False)
    for state in ck["optimizer"]["state"].values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.ndim > 0:
                state[key] = value.to(torch.bfloat16)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _save_checkpoint(dst, ck)
    return dst


def read_checkpoint(checkpoint: Path) -> tuple[dict[str, Any], TrainConfig]:
    """A training checkpoint and its validated configuration (one clear error otherwise)."""
    try:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        return ck, TrainConfig.model_validate(ck["config"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError,
            pickle.UnpicklingError) as exc:
        raise InputError(f"not a cartiq training checkpoint: {exc}", checkpoint) from exc


def export_package(checkpoint: Path, out_dir: Path) -> Path:
    """Write a model package (``metadata.json`` + ``model.pt``) from the weights of a
    training checkpoint - e.g. the last, annealed epoch of a run, where ``model.pt`` of the
    run folder holds the best epoch by validation Dice.  The checkpoint's own resolved
    configuration and history go into the metadata."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    ck, cfg = read_checkpoint(checkpoint)
    net = build_network(cfg.network)
    try:
        net.load_state_dict(ck["model"])
    except (KeyError, RuntimeError) as exc:
        raise InputError(f"not a cartiq training checkpoint: {exc}", checkpoint) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_package(net, cfg, out_dir, ck["history"])
    return out_dir


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(labels_dir: Path, out_dir: Path, *, config_path: Path | None = None,
          images_dir: Path | None = None, val_labels_dir: Path | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True,
          init_weights: Path | None = None) -> dict[str, Any]:
    """Train a model; returns a summary (epochs, best mean Dice, per-label Dice).

    ``init_weights`` (a model package folder or a ``.pt`` state dict of the same network)
    starts a new run from trained weights instead of random ones (fine-tuning).
    """
    cfg = load_config(config_path, TrainConfig, default_name="train_2d.yaml")
    if cfg.network.out_channels != len(MODEL_CLASSES):
        raise ConfigError(f"network.out_channels must be {len(MODEL_CLASSES)} "
                          f"({', '.join(MODEL_CLASSES)})", config_path)
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("cartiq")
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # the log file always gets the per-epoch Dice
    logger.addHandler(handler)
    try:
        return _train(cfg, labels_dir, out_dir, ckpt_dir, images_dir, val_labels_dir, resume,
                      device, progress, init_weights)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


def _train(cfg: TrainConfig, labels_dir: Path, out_dir: Path, ckpt_dir: Path,
           images_dir: Path | None, val_dir: Path | None, resume: bool, device: str,
           progress: bool, init_weights: Path | None = None) -> dict[str, Any]:
    from monai.losses import DiceCELoss

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(cfg.num_threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
    samples = _load_samples(Path(labels_dir), images_dir, cfg)
    val_samples = (_load_samples(Path(val_dir), None, cfg, role="validation")
                   if val_dir is not None
                   else samples[-1:])
    vb = _Batcher(cfg, val_samples, seed=10_000 + cfg.seed)
    val = [vb.batch() for _ in range(cfg.val_crops)]
    net = build_network(cfg.network).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.iterations_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: max(0.02, (1 - it / total)) ** 0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight,
                         lambda_ce=cfg.ce_weight, batch=cfg.batch_dice)
    batcher = _Batcher(cfg, samples, seed=cfg.seed)
    step, epoch0, best, history = 0, 0, -1.0, []
    last = ckpt_dir / "last.pt"
    if resume:
        if not last.exists():
            raise InputError("nothing to resume: no checkpoints/last.pt", out_dir)
        ck = torch.load(last, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        batcher.renderer.gen.set_state(ck["rng"])
        step, epoch0, best, history = ck["step"], ck["epoch"], ck["best"], ck["history"]
        log.info("resumed from %s at epoch %d (step %d)", last, epoch0, step)
    elif init_weights is not None:
        net.load_state_dict(inflate_input_channels(_load_init(Path(init_weights), device),
                                                   net.state_dict()))
        log.info("initialised from %s", init_weights)
    use_amp = device.startswith("cuda")
    t_start = time.monotonic()
    elapsed0 = sum(h.get("seconds", 0.0) for h in history)
    for epoch in range(epoch0, cfg.epochs):
        net.train()
        t0 = time.monotonic()
        losses = []
        for _ in _progress(range(cfg.iterations_per_epoch), f"epoch {epoch + 1}/{cfg.epochs}",
                           progress):
            x, y = batcher.batch()
            x, y = x.to(device), y.to(device)
            with torch.autocast("cuda", enabled=use_amp):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
        dice = _validate(net, val, device)
        mean = float(np.nanmean(dice))
        rec = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
               "val_dice": {MODEL_CLASSES[i + 1]: (None if np.isnan(d) else round(float(d), 4))
                            for i, d in enumerate(dice)},
               "val_mean_dice": round(mean, 4), "seconds": round(time.monotonic() - t0, 1)}
        history.append(rec)
        log.info("epoch %d step %d loss %.4f val mean Dice %.4f | %s", epoch + 1, step,
                 rec["loss"], mean, " ".join(f"{k}={v}" for k, v in rec["val_dice"].items()))
        if mean > best:
            best = mean
            _write_package(net, cfg, out_dir, history)
        _save_checkpoint(last, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "rng": batcher.renderer.gen.get_state(),
                                "step": step, "epoch": epoch + 1, "best": best,
                                "history": history, "config": resolved(cfg)})
        minutes = (elapsed0 + time.monotonic() - t_start) / 60
        if cfg.max_minutes is not None and minutes >= cfg.max_minutes:
            log.info("stopping after %.1f minutes (max_minutes)", minutes)
            break
    return {"epochs": len(history), "steps": step, "best_mean_dice": best,
            "history": history, "out_dir": str(out_dir)}


def _load_init(path: Path, device: str) -> dict[str, Any]:
    weights = path / "model.pt" if path.is_dir() else path
    if not weights.is_file():
        raise InputError("no model.pt to initialise from", weights)
    try:
        return torch.load(weights, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is bad input
        raise InputError(f"cannot read initial weights: {exc}", weights) from exc


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        yield from it
        return
    from rich.progress import track

    yield from track(it, description=desc, transient=True)


@torch.no_grad()
def _validate(net, val: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> np.ndarray:
    net.eval()
    n = len(MODEL_CLASSES)
    inter = np.zeros(n)
    sums = np.zeros(n)
    truth = np.zeros(n)
    for x, y in val:
        pred = net(x.to(device)).argmax(1, keepdim=True).cpu()
        for c in range(1, n):
            p, t = pred == c, y == c
            inter[c] += int((p & t).sum())
            sums[c] += int(p.sum() + t.sum())
            truth[c] += int(t.sum())
    # a class the validation maps never label (e.g. menisci of a map without them) has no
    # Dice: predicting it there is not known to be wrong
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((sums[1:] > 0) & (truth[1:] > 0), 2 * inter[1:] / sums[1:], np.nan)


def _write_package(net, cfg: TrainConfig, out_dir: Path, history: list[dict]) -> None:
    extra = {"epochs": len(history), "steps": history[-1]["step"],
             "seconds": round(sum(h["seconds"] for h in history), 1),
             "best_val": history[-1],  # the validation of the packaged epoch
             "history": history, "config": resolved(cfg)}
    write_package(net, cfg, out_dir, extra)


def write_package(net, cfg: TrainConfig, out_dir: Path, training: dict[str, Any]) -> None:
    """``out_dir/model.pt`` (the network's weights) and ``metadata.json`` with its sha256 and
    ``training`` (how the weights were made)."""
    weights = out_dir / "model.pt"
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_path(weights) as tmp:
        torch.save(state, tmp)
    atomic_write_text(out_dir / "metadata.json",
                      json.dumps(package_metadata(cfg, sha256_file(weights), training), indent=2))
