"""Prove that a file just written is whole before it is renamed into place.

A write can fail without an exception reaching us: ITK's writers report a full disk or a
file-size limit (``ulimit -f``) as nothing at all and leave a short file.  Every output of
cartiq is therefore written to a temporary name, flushed to the disk, re-opened and read
back here, then renamed (:func:`cartiq.io.volume.atomic_path`):

* every file: it must not be empty, and its size must be the size written when that is
  known (CSV, JSON, VTK and text files are written from one buffer);
* ``.gz``: the stream is decompressed to its end, which checks the CRC-32 and length
  trailer of every member;
* NIfTI (``.nii``, ``.nii.gz``): the header must be readable and the data as long as the
  header describes;
* ``.json``: it must parse; ``.csv``: every row has the header's number of fields.

:func:`verify_written` raises :class:`~cartiq.errors.OutputError` naming the final path.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import zlib
from pathlib import Path

from cartiq.errors import OutputError

__all__ = ["verify_written"]

_CHUNK = 1 << 20
_NIFTI1_HEADER = 348
_NIFTI2_HEADER = 540


def verify_written(path: Path, final: Path, *, expect_size: int | None = None) -> None:
    """Check the temporary file ``path`` that will become ``final`` (named in errors)."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise OutputError("written file is empty (disk full or file-size limit?)", final)
        if expect_size is not None and size != expect_size:
            raise OutputError(f"written file has {size} bytes instead of {expect_size} "
                              "(disk full or file-size limit?)", final)
        name = final.name.lower()
        if name.endswith(".gz"):
            data = _gunzip_stream(path, final)
            if name.endswith(".nii.gz"):
                _check_nifti(data, final)
            else:
                for _ in data:
                    pass
        elif name.endswith(".nii"):
            _check_nifti(_raw_stream(path), final)
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".csv"):
            _check_csv(path, final)
    except OutputError:
        raise
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OutputError(f"written file is damaged ({_reason(exc)}; disk full or "
                          "file-size limit?)", final) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputError(f"written file does not parse ({_reason(exc)})", final) from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:160]


def _raw_stream(path: Path):
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            yield block


def _gunzip_stream(path: Path, final: Path):
    """Decompressed blocks of a (multi-member) gzip file; gzip checks CRC and length."""
    with gzip.open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            yield block


def _check_nifti(blocks, final: Path) -> None:
    """Header readable, data as long as it describes (read to the end of the stream)."""
    head, total = b"", 0
    for block in blocks:
        if len(head) < _NIFTI2_HEADER:
            head += block[:_NIFTI2_HEADER - len(head)]
        total += len(block)
    offset, need = _nifti_extent(head, final)
    if total < offset + need:
        raise OutputError(f"written NIfTI holds {total} bytes, its header describes "
                          f"{offset + need} (disk full or file-size limit?)", final)


def _nifti_extent(head: bytes, final: Path) -> tuple[int, int]:
    """(data offset, data bytes) from a NIfTI-1 or NIfTI-2 header."""
    import numpy as np

    for order in ("<", ">"):
        sizeof = np.frombuffer(head[:4], dtype=f"{order}i4")[0] if len(head) >= 4 else 0
        if sizeof == _NIFTI1_HEADER and len(head) >= _NIFTI1_HEADER:
            dim = np.frombuffer(head[40:56], dtype=f"{order}i2").astype(int)
            bitpix = int(np.frombuffer(head[72:74], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(head[108:112], dtype=f"{order}f4")[0])
            break
        if sizeof == _NIFTI2_HEADER and len(head) >= _NIFTI2_HEADER:
            dim = np.frombuffer(head[16:80], dtype=f"{order}i8").astype(int)
            bitpix = int(np.frombuffer(head[14:16], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(head[168:176], dtype=f"{order}i8")[0])
            break
    else:
        raise OutputError("written file has no readable NIfTI header", final)
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or any(d < 0 for d in dim[1:ndim + 1]):
        raise OutputError("written file has an invalid NIfTI header", final)
    return max(offset, int(sizeof)), math.prod(int(d) for d in dim[1:ndim + 1]) * bitpix // 8


def _check_csv(path: Path, final: Path) -> None:
    with open(path, encoding="utf-8", newline="") as fh:
        header = None
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row:  # a blank line (an empty table is written as one)
                continue
            if header is None:
                header = row
            elif len(row) != len(header):
                raise OutputError(f"written CSV line {n} has {len(row)} fields, the header "
                                  f"{len(header)}", final)
