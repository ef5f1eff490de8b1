"""NIfTI voxel data from the bytes the completeness check already read and inflated.

:func:`cartiq.io.integrity.check_complete` reads a ``.nii``/``.nii.gz`` file to its end
(inflating it, checking its CRC and byte count); reading it again with ITK inflated it a
second time.  Here ITK reads only the header (``ReadImageInformation``: the geometry, with
ITK's own qform/sform and RAS-to-LPS handling, stays exactly ITK's) and the voxel array is
taken from the checked bytes.

Only the plain case is taken this way: a NIfTI-1/-2 single file, 3D, one scalar of a plain
integer or float type whose ITK pixel type is that same type, no intensity scaling.  For
anything else :func:`voxels` returns ``None`` and the file is read by ITK as before.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

__all__ = ["NiftiHeader", "byte_order", "voxels"]

# NIfTI datatype code -> (numpy type, SimpleITK pixel type name)
_PLAIN = {2: ("u1", "sitkUInt8"), 256: ("i1", "sitkInt8"), 4: ("i2", "sitkInt16"),
          512: ("u2", "sitkUInt16"), 8: ("i4", "sitkInt32"), 768: ("u4", "sitkUInt32"),
          1024: ("i8", "sitkInt64"), 1280: ("u8", "sitkUInt64"), 16: ("f4", "sitkFloat32"),
          64: ("f8", "sitkFloat64")}
_MAGIC = {348: (b"n+1\0",), 540: (b"n+2\0\r\n\x1a\n",)}


def byte_order(first: bytes) -> tuple[str, int]:
    """(struct byte-order prefix, sizeof_hdr) of a NIfTI header: little-endian when its
    first four bytes read 348 or 540 that way, else big-endian."""
    end = "<" if struct.unpack("<i", first[:4])[0] in (348, 540) else ">"
    return end, struct.unpack(end + "i", first[:4])[0]


class NiftiHeader:
    """The fields of a NIfTI-1/-2 header that say where and how the voxels are stored
    (:meth:`parse`; also read by :mod:`cartiq.io.integrity`)."""

    def __init__(self, sizeof: int, end: str, magic: bytes, dims: tuple[int, ...],
                 datatype: int, bitpix: int, offset: float, slope: float,
                 inter: float) -> None:
        self.sizeof, self.end, self.magic, self.dims = sizeof, end, magic, dims
        self.datatype, self.bitpix, self.offset = datatype, bitpix, offset
        self.slope, self.inter = slope, inter

    @classmethod
    def parse(cls, first: bytes) -> "NiftiHeader | None":
        """The header at the start of ``first``; None when it is too short or its
        ``sizeof_hdr`` is neither 348 (NIfTI-1) nor 540 (NIfTI-2), in either byte order."""
        if len(first) < 348:
            return None
        end, sizeof = byte_order(first)
        if sizeof == 348:
            offset, slope, inter = struct.unpack(end + "3f", first[108:120])
            return cls(sizeof, end, first[344:348], struct.unpack(end + "8h", first[40:56]),
                       *struct.unpack(end + "2h", first[70:74]), offset, slope, inter)
        if sizeof == 540 and len(first) >= 540:
            datatype, bitpix = struct.unpack(end + "2h", first[12:16])
            offset = struct.unpack(end + "q", first[168:176])[0]
            slope, inter = struct.unpack(end + "2d", first[176:192])
            return cls(sizeof, end, first[4:12], struct.unpack(end + "8q", first[16:80]),
                       datatype, bitpix, offset, slope, inter)
        return None

    def plain_dtype(self) -> np.dtype | None:
        """The stored voxel type if the stored values are the values ITK gives, else None."""
        if self.magic not in _MAGIC.get(self.sizeof, ()) or self.datatype not in _PLAIN:
            return None
        dtype = np.dtype(self.end + _PLAIN[self.datatype][0])
        unscaled = (self.slope in (0.0, 1.0) or np.isnan(self.slope)) and \
            (self.inter == 0.0 or np.isnan(self.inter))
        if self.bitpix != 8 * dtype.itemsize or not unscaled:
            return None
        if not np.isfinite(self.offset) or self.offset != int(self.offset) \
                or int(self.offset) < self.sizeof + 4:
            return None
        return dtype


def voxels(stream: np.ndarray, info: Any) -> np.ndarray | None:
    """The voxel array in ``sitk.GetArrayFromImage`` order (k, j, i) and native byte order,
    read from ``stream`` (the whole decompressed file, checked complete), or ``None`` when
    ITK must read the file itself.

    ``info``: a ``SimpleITK.ImageFileReader`` of the same file after
    ``ReadImageInformation``; its size, dimension, components and pixel type must agree
    with the header.
    """
    import SimpleITK as sitk

    head = NiftiHeader.parse(stream[:540].tobytes())
    dtype = None if head is None else head.plain_dtype()
    if dtype is None:
        return None
    size = tuple(int(s) for s in info.GetSize())
    if (info.GetDimension() != 3 or head.dims[0] != 3 or info.GetNumberOfComponents() != 1
            or tuple(head.dims[1:4]) != size
            or info.GetPixelID() != getattr(sitk, _PLAIN[head.datatype][1])):
        return None
    offset = int(head.offset)
    n = size[0] * size[1] * size[2]
    if stream.size != offset + n * dtype.itemsize:
        return None
    return stream[offset:].view(dtype).reshape(size[::-1])
