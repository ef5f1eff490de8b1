"""``cartiq models add`` / ``cartiq models fetch``: nnU-Net v2 models as cartiq packages.

Where packages live
-------------------
A registered model is a package folder ``<models dir>/<name>/`` holding ``metadata.json``
(format ``nnunetv2``: label mapping into the cartiq scheme, license, source, expected input,
the stages with their folds, checkpoint and the sha256 of every checkpoint) and a
``README.md`` card.  ``<models dir>`` is :func:`cartiq.segmentation.models.user_models_dir`
(``$CARTIQ_MODELS_DIR``, else e.g. ``~/.local/share/cartiq/models``) or ``--models-dir``; the
``models/`` folder shipped inside the wheel is read-only.  The package refers to the results
folder where it is (often shared, read-only storage; the weights are never copied), except
for ``fetch``, which downloads into ``<models dir>/<name>/hub/``.

``fetch`` downloads a known model's files (``configs/known_models.yaml`` ``hub``) with
``huggingface_hub`` (an optional dependency, imported only here) into a temporary folder,
checks that every file the model needs is there (and its sha256 where the publisher gives
one), and only then moves it in place and writes the package.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from cartiq.errors import InputError, ModelError
from cartiq.io.volume import atomic_write_text
from cartiq.segmentation.models import ModelMetadata, list_models, read_metadata, user_models_dir
from cartiq.segmentation.nnunet_results import describe_results, known_models

__all__ = ["add_model", "fetch_model", "hub_download", "copy_downloader"]

log = logging.getLogger(__name__)

Downloader = Callable[[dict[str, Any], Path], None]


def _check_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise InputError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def _card(meta: ModelMetadata) -> str:
    nn = meta.nnunet
    stages = "\n".join(f"* `{s.configuration}`: folds {', '.join(s.folds)}, `{s.checkpoint}` "
                       f"in `{s.folder}`" for s in nn.stages)
    labels = "\n".join(f"* {v}: {n}" for v, n in sorted(meta.labels.items()))
    reported = meta.training.get("reported") or "not stated"
    return (f"# {meta.name}\n\n{meta.description}\n\n"
            f"* format: nnU-Net v2 (`{nn.trainer}__{nn.plans}`, dataset `{nn.dataset}`)\n"
            f"* source: {meta.source}\n* license: {meta.license}\n"
            f"* training orientation: {nn.orientation or 'unknown (scans used as stored)'}\n"
            f"* test-time mirroring: {nn.use_mirroring}\n"
            f"* reported accuracy: {reported}\n\n## Stages\n\n{stages}\n\n"
            f"## Labels (model value: cartiq structure)\n\n{labels}\n\n"
            "Registered with `cartiq models add`; checkpoints are verified against the "
            "sha256 in metadata.json before every load.\n")


def _write_package(meta_dict: dict[str, Any], folder: Path, force: bool) -> ModelMetadata:
    meta = ModelMetadata.model_validate(meta_dict)
    target = folder / "metadata.json"
    if target.exists() and not force:
        raise InputError(f"model package {meta.name!r} already exists (use --force to "
                         "replace it)", folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "README.md", _card(meta))
    atomic_write_text(target, json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    read_metadata(target)  # the registry reads it back the same way
    return meta


def add_model(path: Path, *, name: str | None = None, labels: str | Path | None = None,
              configuration: str | None = None, folds: list[str] | None = None,
              checkpoint: str | None = None, orientation: str | None = None,
              tta: bool | None = None, models_dir: Path | None = None, force: bool = False,
              registry: dict[str, dict[str, Any]] | None = None) -> tuple[ModelMetadata, Path]:
    """Register a local nnU-Net v2 results folder as a package; returns it and its folder."""
    path = Path(path)
    if not path.exists():
        raise InputError("does not exist", path)
    meta = describe_results(path.resolve(), name=name, labels=labels,
                            configuration=configuration, folds=folds, checkpoint=checkpoint,
                            orientation=orientation, tta=tta, registry=registry)
    name = _check_name(meta["name"])
    base = Path(models_dir) if models_dir is not None else user_models_dir()
    shipped = {m.name for m in list_models(None)} if models_dir is None else set()
    if name in shipped and not (base / name / "metadata.json").exists():
        raise InputError(f"model name {name!r} is taken by a shipped model; pass --name")
    out = base / name
    written = _write_package(meta, out, force)
    log.info("registered %s -> %s", name, out)
    return written, out


# ----------------------------------------------------------------------------- fetch


def hub_download(hub: dict[str, Any], dest: Path) -> None:
    """Download a known model's files from the Hugging Face hub into ``dest``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError("fetching needs huggingface_hub: pip install huggingface_hub "
                         "(or download the files yourself and use --from-dir)") from None
    try:
        snapshot_download(repo_id=hub["repo_id"], revision=hub.get("revision"),
                          local_dir=str(dest), allow_patterns=hub.get("allow_patterns"),
                          repo_type="model")
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo
        raise ModelError(f"download of {hub['repo_id']} failed "
                         f"({str(exc).splitlines()[0][:200]})") from None


def copy_downloader(src: Path) -> Downloader:
    """A downloader that copies a local snapshot (a hub mirror, or a manual download)."""

    def copy(hub: dict[str, Any], dest: Path) -> None:
        if not src.is_dir():
            raise InputError("is not a folder", src)
        patterns = hub.get("allow_patterns") or ["*"]
        n = 0
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = f.relative_to(src).as_posix()
            if any(fnmatch.fnmatch(rel, pat) for pat in patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / rel)
                n += 1
        log.info("copied %d files from %s", n, src)

    return copy


def fetch_model(name: str, *, models_dir: Path | None = None, from_dir: Path | None = None,
                downloader: Downloader | None = None, force: bool = False,
                registry: dict[str, dict[str, Any]] | None = None) -> tuple[ModelMetadata, Path]:
    """Download a known model and register it as ``name`` in the models dir."""
    registry = known_models() if registry is None else registry
    if name not in registry:
        raise InputError(f"unknown model {name!r} to fetch; known: "
                         + (", ".join(sorted(registry)) or "(none)"))
    entry = registry[name]
    hub = entry.get("hub")
    if not hub or not hub.get("repo_id"):
        raise ModelError(f"known model {name!r} has no hub location")
    base = Path(models_dir) if models_dir is not None else user_models_dir()
    out = base / name
    if (out / "metadata.json").exists() and not force:
        raise InputError(f"model {name!r} is already installed (use --force to fetch again)",
                         out)
    if downloader is None:
        downloader = copy_downloader(Path(from_dir)) if from_dir is not None else hub_download
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=base))
    try:
        downloader(hub, tmp)
        try:
            meta = describe_results(tmp, name=name, registry={name: entry})
        except ModelError as exc:
            raise ModelError(f"download of {name} is incomplete or not the expected model "
                             f"({exc})") from None
        if meta["nnunet"].get("known_model") != name:
            raise ModelError(f"the files fetched for {name} are not the expected model "
                             f"(dataset/trainer/plans differ from {entry.get('match')})")
        hub_dir = out / "hub"
        if hub_dir.exists():
            shutil.rmtree(hub_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp.rename(hub_dir)
        meta = describe_results(hub_dir, name=name, registry={name: entry})
        for st in meta["nnunet"]["stages"]:  # relative: the package may be moved as a whole
            st["folder"] = str(Path(st["folder"]).relative_to(out.resolve()))
        written = _write_package(meta, out, force=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s -> %s", name, out)
    return written, out
