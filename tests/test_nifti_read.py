"""A NIfTI file is inflated once: the completeness check keeps the bytes it read, ITK reads
only the header, and the volume is the one ITK's own reading gives - voxels, dtype, geometry
and sha256 - for every plain NIfTI (all integer and float types, both byte orders, qform
only, sform only, extensions, a rotated grid, a real label map).  Scaled, 4D and other
files are still read by ITK itself, with the same result."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import cartiq.io.nifti as nifti
from cartiq.io.integrity import check_complete
from cartiq.io.volume import read_volume, write_volume

_ROT = np.array([[0.8529, -0.3651, 0.3731], [0.4744, 0.8627, -0.1752], [-0.2179, 0.3499,
                                                                         0.9111]])


def _affine() -> np.ndarray:
    q, _ = np.linalg.qr(_ROT)  # exactly orthonormal
    a = np.eye(4)
    a[:3, :3] = q @ np.diag([0.4, 0.5, 1.5])
    a[:3, 3] = [10.0, -20.0, 5.0]
    return a


def _read_both(path: Path, kind: str = "image", monkeypatch=None):
    """(volume as read now, whether the checked bytes were used, volume ITK reads itself)."""
    used = []
    real = nifti.voxels

    def spy(stream, info):
        out = real(stream, info)
        used.append(out is not None)
        return out

    monkeypatch.setattr(nifti, "voxels", spy)
    fast = read_volume(path, kind=kind)
    monkeypatch.setattr(nifti, "voxels", lambda stream, info: None)
    itk = read_volume(path, kind=kind)
    monkeypatch.setattr(nifti, "voxels", real)
    return fast, used == [True], itk


def _same(a, b) -> None:
    assert a.array.dtype == b.array.dtype and a.array.flags.c_contiguous
    np.testing.assert_array_equal(a.array, b.array)
    assert a.geometry == b.geometry
    assert a.meta == b.meta


def _nib(path: Path, arr: np.ndarray, *, qform=True, sform=True,
         extension: bytes | None = None) -> Path:
    import nibabel as nib

    aff = _affine()
    img = nib.Nifti1Image(arr, aff, dtype=arr.dtype)
    img.set_qform(aff if qform else None, 1 if qform else 0)
    img.set_sform(aff if sform else None, 2 if sform else 0)
    if extension is not None:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, extension))
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("dtype", ["u1", "i1", "<i2", ">i2", "u2", "i4", "u4", "i8", "u8",
                                   "<f4", ">f4", "f8"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_plain_nifti_read_once_as_itk_reads_it(tmp_path, monkeypatch, dtype, suffix):
    arr = np.random.default_rng(1).normal(60, 20, (13, 11, 9)).astype(dtype)
    path = _nib(tmp_path / f"x{suffix}", arr)
    fast, used, itk = _read_both(path, monkeypatch=monkeypatch)
    assert used
    _same(fast, itk)
    assert fast.array.dtype.isnative
    assert fast.meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("variant", ["qform only", "sform only", "extension"])
def test_header_variants(tmp_path, monkeypatch, variant):
    arr = np.arange(10 * 11 * 12, dtype=np.int16).reshape(10, 11, 12)
    path = _nib(tmp_path / "x.nii.gz", arr, qform=variant != "sform only",
                sform=variant != "qform only",
                extension=b"a comment" if variant == "extension" else None)
    fast, used, itk = _read_both(path, monkeypatch=monkeypatch)
    assert used
    _same(fast, itk)


def _patched_scaling(path: Path, arr: np.ndarray, slope: float, inter: float) -> Path:
    import nibabel as nib

    raw = bytearray(nib.Nifti1Image(arr, _affine()).to_bytes())
    raw[112:120] = struct.pack("<2f", slope, inter)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


@pytest.mark.parametrize("slope,inter,used", [(0.0, 0.0, True), (1.0, 0.0, True),
                                              (float("nan"), float("nan"), True),
                                              (2.0, 0.0, False), (1.0, 0.5, False),
                                              (0.0, 5.0, False), (float("inf"), 0.0, False)])
@pytest.mark.parametrize("dtype", ["i2", "f4"])
def test_scaled_data_are_left_to_itk(tmp_path, monkeypatch, slope, inter, used, dtype):
    arr = np.random.default_rng(2).integers(0, 100, (10, 11, 12)).astype(dtype)
    path = _patched_scaling(tmp_path / "s.nii.gz", arr, slope, inter)
    fast, was_used, itk = _read_both(path, monkeypatch=monkeypatch)
    assert was_used == used
    _same(fast, itk)


def test_4d_single_volume_is_left_to_itk(tmp_path, monkeypatch):
    arr = np.ones((10, 11, 12, 1), np.int16)
    fast, used, itk = _read_both(_nib(tmp_path / "f.nii.gz", arr), monkeypatch=monkeypatch)
    assert not used and fast.geometry.shape == (10, 11, 12)
    _same(fast, itk)


def test_real_map_and_phantom(data_mirror, tmp_path, monkeypatch):
    from cartiq.data.fetch import fetch_sample
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    lab = read_volume(fetch_sample("pymskt_dess_labels", mirror=data_mirror,
                                   cache_dir=tmp_path / "cache"), kind="labels")
    for suffix in (".nii.gz", ".nii"):
        path = write_volume(tmp_path / f"pymskt{suffix}", lab.array, lab.geometry,
                            compress=suffix.endswith("gz"))
        fast, used, itk = _read_both(path, "labels", monkeypatch=monkeypatch)
        assert used
        _same(fast, itk)
        np.testing.assert_array_equal(fast.array, lab.array)
    ph = make_phantom(PhantomSpec(fov_mm=(60.0, 60.0, 70.0), spacing_mm=(0.6, 0.6, 1.2)))
    paths = write_phantom(ph, tmp_path / "phantom")
    for key, kind in (("image", "image"), ("seg", "labels")):
        fast, used, itk = _read_both(paths[key], kind, monkeypatch=monkeypatch)
        assert used
        _same(fast, itk)


def test_sibling_of_the_same_stem_is_not_read(tmp_path, monkeypatch):
    arr = np.full((8, 9, 10), 7, np.uint8)
    named = _nib(tmp_path / "X.nii.gz", arr)
    _nib(tmp_path / "X.nii", np.zeros_like(arr))
    fast, used, itk = _read_both(named, "labels", monkeypatch=monkeypatch)
    assert used and (fast.array == 7).all()
    _same(fast, itk)


def test_kept_bytes_are_the_inflated_file(tmp_path):
    arr = np.random.default_rng(3).normal(size=(9, 8, 7)).astype(np.float32)
    path = _nib(tmp_path / "k.nii.gz", arr)
    checked = check_complete(path, keep_nifti=True)
    assert checked.nifti.tobytes() == gzip.decompress(path.read_bytes())
    assert check_complete(path).nifti is None
    shutil.copy(path, tmp_path / "copy.nii.gz")
    assert check_complete(tmp_path / "copy.nii.gz", keep_nifti=True).sha256 == checked.sha256
