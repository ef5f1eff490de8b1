"""Writing result files: CSV tables, VTK meshes, manifests - each atomically and verified.

The output folder contract:

* :func:`check_writable` before any input is read: the folder can be written and holds
  none of the inputs (a fresh folder would delete them);
* :func:`begin_folder` before the first file: the folder is emptied (nothing of an earlier
  run survives: old meshes, temporary files; logs excepted) and marked incomplete
  (``.cartiq-incomplete``);
  a non-empty folder that holds no cartiq results is written into, never emptied;
* every file is written to a temporary name, flushed, read back and checked, then renamed
  (:func:`cartiq.io.volume.atomic_path`);
* :func:`write_manifest` last: ``manifest.json`` lists every file of the folder with its
  size and sha256 (``files``) and removes the incomplete mark.  The folder is complete only
  while every listed file is there with that size and hash (:func:`why_incomplete`).
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import logging
import math
import os
import platform
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cartiq.errors import OutputError
from cartiq.io.volume import atomic_write_bytes, atomic_write_text

__all__ = ["check_writable", "begin_folder", "write_csv", "write_vtk_polydata",
           "BackgroundWrites", "write_manifest", "provenance", "is_complete", "why_incomplete", "read_manifest",
           "fmt_value", "INCOMPLETE_MARK"]

log = logging.getLogger(__name__)

INCOMPLETE_MARK = ".cartiq-incomplete"
_NOT_LISTED = ("manifest.json", INCOMPLETE_MARK)  # and logs (*.log): still being appended


def check_writable(folder: Path, *, inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise :class:`OutputError` unless ``folder`` exists and is writable or can be created,
    and holds none of ``inputs`` (files or folders read by the run)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError("output path exists and is not a folder", probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", folder)
    _check_no_inputs(folder, inputs)


def _check_no_inputs(folder: Path, inputs: Iterable[str | Path | None]) -> None:
    where = Path(os.path.realpath(folder))
    for item in inputs:
        if item is None:
            continue
        path = Path(os.path.realpath(item))
        if path == where or where in path.parents:
            raise OutputError(f"output folder holds the input {item}; its results would "
                              "replace it - choose another output folder", folder)


def _is_ours(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() or (folder / INCOMPLETE_MARK).exists()


def begin_folder(folder: Path, *, fresh: bool = True,
                 inputs: Iterable[str | Path | None] = (), owned: bool = False) -> None:
    """Create ``folder`` and mark it incomplete before anything is written into it.

    ``fresh``: empty it first, so that no file of an earlier run survives - when it holds
    cartiq results (a manifest or the incomplete mark) or ``owned`` (the caller owns the
    folder, e.g. a batch scan folder); another non-empty folder is written into as it is.
    ``fresh=False``: keep what an earlier step of the same run wrote there (``cartiq run``
    measures the segmentation it has just written).  Raises :class:`OutputError` when the
    folder holds one of ``inputs`` or cannot be written.
    """
    folder = Path(folder)
    _check_no_inputs(folder, inputs)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ours = owned or _is_ours(folder)
        (folder / "manifest.json").unlink(missing_ok=True)
        if fresh and ours:
            _empty(folder)
        elif fresh and any(folder.iterdir()):
            log.warning("%s is not empty and holds no cartiq results: writing beside its "
                        "files (use a new folder to be sure nothing else is in it)", folder)
        (folder / INCOMPLETE_MARK).touch()
    except OSError as exc:
        raise OutputError(f"cannot write output ({exc.strerror or exc})",
                          exc.filename or folder) from None


def _empty(folder: Path) -> None:
    """Remove everything in ``folder`` but its logs (``*.log``: a batch scan's log is the
    history of its runs, open while the stages begin their folders); the incomplete mark
    goes last."""
    import shutil

    for entry in sorted(folder.iterdir(), key=lambda p: p.name == INCOMPLETE_MARK):
        if entry.name.endswith(".log") and entry.is_file():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def why_incomplete(folder: Path) -> str | None:
    """``None`` when ``folder`` is a complete output folder, else why not (one phrase).

    Complete: ``manifest.json`` parses and every file it lists (``files``) is there with the
    recorded size and sha256.
    """
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return "no manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"manifest.json unreadable ({' '.join(str(exc).split())[:120]})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return "manifest.json lists no files (written by an older cartiq)"
    return _damage(Path(folder), files)


def _damage(folder: Path, files: dict[str, Any]) -> str | None:
    for rel, entry in sorted(files.items()):
        f = folder / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != entry.get("size"):
            return f"{rel} has {size} bytes, the manifest records {entry.get('size')}"
        if _sha256(f) != entry.get("sha256"):
            return f"{rel} differs from the file the manifest records (sha256)"
    return None


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a complete output folder (see :func:`why_incomplete`)."""
    return why_incomplete(folder) is None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished output folder; :class:`InputError` when there is none,
    or when a file it lists is missing or changed."""
    from cartiq.errors import InputError

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise InputError("not a finished cartiq output folder (no manifest.json)", folder)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable manifest.json ({exc})", path) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    damage = _damage(Path(folder), files) if isinstance(files, dict) else None
    if damage:
        raise InputError(f"damaged output folder: {damage}; run it again", folder)
    return manifest


def fmt_value(value: Any) -> Any:
    """CSV cell: floats rounded to 4 decimals, NaN as empty."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return ""
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else str(round(v, 4))
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: fmt_value(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def write_vtk_polydata(path: Path, points: np.ndarray, faces: np.ndarray,
                       point_data: dict[str, np.ndarray] | None = None,
                       title: str = "cartiq surface") -> Path:
    """Legacy binary VTK polydata (points in LPS mm; 3D Slicer reads LPS by default)."""
    points = np.asarray(points, dtype=">f4")
    faces = np.asarray(faces, dtype=np.int64)
    parts = [
        b"# vtk DataFile Version 3.0\n",
        f"{title} SPACE=LPS\n".encode(),
        b"BINARY\nDATASET POLYDATA\n",
        f"POINTS {len(points)} float\n".encode(), points.tobytes(), b"\n",
    ]
    cells = np.hstack([np.full((len(faces), 1), 3), faces]).astype(">i4")
    parts += [f"POLYGONS {len(faces)} {cells.size}\n".encode(), cells.tobytes(), b"\n"]
    if point_data:
        parts.append(f"POINT_DATA {len(points)}\n".encode())
        for name, values in point_data.items():
            arr = np.nan_to_num(np.asarray(values, dtype=float), nan=-1.0).astype(">f4")
            parts += [f"SCALARS {name} float 1\nLOOKUP_TABLE default\n".encode(), arr.tobytes(), b"\n"]
    atomic_write_bytes(path, b"".join(parts))
    return Path(path)


class BackgroundWrites:
    """Files written one after another, in the order they are submitted, by one background
    thread, while the caller computes what comes next (the QC figure, ...).

    The disk sees exactly what writing them in line would do: the same order, and after a
    failed write the later ones are not attempted.  Leaving the ``with`` block waits for
    every write and raises the first failure (in place of an error of the caller's own,
    which came later).  Each write is atomic and verified as everywhere
    (:func:`cartiq.io.volume.atomic_path`)::

        with BackgroundWrites() as bg:
            thickness = bg.submit(write_volume, out / "thickness.nii.gz", array, geometry)
            png = draw()  # meanwhile, in this thread
            bg.submit(atomic_write_bytes, out / "qc.png", png)
        paths = [thickness.result()]

    Worth it when the writes spend their time outside the GIL (zlib, ITK, fsync).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cartiq-write")
        self._futures: list[Future] = []
        self._failed = False  # only the writer thread reads and sets it

    def submit(self, fn, /, *args: Any, **kwargs: Any) -> Future:
        def write() -> Any:
            if self._failed:
                raise _NotAttempted
            try:
                return fn(*args, **kwargs)
            except BaseException:
                self._failed = True
                raise

        future = self._pool.submit(write)
        self._futures.append(future)
        return future

    def __enter__(self) -> "BackgroundWrites":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._pool.shutdown(wait=True)
        if exc is None or isinstance(exc, Exception):  # an interrupt goes on as it is
            for future in self._futures:
                if future.exception() is not None:  # the first failure; later ones were skipped
                    raise future.exception()
        return False


class _NotAttempted(Exception):
    """A write skipped because an earlier one failed."""


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    from cartiq._version import __version__

    return {
        "cartiq_version": __version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _listed_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file in ``folder`` (recursively) but the manifest, the mark and logs."""
    files = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel not in _NOT_LISTED and not f.name.endswith(".log"):
            files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return files


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` last: it lists every file of the folder with its size and
    sha256 (``files``); a folder is complete while they are all there unchanged."""
    folder = Path(folder)
    data = _finite({**provenance(), **manifest})
    data.setdefault("finished", time.time())
    try:
        data["files"] = _listed_files(folder)
    except OSError as exc:
        raise OutputError(f"cannot read back an output ({exc.strerror or exc})",
                          exc.filename or folder) from None
    text = json.dumps(data, indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(folder / "manifest.json", text)
    try:
        (folder / INCOMPLETE_MARK).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write output ({exc.strerror or exc})", folder) from None
    return folder / "manifest.json"
