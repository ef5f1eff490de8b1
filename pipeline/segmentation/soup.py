"""Weight averaging of trained runs ("model soup"; Wortsman et al., ICML 2022).

Runs fine-tuned from the same weights usually stay in one basin of the loss, so the mean of
their weights is itself a working network, often as good as the best of them and steadier.
:func:`average_checkpoints` writes such a mean as a model package, with every ingredient
recorded in its metadata so that the package can be rebuilt and traced.

The network here uses instance norm (no running statistics), so the mean needs no
recalibration pass.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from cartiq.config import resolved
from cartiq.errors import InputError
from cartiq.segmentation.models import build_network
from cartiq.segmentation.train import read_checkpoint, write_package

__all__ = ["average_checkpoints"]

log = logging.getLogger(__name__)


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a state dict's names and float32 values (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _load(path: Path) -> dict[str, Any]:
    ck, cfg = read_checkpoint(path)
    if "model" not in ck or "history" not in ck:
        raise InputError("not a cartiq training checkpoint: no weights or history", path)
    return {"cfg": cfg, "model": ck["model"], "history": ck["history"]}


def average_checkpoints(checkpoints: list[Path], out_dir: Path,
                        names: list[str] | None = None) -> Path:
    """Write a model package whose weights are the uniform mean of the checkpoints' weights.

    Every checkpoint must hold the same network and input specification (else one
    :class:`~cartiq.errors.InputError` naming the file).  The package's configuration is the
    first checkpoint's; ``training.averaged_from`` lists each ingredient (``names``, e.g. the
    run's config file, else the path as given; seed, epochs, steps, digest of its weights,
    last validation and its whole resolved config).
    """
    paths = [Path(p) for p in checkpoints]
    names = [str(p) for p in checkpoints] if names is None else list(names)
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} checkpoints")
    if len(paths) < 2:
        raise InputError("averaging needs at least two checkpoints", paths[0] if paths else None)
    runs = [_load(p) for p in paths]
    first = runs[0]["cfg"]
    for path, run in zip(paths[1:], runs[1:]):
        for part in ("network", "input"):
            if getattr(run["cfg"], part) != getattr(first, part):
                raise InputError(f"its {part} differs from that of {paths[0].name}; only runs "
                                 "of the same network and input can be averaged", path)
        if set(run["model"]) != set(runs[0]["model"]):
            raise InputError(f"its weights do not match those of {paths[0].name}", path)
    mean = {}
    for name, ref in runs[0]["model"].items():
        total = sum(r["model"][name].to(torch.float64) for r in runs)
        mean[name] = (total / len(runs)).to(ref.dtype)
    net = build_network(first.network)
    net.load_state_dict(mean)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ingredients = [{"run": n, "seed": r["cfg"].seed,
                    "epochs": len(r["history"]),
                    "steps": r["history"][-1]["step"] if r["history"] else 0,
                    "weights_sha256": _state_sha256(r["model"]),
                    "last_val": r["history"][-1] if r["history"] else None,
                    "config": resolved(r["cfg"])}
                   for n, r in zip(names, runs)]
    extra = {"averaged_from": ingredients, "averaging": "uniform mean of the weights",
             "config": resolved(first)}
    write_package(net, first, out_dir, extra)
    log.info("averaged %d checkpoints into %s", len(runs), out_dir)
    return out_dir
