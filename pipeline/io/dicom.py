"""DICOM series discovery and reading.

A folder may hold several series and, for multi-echo sequences (qDESS, multi-echo spin
echo), several echoes per series - stored either in one series (EchoNumbers differ) or as
sibling series that share a SeriesNumber.  We group files by series, then by echo, and read
one echo of one series as a 3D volume, slices sorted along the slice normal.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError

__all__ = ["SeriesInfo", "list_series", "read_dicom_series", "read_dicom_file_series",
           "header_meta", "side_from_header"]

log = logging.getLogger(__name__)


@dataclass
class SeriesInfo:
    key: str  # SeriesNumber when present, else SeriesInstanceUID
    number: str
    description: str
    uids: set[str] = field(default_factory=set)
    echoes: dict[int, list[tuple[Path, Any]]] = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.number or '?'} '{self.description}' ({len(self.echoes)} echo(es))"


def _read_header(path: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # not a DICOM file: skipped silently (folders hold other files)
        if _has_dicom_magic(path):  # ...but a damaged DICOM file is an error
            raise InputError(f"DICOM file is damaged or truncated ({str(exc).strip()[:100]})",
                             path) from None
        return None
    if "PixelData" not in ds and not hasattr(ds, "Rows"):
        sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if sop is not None and "Image Storage" in str(getattr(sop, "name", "")):
            raise InputError(f"DICOM file is truncated: an {sop.name} file whose header "
                             "ends before its image attributes", path)
        return None
    return ds


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def check_pixel_data(path: Path) -> None:
    """Raise :class:`InputError` naming ``path`` when its pixel data are cut short.

    ITK's error for a cut slice names neither the file nor the problem; uncompressed pixel
    data must hold Rows x Columns x samples x bytes x frames and end inside the file.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), defer_size=256)
        try:
            elem = ds.get_item(0x7FE00010, keep_deferred=True)
        except TypeError:  # pydicom < 3 keeps deferred elements raw anyway
            elem = ds.get_item(0x7FE00010)
    except Exception as exc:
        raise InputError(f"DICOM file is damaged or truncated ({str(exc).strip()[:100]})",
                         path) from None
    if elem is None:
        raise InputError("DICOM image file has no pixel data (truncated?)", path)
    length, tell = getattr(elem, "length", None), getattr(elem, "value_tell", None)
    if length is None or tell is None:
        return
    size = path.stat().st_size
    if length == 0xFFFFFFFF:  # encapsulated (compressed): parse the fragments to the end
        try:
            pydicom.dcmread(str(path)).PixelData
        except Exception as exc:
            raise InputError(f"DICOM file's compressed pixel data are damaged or truncated "
                             f"({str(exc).strip()[:100]})", path) from None
        return
    if tell + length > size:
        raise InputError(f"DICOM file is truncated: its pixel data need {length:,} bytes, "
                         f"{max(size - tell, 0):,} are present", path)
    try:
        need = (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1)
                * int(ds.BitsAllocated) // 8 * int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        return
    if length < need:
        raise InputError(f"DICOM pixel data hold {length:,} bytes; its header "
                         f"({int(ds.Rows)}x{int(ds.Columns)}, {int(ds.BitsAllocated)} bit) "
                         f"needs {need:,}", path)


def list_series(folder: Path, *, recursive: bool = True) -> list[SeriesInfo]:
    """All image series in (or below) ``folder``, grouped by series then echo."""
    groups: dict[str, SeriesInfo] = {}
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    # hidden files are skipped: macOS "._*" resource forks, partial downloads
    for path in sorted(p for p in candidates if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
        if ds is None or not hasattr(ds, "ImagePositionPatient"):
            continue
        number = str(getattr(ds, "SeriesNumber", "") or "")
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        key = number or uid
        info = groups.setdefault(key, SeriesInfo(key=key, number=number,
                                                 description=str(getattr(ds, "SeriesDescription", "") or "")))
        info.uids.add(uid)
        echo = int(getattr(ds, "EchoNumbers", 1) or 1)
        info.echoes.setdefault(echo, []).append((path, ds))
    for info in groups.values():
        _split_echoes_by_uid(info)
    return list(groups.values())


def _split_echoes_by_uid(info: SeriesInfo) -> None:
    """Sibling series sharing a SeriesNumber without EchoNumbers (a common qDESS export):
    each SeriesInstanceUID becomes one echo, ordered by echo time."""
    if len(info.uids) < 2 or len(info.echoes) != 1:
        return
    items = next(iter(info.echoes.values()))
    if len({str(getattr(ds, "FrameOfReferenceUID", "")) for _, ds in items}) > 1:
        return  # same number, different frames of reference: not one acquisition
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in items:
        by_uid.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((path, ds))

    def echo_time(uid: str) -> tuple[float, str]:
        te = getattr(by_uid[uid][0][1], "EchoTime", None)
        return (float(te) if te not in (None, "") else float("inf"), uid)

    info.echoes = {n: by_uid[uid] for n, uid in enumerate(sorted(by_uid, key=echo_time), 1)}


def _select(series: list[SeriesInfo], folder: Path, wanted: str | None) -> SeriesInfo:
    if not series:
        raise InputError("no DICOM image files found in folder", folder)
    if wanted is not None:
        w = str(wanted).strip()
        # an exact series number or UID wins over a description substring ("5" must not
        # also pick a series described "thk1p5")
        hits = ([s for s in series if s.number == w] or [s for s in series if w in s.uids]
                or [s for s in series if w and w.lower() in s.description.lower()])
        if not hits:
            raise InputError(f"no series matches --series {wanted!r}; found: "
                             + "; ".join(s.label() for s in series), folder)
        series = hits
    if len(series) > 1:
        raise InputError("folder holds several series; choose one with --series NUMBER|"
                         "DESCRIPTION: " + "; ".join(s.label() for s in series), folder)
    return series[0]


def _sorted_files(items: list[tuple[Path, Any]], folder: Path) -> list[Path]:
    iop = np.asarray(items[0][1].ImageOrientationPatient, dtype=float)
    for _, ds in items:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-3):
            raise InputError("DICOM series mixes slice orientations (a localizer?); choose "
                             "a series with --series", folder)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, float)) for _, ds in items])
    order = np.argsort(pos, kind="stable")
    gaps = np.diff(pos[order])
    if len(gaps) and np.any(gaps < 1e-4):
        raise InputError("DICOM series has duplicate slice positions (mixed acquisitions or "
                         "echoes without EchoNumbers?)", folder)
    # ITK would silently assume a uniform spacing: missing slices would shift the geometry
    if len(gaps) > 1 and gaps.max() - gaps.min() > max(0.01, 0.01 * float(np.median(gaps))):
        raise InputError(f"DICOM slice spacing is not uniform ({gaps.min():.3f} to "
                         f"{gaps.max():.3f} mm): missing slices?", folder)
    return [items[i][0] for i in order]


def read_dicom_series(folder: Path, *, series: str | None = None,
                      echo: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Read one echo of one series in ``folder`` as a SimpleITK image plus metadata."""
    info = _select(list_series(folder), folder, series)
    return _read_echo(info, folder, echo)


def read_dicom_file_series(path: Path, *, echo: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Read the series (and echo) that one DICOM file belongs to, from the file's folder.

    A lone 2D slice gives an :class:`InputError` saying so.
    """
    ds = _read_header(path)
    if ds is None or not hasattr(ds, "ImagePositionPatient"):
        raise InputError("not a readable DICOM image file", path)
    uid = str(getattr(ds, "SeriesInstanceUID", ""))
    found = [s for s in list_series(path.parent, recursive=False) if uid in s.uids]
    if not found:  # pragma: no cover - the file itself is always found
        raise InputError("cannot find the DICOM series of this file", path)
    chosen = echo if echo is not None else int(getattr(ds, "EchoNumbers", 1) or 1)
    return _read_echo(found[0], path, chosen)


def _read_echo(info: SeriesInfo, folder: Path, echo: int | None) -> tuple[Any, dict[str, Any]]:
    import SimpleITK as sitk

    echoes = sorted(info.echoes)
    chosen = echoes[0] if echo is None else int(echo)
    if chosen not in info.echoes:
        raise InputError(f"series {info.number} has echoes {echoes}; --echo {echo} not found",
                         folder)
    if echo is None and len(echoes) > 1:
        log.info("%s: multi-echo series (%d echoes); using echo %d (choose with --echo)",
                 folder, len(echoes), chosen)
    items = info.echoes[chosen]
    if len(items) < 2:
        raise InputError(f"is 2D: DICOM series {info.number} echo {chosen} has a single "
                         "slice; a 3D image is needed", folder)
    files = _sorted_files(items, folder)
    for f in files:
        check_pixel_data(f)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    # slice spacing is checked above; keep ITK's own sub-micron non-uniformity warning
    # (printed straight to stderr) quiet while reading
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM series ({str(exc).strip().splitlines()[-1][:160]})",
                         folder) from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    meta = header_meta_from_dataset(items[0][1])
    meta.update({"format": "dicom", "echo": chosen, "n_echoes": len(echoes),
                 "n_slices": len(files), "files": [str(f) for f in files],
                 "sha256": _sha256_of(files)})
    return image, meta


def _sha256_of(files: list[Path]) -> str:
    """sha256 of exactly the files read: each file's name, then its bytes, in name order
    (not the whole folder, which may hold other series)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def header_meta_from_dataset(ds: Any) -> dict[str, Any]:
    def get(name: str) -> Any:
        value = getattr(ds, name, None)
        if value is None or value == "":
            return None
        if isinstance(value, (int, float, str)):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    return {
        "series_instance_uid": get("SeriesInstanceUID"),
        "study_instance_uid": get("StudyInstanceUID"),
        "series_number": get("SeriesNumber"),
        "series_description": get("SeriesDescription"),
        "manufacturer": get("Manufacturer"),
        "model": get("ManufacturerModelName"),
        "field_strength_t": get("MagneticFieldStrength"),
        "sequence": get("SequenceName") or get("ScanningSequence"),
        "echo_time_ms": get("EchoTime"),
        "repetition_time_ms": get("RepetitionTime"),
        "slice_thickness_mm": get("SliceThickness"),
        "side": side_from_header(ds),
    }


def header_meta(path: Path) -> dict[str, Any]:
    ds = _read_header(path)
    return {} if ds is None else header_meta_from_dataset(ds)


_SIDE_WORDS = (
    (re.compile(r"\b(right|rt|r knee|knee r)\b", re.I), "right"),
    (re.compile(r"\b(left|lt|l knee|knee l)\b", re.I), "left"),
)


def side_from_header(ds: Any) -> str | None:
    """Knee side from (0020,0060) Laterality, (0020,0062) ImageLaterality or descriptions."""
    for tag in ("Laterality", "ImageLaterality"):
        value = str(getattr(ds, tag, "") or "").strip().upper()
        if value in ("R", "L"):
            return "right" if value == "R" else "left"
    text = " ".join(str(getattr(ds, t, "") or "") for t in
                    ("SeriesDescription", "StudyDescription", "ProtocolName", "BodyPartExamined"))
    for pattern, side in _SIDE_WORDS:
        if pattern.search(text):
            return side
    return None
