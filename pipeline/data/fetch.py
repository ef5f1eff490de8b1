"""Fetch the real public knee-MRI samples (``sample_data/sources.yaml``) into a local cache.

Each sample is one file or a folder of files, listed in ``sample_data/sources.yaml`` with
its public URL (a raw file at a fixed commit, or a member of a released archive) and
sha256.  :func:`fetch_sample` makes the sample available locally and returns its path.
Downloading, verifying and caching are :mod:`pooch`'s (``pooch.retrieve``: a temporary
file, the sha256 checked, then moved into place; a cached file with the right hash is not
fetched again, a damaged one is replaced):

* from a **mirror** folder laid out like ``../shared/data`` (offline: CI and tests), each
  file is copied from there by a pooch downloader and verified like a download;
* else from the **network** (``pooch.HTTPDownloader``; ``file://`` URLs are copied).

The cache defaults to pooch's OS cache folder (``pooch.os_cache("cartiq")/samples``, e.g.
``~/.cache/cartiq/samples``).  No environment variable is read here: the CLI passes
``--mirror`` / ``CARTIQ_DATA_MIRROR`` and ``--cache`` / ``CARTIQ_DATA_DIR``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from cartiq._resources import SAMPLE_DATA, resource_dir
from cartiq.errors import ConfigError, InputError

__all__ = [
    "SOURCES_FILE",
    "default_cache",
    "SampleFile",
    "Sample",
    "list_samples",
    "sample_info",
    "fetch_sample",
]

log = logging.getLogger(__name__)

SOURCES_FILE = resource_dir(SAMPLE_DATA) / "sources.yaml"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def default_cache() -> Path:
    """pooch's per-user cache folder for cartiq's samples."""
    import pooch

    return Path(pooch.os_cache("cartiq")) / "samples"


@dataclass(frozen=True)
class SampleFile:
    """One file of a sample: path relative to the mirror/cache root, URL, sha256, size.

    ``member``: the file is this member of the archive at ``url`` (whose own hash the
    publisher does not give); the member's sha256 is checked after extraction."""

    path: str
    url: str
    sha256: str
    size: int | None = None
    member: str | None = None


@dataclass(frozen=True)
class Sample:
    """A public sample: a single file or a folder of files."""

    name: str
    kind: str  # "file" or "folder"
    path: str  # relative to the mirror/cache root: what fetch_sample returns
    description: str
    license: str
    citation: str
    source: str
    files: tuple[SampleFile, ...]


# --------------------------------------------------------------------------- registry


def _parse_sources(path: Path) -> dict[str, Sample]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("sample list does not exist", path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), dict):
        raise ConfigError("needs a 'samples' mapping", path)
    samples: dict[str, Sample] = {}
    for name, entry in data["samples"].items():
        try:
            files = tuple(SampleFile(path=str(f["path"]), url=str(f["url"]),
                                     sha256=str(f["sha256"]).lower(),
                                     size=int(f["size"]) if "size" in f else None,
                                     member=str(f["member"]) if "member" in f else None)
                          for f in entry["files"])
            sample = Sample(name=str(name), kind=str(entry["kind"]), path=str(entry["path"]),
                            description=str(entry.get("description", "")),
                            license=str(entry.get("license", "")),
                            citation=str(entry.get("citation", "")),
                            source=str(entry.get("source", "")), files=files)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"sample {name!r} is malformed ({exc!r})", path) from None
        if sample.kind not in ("file", "folder") or not files:
            raise ConfigError(f"sample {name!r} needs kind file|folder and files", path)
        for f in files:
            if Path(f.path).is_absolute() or ".." in Path(f.path).parts:
                raise ConfigError(f"sample {name!r}: file path {f.path!r} must be relative "
                                  "and stay inside the cache", path)
        samples[sample.name] = sample
    return samples


@lru_cache(maxsize=4)
def _registry(path: Path = SOURCES_FILE) -> dict[str, Sample]:
    return _parse_sources(path)


def list_samples() -> list[str]:
    """Names of the samples that :func:`fetch_sample` knows, in ``sources.yaml`` order."""
    return list(_registry())


def sample_info(name: str) -> Sample:
    """The :class:`Sample` record of ``name`` (raises :class:`InputError` if unknown)."""
    samples = _registry()
    if name not in samples:
        raise InputError(f"unknown sample {name!r}; known: {', '.join(samples)}")
    return samples[name]


# --------------------------------------------------------------------------- fetch


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _copier(src: Path):
    """A pooch downloader that copies ``src`` (a mirror file or a file:// URL)."""

    def copy(url: str, output_file: Any, pooch_obj: Any = None, check_only: bool = False):
        if check_only:
            return src.is_file()
        if hasattr(output_file, "write"):
            with open(src, "rb") as fh:
                shutil.copyfileobj(fh, output_file)
        else:
            shutil.copyfile(src, output_file)
        return None

    return copy


def _downloader(url: str, progress: bool):
    import pooch

    parts = urllib.parse.urlparse(url)
    if parts.scheme == "file":
        return _copier(Path(urllib.request.url2pathname(parts.path)))
    return pooch.HTTPDownloader(progressbar=progress, timeout=_TIMEOUT_S)


def _error(message: str, source: str) -> InputError:
    """One-line error naming ``source``: a URL (kept intact) or a mirror file (as path)."""
    if "://" in source:
        return InputError(f"{source}: {message}")
    return InputError(message, source)


def _retrieve(url: str, sha256: str | None, target: Path, downloader, source: str) -> Path:
    """pooch.retrieve into ``target``; every failure is one InputError naming ``source``."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    if "://" not in source:  # a mirror copy: pooch's "Downloading data from URL" would mislead
        logger.setLevel(logging.WARNING)
        log.debug("copying %s from the mirror", source)
    try:
        return Path(pooch.retrieve(url, known_hash=None if sha256 is None else f"sha256:{sha256}",
                                   fname=target.name, path=target.parent,
                                   downloader=downloader))
    except ValueError as exc:  # pooch: the hash of what arrived is not the registry's
        if "hash" not in str(exc).lower():
            raise _error(f"cannot fetch ({exc})", source) from None
        what = "download" if "://" in source else "mirror file"
        raise _error(f"sha256 of {what} does not match sources.yaml (expected {sha256}); "
                     "changed upstream or corrupted", source) from None
    except Exception as exc:  # noqa: BLE001 - requests/OS errors of the download
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise _error(f"cannot download ({reason}); without network access, pass --mirror DIR "
                     "(or set CARTIQ_DATA_MIRROR) to a folder laid out like shared/data",
                     source) from None
    finally:
        logger.setLevel(level)


def _fetch_member(f: SampleFile, target: Path, progress: bool) -> None:
    """Download the archive ``f.url`` (into the cache's ``archives/``), extract ``f.member``
    to ``target`` and check its sha256."""
    archives = target.parents[len(Path(f.path).parts) - 1] / "archives"
    name = Path(urllib.parse.urlparse(f.url).path).name
    archive = _retrieve(f.url, None, archives / name, _downloader(f.url, progress), f.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        with tarfile.open(archive) as tar:
            src = tar.extractfile(f.member)
            if src is None:
                raise InputError(f"archive has no file {f.member!r}", archive)
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        if _sha256(tmp) != f.sha256:
            raise InputError(f"sha256 of {f.member} does not match sources.yaml", archive)
        tmp.replace(target)
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise InputError(f"cannot extract {f.member} ({exc})", archive) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_sample(name: str, *, mirror: Path | None = None, cache_dir: Path | None = None,
                 progress: bool = False) -> Path:
    """Make the public sample ``name`` available locally and return its path.

    Parameters
    ----------
    name : one of :func:`list_samples`.
    mirror : a folder laid out like ``shared/data`` (``labels/...``, ``pykneer_qdess/...``).
        Files found there are copied and verified (sha256); missing ones are downloaded.
    cache_dir : where samples are kept (default :func:`default_cache`).
    progress : show a download progress bar.

    Returns
    -------
    Path of the sample's file, or of its folder for DICOM series samples.

    Raises
    ------
    InputError : unknown name, a mirror file with the wrong sha256, or a failed download
        (the message names the URL or the mirror file).
    """
    sample = sample_info(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache()
    mirror = None if mirror is None else Path(mirror).expanduser()
    if mirror is not None and not mirror.is_dir():
        raise InputError("sample mirror folder does not exist", mirror)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the sample cache ({exc.strerror})", cache) from None
    for f in sample.files:
        target = cache / f.path
        if f.sha256 is not None and target.is_file() and _sha256(target) == f.sha256:
            continue  # cached and verified: nothing to copy, extract or download
        src = None if mirror is None else mirror / f.path
        if src is not None and src.is_file():
            _retrieve(f.url, f.sha256, target, _copier(src), str(src))
        elif f.member is not None:
            _fetch_member(f, target, progress)
        else:
            if src is not None:
                log.info("%s not in mirror %s; downloading", f.path, mirror)
            _retrieve(f.url, f.sha256, target, _downloader(f.url, progress), f.url)
    return cache / sample.path
