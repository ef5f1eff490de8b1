"""Writing result files: CSV tables, VTK meshes, manifests - each atomically.

A result folder is complete when its ``manifest.json`` exists: :func:`begin_folder` removes
an old manifest before anything is rewritten and :func:`write_manifest` is called last.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cartiq.errors import OutputError
from cartiq.io.volume import atomic_path, atomic_write_text

__all__ = ["check_writable", "begin_folder", "write_csv", "write_vtk_polydata",
           "write_manifest", "provenance", "is_complete", "read_manifest", "fmt_value"]


def check_writable(folder: Path) -> None:
    """Raise :class:`OutputError` unless ``folder`` exists and is writable or can be created."""
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


def begin_folder(folder: Path) -> None:
    """Create ``folder`` and mark it incomplete (remove its manifest) before rewriting."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write output ({exc.strerror})", folder) from None


def is_complete(folder: Path) -> bool:
    return (Path(folder) / "manifest.json").is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    from cartiq.errors import InputError

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise InputError("not a finished cartiq output folder (no manifest.json)", folder)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable manifest.json ({exc})", path) from None


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
    return path


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
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(parts))
    return path


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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` last: its presence marks the folder complete."""
    data = _finite({**provenance(), **manifest})
    data.setdefault("finished", time.time())
    text = json.dumps(data, indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(Path(folder) / "manifest.json", text)
    return Path(folder) / "manifest.json"
