"""Scan input/output and geometry.

Conventions (stated once, used everywhere):

* Arrays are indexed in ITK order ``array[i, j, k]`` (i fastest in the file), i.e. the
  transpose of ``SimpleITK.GetArrayFromImage``.
* World coordinates are DICOM/ITK **LPS** millimetres: +x patient Left, +y Posterior,
  +z Superior.  ``world = origin + direction @ (index * spacing)``, where the columns of
  ``direction`` are the world directions of the index axes.  NIfTI (RAS) is converted by
  SimpleITK on read and write; this module is the only place that touches it.
* Every image we write carries the geometry of the scan it was derived from, so it overlays
  the input in 3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cartiq.errors import InputError, OutputError

__all__ = [
    "Geometry",
    "Volume",
    "read_volume",
    "write_volume",
    "check_same_geometry",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "sha256_file",
    "is_dicom_path",
    "IMAGE_SUFFIXES",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D scan: shape, spacing (mm), origin (LPS mm), direction cosines."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3, columns = axis directions

    @property
    def matrix(self) -> np.ndarray:
        """3x3 direction matrix (columns are the world directions of i, j, k)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def affine(self) -> np.ndarray:
        """4x4 index-to-LPS affine."""
        a = np.eye(4)
        a[:3, :3] = self.matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices (N, 3) to LPS world mm (N, 3)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.affine[:3, :3].T + np.asarray(self.origin)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """LPS world mm (N, 3) to continuous indices (N, 3)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        return (xyz - np.asarray(self.origin)) @ np.linalg.inv(self.affine[:3, :3]).T

    def physical_to_world(self, pts_mm: np.ndarray) -> np.ndarray:
        """Points in grid-aligned mm (index * spacing) to LPS world mm."""
        return np.atleast_2d(pts_mm) @ self.matrix.T + np.asarray(self.origin)

    def slice_axis(self) -> int:
        """Index axis of the acquired slices: the coarsest spacing (ties: the last axis)."""
        sp = np.asarray(self.spacing)
        return int(np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-3))[-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
            "origin_mm": [round(float(s), 6) for s in self.origin],
            "direction": [round(float(s), 8) for s in self.direction],
        }

    @classmethod
    def from_sitk(cls, image: Any) -> "Geometry":
        return cls(
            shape=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(s) for s in image.GetOrigin()),
            direction=tuple(float(s) for s in image.GetDirection()),
        )

    def apply_to_sitk(self, image: Any) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


@dataclass
class Volume:
    """A 3D scan or label map with its geometry and where it came from."""

    array: np.ndarray
    geometry: Geometry
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"expected a 3D volume, got {self.array.ndim}D", self.path)
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise InputError(
                f"array shape {self.array.shape} does not match geometry {self.geometry.shape}",
                self.path,
            )


# --------------------------------------------------------------------------- reading


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_volume(
    path: str | Path,
    *,
    series: str | None = None,
    echo: int | None = None,
    kind: str = "image",
) -> Volume:
    """Read a 3D image or label map from NIfTI, NRRD, MHA/MHD or a DICOM series folder.

    Parameters
    ----------
    path : file or folder.  A folder is read as a DICOM series; a ``.dcm`` file as the
        series it belongs to (its siblings in the same folder with its SeriesInstanceUID).
    series : DICOM only: SeriesNumber, SeriesInstanceUID or a substring of
        SeriesDescription selecting one series when the folder holds several.
    echo : DICOM only: 1-based echo number for multi-echo series (default: the first).
    kind : ``"image"`` (must be finite) or ``"labels"`` (must be integer valued).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file or folder does not exist", path)
    if path.is_dir():
        from cartiq.io.dicom import read_dicom_series

        image, meta = read_dicom_series(path, series=series, echo=echo)
    elif path.suffix.lower() == ".dcm":
        from cartiq.io.dicom import read_dicom_file_series

        image, meta = read_dicom_file_series(path, echo=echo)
    else:
        from cartiq.io.integrity import check_complete

        # ITK zero-fills a cut file: prove the data are complete first (and hash them)
        checked = check_complete(path, keep_nifti=True)
        voxels = None
        if checked is not None and checked.nifti is not None:
            # NIfTI: the check inflated the file already; ITK reads only the header
            from cartiq.io.nifti import voxels as nifti_voxels

            image = _read_itk(path, header_only=True)
            voxels = nifti_voxels(checked.nifti, image)
            checked = checked._replace(nifti=None)
        if voxels is None:
            image = _read_itk(path)
        meta = {"format": _format_of(path)}
        if checked is not None:
            meta["sha256"] = checked.sha256
            if checked.nonfinite:  # counted in the stored NIfTI values (ITK reads them as 0)
                _raise_nonfinite(checked.nonfinite, path, kind)
        elif meta["format"] == "nifti":
            _check_nifti_finite(path, kind)
        if voxels is not None:  # its non-finite values were counted: there are none
            return _volume_from_array(_reversed_axes(voxels), Geometry.from_sitk(image),
                                      path, meta, kind, finite=True)
    return _volume_from_sitk(image, path, meta, kind)


def is_dicom_path(path: str | Path) -> bool:
    """Whether :func:`read_volume` reads ``path`` as a DICOM series (a folder, or a
    ``.dcm`` file and its siblings)."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".dcm"


def _read_itk(path: Path, *, header_only: bool = False) -> Any:
    """``sitk.ReadImage`` of exactly ``path`` (``header_only``: an ``ImageFileReader``
    after ``ReadImageInformation``: size, geometry and pixel type, no voxels).

    ITK's NIfTI reader resolves ``X.nii.gz`` by its stem and reads ``X.nii`` (or
    ``X.hdr/.img``) when such a file lies beside it; a NIfTI file with a sibling of the
    same stem is therefore read through a link in a private folder.
    """
    sitk = _sitk()
    name = path.name
    stem = name[:-7] if name.lower().endswith(".nii.gz") else path.stem
    isolate = _format_of(path) == "nifti" and any(
        (path.parent / (stem + ext)).exists() for ext in
        (".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz") if stem + ext != name)

    def read(file: Path) -> Any:
        if not header_only:
            return sitk.ReadImage(str(file))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.ReadImageInformation()
        return reader

    try:
        if not isolate:
            return read(path)
        with tempfile.TemporaryDirectory(prefix="cartiq-read-") as tmp:
            link = Path(tmp) / ("image" + name[len(stem):])
            try:
                link.symlink_to(path.resolve())
            except OSError:  # no symlinks here: read a copy
                import shutil

                shutil.copyfile(path, link)
            return read(link)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln), "unreadable")
        raise InputError(f"cannot read image ({detail.strip()[:160]})", path) from None


def _check_nifti_finite(path: Path, kind: str) -> None:
    """ITK's NIfTI reader turns NaN/Inf into 0 silently; look at the stored values."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return
        n = int((~np.isfinite(np.asanyarray(img.dataobj))).sum())
    except Exception:  # ITK read it; nibabel's opinion is only a second check
        return
    if n:
        _raise_nonfinite(n, path, kind)


def _raise_nonfinite(n: int, path: Path, kind: str) -> None:
    what = "label map contains {} non-finite values" if kind == "labels" else \
        "contains {} non-finite intensities"
    raise InputError(what.format(n) + " (NaN or Inf)", path)


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"),
                        (".nhdr", "nrrd"), (".mha", "metaimage"), (".mhd", "metaimage"),
                        (".dcm", "dicom")):
        if name.endswith(suffix):
            return fmt
    return "other"


def _volume_from_sitk(image: Any, path: Path, meta: dict[str, Any], kind: str) -> Volume:
    sitk = _sitk()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar "
            "3D image is needed", path)
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise InputError(f"is 4D ({size[3]} volumes); a 3D image is needed "
                             "(for multi-echo DICOM use --echo)", path)
    elif dim == 2:
        raise InputError(f"is 2D ({image.GetSize()[0]}x{image.GetSize()[1]}); a 3D image is "
                         "needed", path)
    array = _reversed_axes(sitk.GetArrayFromImage(image))
    return _volume_from_array(array, Geometry.from_sitk(image), path, meta, kind)


def _volume_from_array(array: np.ndarray, geometry: Geometry, path: Path,
                       meta: dict[str, Any], kind: str, *, finite: bool = False) -> Volume:
    """``array`` in cartiq order; ``finite``: its values are known to be finite."""
    if min(geometry.shape) < 2:
        raise InputError(f"is a single slice ({'x'.join(map(str, geometry.shape))}); a 3D "
                         "image is needed", path)
    if kind == "labels":
        array = _as_label_array(array, path)
    elif (not finite and np.issubdtype(array.dtype, np.floating)
          and not np.isfinite(array).all()):
        n = int((~np.isfinite(array)).sum())
        raise InputError(f"contains {n} non-finite intensities (NaN or Inf)", path)
    return Volume(array=array, geometry=geometry, path=path, meta=meta)


def _reversed_axes(array: np.ndarray) -> np.ndarray:
    """C-contiguous copy of a 3D ``array.transpose(2, 1, 0)`` (ITK <-> cartiq index order),
    in native byte order, made one 2D transpose per middle index: the blocks stay in the
    cache, 2-3x faster than numpy's copy of the whole transposed view."""
    out = np.empty(array.shape[::-1], dtype=array.dtype.newbyteorder("="))
    for j in range(array.shape[1]):
        out[:, j, :] = array[:, j, :].T
    return out


def _as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("label map contains non-finite values", path)
        if not np.allclose(array, np.round(array)):
            raise InputError("label map has non-integer values (is this an image?)", path)
        array = np.round(array)
    if array.min() < 0:
        raise InputError(f"label map has negative label {int(array.min())}", path)
    if array.max() > 65535:
        raise InputError(f"label map has label {int(array.max())} > 65535", path)
    return array.astype(np.uint16, copy=False)


# --------------------------------------------------------------------------- geometry


def check_same_geometry(a: Geometry, b: Geometry, path_a: Path | None, path_b: Path | None,
                        *, tol_mm: float = 1e-3, tol_dir: float = 1e-4) -> None:
    """Raise :class:`InputError` (naming ``path_b``) if two grids differ."""
    if tuple(a.shape) != tuple(b.shape):
        raise InputError(f"shape {'x'.join(map(str, b.shape))} differs from "
                         f"{'x'.join(map(str, a.shape))} of {path_a}", path_b)
    if not np.allclose(a.spacing, b.spacing, atol=tol_mm, rtol=1e-4):
        raise InputError(f"spacing {np.round(b.spacing, 4).tolist()} mm differs from "
                         f"{np.round(a.spacing, 4).tolist()} mm of {path_a}", path_b)
    tol_origin = max(tol_mm, 0.01 * float(min(a.spacing)))
    if not np.allclose(a.origin, b.origin, atol=tol_origin):
        raise InputError(f"origin {np.round(b.origin, 3).tolist()} differs from "
                         f"{np.round(a.origin, 3).tolist()} of {path_a}", path_b)
    if not np.allclose(a.direction, b.direction, atol=tol_dir):
        raise InputError(f"orientation (direction cosines) differs from {path_a}", path_b)


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(final: str | Path, *, expect_size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is flushed to the disk, read
    back and checked (:func:`cartiq.io.verify.verify_written`; ``expect_size``: the bytes
    written, when known), then renamed into place.

    A failed write - full disk, file-size limit, permission denied, a writer that left a
    short file - raises :class:`OutputError` naming ``final`` and leaves nothing behind.
    """
    final = Path(final)
    suffix = "".join(final.suffixes) or ".tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}-", suffix=suffix,
                                   dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write here ({exc.strerror or exc})", final.parent) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _commit(tmp_path, final, expect_size)
    except OSError as exc:
        _discard(tmp_path)
        raise OutputError(f"cannot write ({exc.strerror or exc})", final) from None
    except BaseException:
        _discard(tmp_path)
        raise


def _commit(tmp: Path, final: Path, expect_size: int | None) -> None:
    """fsync, verify, give the usual mode, rename into place, fsync the folder."""
    from cartiq.io.verify import verify_written

    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    verify_written(tmp, final, expect_size=expect_size)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
    os.replace(tmp, final)
    try:
        dfd = os.open(final.parent, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # the folder became unwritable: nothing more to do
        pass


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    """Write ``data`` to ``final`` through :func:`atomic_path` (size checked after the write)."""
    with atomic_path(final, expect_size=len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def write_volume(path: str | Path, array: np.ndarray, geometry: Geometry,
                 *, compress: bool = True) -> Path:
    """Write ``array`` (ITK index order) with ``geometry``, atomically and verified."""
    sitk = _sitk()
    path = Path(path)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} != geometry shape {geometry.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(_reversed_axes(array))
    geometry.apply_to_sitk(image)
    with atomic_path(path) as tmp:
        try:
            # level 1: several times faster than the default with files only ~10% larger
            sitk.WriteImage(image, str(tmp), compress, 1 if compress else -1)
        except RuntimeError as exc:  # ITK reports a failed write as a RuntimeError
            lines = str(exc).strip().splitlines()
            detail = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "")
            raise OutputError(f"cannot write ({detail.strip()[:160] or 'ITK writer failed'})",
                              path) from None
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a folder's files in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    return h.hexdigest()
