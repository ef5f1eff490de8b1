"""Fetch the real public knee-MRI samples (``sample_data/sources.yaml``) into a local cache.

Each sample is one file or a folder of files, listed in ``sample_data/sources.yaml`` with
its public URL (a raw file at a fixed commit) and sha256.  :func:`fetch_sample` makes the
sample available locally and returns its path:

* from a **mirror** folder laid out like ``../shared/data`` (offline: CI and tests), each
  file is verified and linked (symlink, else copy) into the cache; or
* from the **network**: each file is downloaded with :mod:`urllib` into a temporary name
  beside its destination, its sha256 checked, then renamed into place (atomic).

Files already in the cache are re-used once verified; a stamp (size, mtime and sha256 of
each file) makes later calls cheap.  The cache defaults to ``~/.cache/cartiq/samples``.
No environment variable is read here: the CLI passes ``--mirror`` / ``CARTIQ_DATA_MIRROR``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import yaml

from cartiq._resources import SAMPLE_DATA, resource_dir
from cartiq.errors import ConfigError, InputError

__all__ = [
    "SOURCES_FILE",
    "DEFAULT_CACHE",
    "SampleFile",
    "Sample",
    "list_samples",
    "sample_info",
    "fetch_sample",
]

log = logging.getLogger(__name__)

SOURCES_FILE = resource_dir(SAMPLE_DATA) / "sources.yaml"
DEFAULT_CACHE = Path("~/.cache/cartiq/samples")
_STAMP_DIR = ".cartiq-verified"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SampleFile:
    """One file of a sample: path relative to the mirror/cache root, URL, sha256, size."""

    path: str
    url: str
    sha256: str
    size: int | None = None


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
                                     size=int(f["size"]) if "size" in f else None)
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


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()  # follows symlinks: a changed mirror file invalidates the stamp
    return [st.st_size, st.st_mtime_ns]


def _stamp_path(cache: Path, name: str) -> Path:
    return cache / _STAMP_DIR / f"{name}.json"


def _read_stamp(cache: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(_stamp_path(cache, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(cache: Path, name: str, stamp: dict[str, Any]) -> None:
    final = _stamp_path(cache, name)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".stamp-", suffix=".json", dir=final.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(stamp, fh)
        os.replace(tmp, final)
    except OSError as exc:  # the stamp only saves time; never fail a fetch on it
        log.debug("cannot write %s: %s", final, exc)


def _is_verified(target: Path, f: SampleFile, stamp: dict[str, Any]) -> bool:
    """True if ``target`` exists with the right content (cheap when the stamp matches)."""
    if not target.is_file():
        return False
    key = _stat_key(target)
    if stamp.get(f.path) == key + [f.sha256]:
        return True
    if f.size is not None and key[0] != f.size:
        return False
    return _sha256(target) == f.sha256


def _tmp_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", suffix=".part", dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _link_from_mirror(src: Path, target: Path) -> None:
    """Symlink (else copy) ``src`` to ``target``, atomically replacing what is there."""
    tmp = _tmp_beside(target)
    try:
        tmp.unlink()
        try:
            os.symlink(src.resolve(), tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


Opener = Callable[..., Any]


def _download(url: str, target: Path, sha256: str, *,
              opener: Opener | None = None, timeout_s: float = _TIMEOUT_S) -> None:
    """Download ``url`` to ``target`` via a temporary file; verify sha256; rename.

    Raises :class:`InputError` naming the URL when the download fails or the content
    does not match.  Nothing is left at ``target`` on failure.
    """
    open_url = opener or urllib.request.urlopen
    tmp = _tmp_beside(target)
    h = hashlib.sha256()
    try:
        try:
            with open_url(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    h.update(block)
                    out.write(block)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise InputError(f"cannot download {url} ({reason}); without network access, "
                             "pass --mirror DIR (or set CARTIQ_DATA_MIRROR) to a folder laid "
                             "out like shared/data") from None
        if h.hexdigest() != sha256:
            raise InputError(f"downloaded {url} has sha256 {h.hexdigest()}, expected "
                             f"{sha256} (changed upstream or corrupted)")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- fetch


def fetch_sample(name: str, *, mirror: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Make the public sample ``name`` available locally and return its path.

    Parameters
    ----------
    name : one of :func:`list_samples` (``pykneer_qdess``, ``pymskt_mese_t2``,
        ``dicom_single``, ``pymskt_dess_labels``, ``spl_knee_atlas_labels``,
        ``spl_knee_atlas_colors``).
    mirror : a folder laid out like ``shared/data`` (``labels/...``, ``pykneer_qdess/...``).
        Files found there are verified (sha256) and linked into the cache; missing ones
        are downloaded.
    cache_dir : where samples are kept (default ``~/.cache/cartiq/samples``).

    Returns
    -------
    Path of the sample's file, or of its folder for DICOM series samples.

    Raises
    ------
    InputError : unknown name, a mirror file with the wrong sha256, or a failed download
        (the message names the URL).
    """
    sample = sample_info(name)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser()
    mirror = None if mirror is None else Path(mirror).expanduser()
    if mirror is not None and not mirror.is_dir():
        raise InputError("sample mirror folder does not exist", mirror)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the sample cache ({exc.strerror})", cache) from None
    stamp = _read_stamp(cache, name)
    new_stamp: dict[str, Any] = {}
    fetched = 0
    for f in sample.files:
        target = cache / f.path
        if not _is_verified(target, f, stamp):
            src = None if mirror is None else mirror / f.path
            if src is not None and src.is_file():
                if _sha256(src) != f.sha256:
                    raise InputError(f"sha256 of mirror file does not match sources.yaml "
                                     f"(expected {f.sha256} for sample {name!r})", src)
                _link_from_mirror(src, target)
            else:
                if src is not None:
                    log.info("%s not in mirror %s; downloading", f.path, mirror)
                _download(f.url, target, f.sha256)
            fetched += 1
        new_stamp[f.path] = _stat_key(target) + [f.sha256]
    if new_stamp != stamp:
        _write_stamp(cache, name, new_stamp)
    if fetched:
        log.info("sample %s: %d file(s) fetched into %s", name, fetched, cache)
    return cache / sample.path
