"""Prove that an image file is complete before it is read.

ITK reads a cut NIfTI, NRRD or MetaImage file without complaint and fills the missing voxels
with zeros; a label map cut to 60% then reports 60% of the cartilage with QC ``pass``.  This
module reads each file once, to its end, and compares what is there with what its header
describes:

* uncompressed data: the byte count must equal ``product(sizes) x bytes per voxel`` after
  the header offset (NIfTI ``vox_offset``, NRRD/MetaImage header or byte skip) - more data
  than the header describes (a NRRD listing fewer slices than it holds) is an error too;
* gzip (``.nii.gz``, NRRD ``encoding: gzip``) and zlib (MetaImage ``CompressedData``):
  the stream is decompressed to its end, which checks its CRC/Adler-32 and length trailer,
  and the decompressed byte count is compared with the header.

:func:`check_complete` returns the sha256 of the file that was read (the header file for a
detached NRRD/MHD), so provenance hashes exactly those bytes.  Asked to (``keep_nifti``), it
also keeps the bytes of a NIfTI file as read (decompressed), so that the reader need not read
and inflate the file a second time (:mod:`cartiq.io.nifti`).  Errors are
:class:`~cartiq.errors.InputError` naming the file.
"""

from __future__ import annotations

import bz2
import hashlib
import re
import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from cartiq.errors import InputError

__all__ = ["check_complete", "Checked"]

_CHUNK = 1 << 20
_MAX_OUT = 1 << 24  # bound the memory of one decompression step

_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t", "char"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t",
        "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
        "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int",
        "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
        "uint64", "uint64_t", "double"),
}
_NRRD_BYTES = {name: n for n, names in _NRRD_TYPES.items() for name in names}
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_ASCII_CHAR": 1, "MET_SHORT": 2,
              "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


class Checked(NamedTuple):
    """What reading a file to its end found: its sha256, (NIfTI float data) the number of
    non-finite voxel values and (NIfTI, when asked for) the file's bytes, decompressed:
    header, extensions and exactly the voxel data the header describes."""

    sha256: str
    nonfinite: int = 0
    nifti: np.ndarray | None = None  # uint8


def check_complete(path: Path, *, keep_nifti: bool = False) -> Checked | None:
    """Check that ``path`` holds all the voxel data its header describes.

    Returns the file's sha256 and, for NIfTI float data, the count of NaN/Inf values
    (``None`` for formats this module does not know, which are left to the reader);
    ``keep_nifti``: a NIfTI file's decompressed bytes too (``Checked.nifti``).
    Raises :class:`InputError` naming the file otherwise.
    """
    name = path.name.lower()
    try:
        if name.endswith(".nii.gz"):
            return _check_nifti(path, gz=True, keep=keep_nifti)
        if name.endswith(".nii"):
            return _check_nifti(path, gz=False, keep=keep_nifti)
        if name.endswith((".nrrd", ".nhdr")):
            return _check_nrrd(path)
        if name.endswith((".mha", ".mhd")):
            return _check_metaimage(path)
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror or exc})", path) from None
    return None


# ------------------------------------------------------------------------- streaming


class _Hashing:
    """Read a file in chunks from ``start``, hashing every byte of the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha = hashlib.sha256()
        self.size = path.stat().st_size

    def read_head(self, n: int) -> bytes:
        with open(self.path, "rb") as fh:
            return fh.read(n)

    def chunks(self, start: int = 0):
        """Yield the file's bytes from offset ``start`` (all bytes are hashed)."""
        with open(self.path, "rb") as fh:
            pos = 0
            while True:
                block = fh.read(_CHUNK)
                if not block:
                    return
                self.sha.update(block)
                if pos + len(block) > start:
                    yield block[max(start - pos, 0):]
                pos += len(block)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def _inflated_length(chunks, path: Path, *, what: str,
                     new: Callable[[], object] = lambda: zlib.decompressobj(47),
                     sink: Callable[[bytes], None] | None = None) -> int:
    """Decompress a gzip/zlib/bzip2 stream to its end; return the decompressed byte count.

    Every decompressed piece is passed to ``sink`` in order.  Concatenated gzip members are
    followed; a bad CRC, trailing garbage or a stream that stops before its end marker is an
    :class:`InputError`.
    """
    d = new()
    bounded = hasattr(d, "unconsumed_tail")  # zlib: bound each step's output
    total = 0
    try:
        for block in chunks:
            data = block
            while data:
                if d.eof:
                    if not data.strip(b"\0"):  # zero padding after the last member
                        break
                    d = new()
                out = d.decompress(data, _MAX_OUT) if bounded else d.decompress(data)
                if sink is not None and out:
                    sink(out)
                total += len(out)
                data = d.unused_data if d.eof else (d.unconsumed_tail if bounded else b"")
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        detail = str(exc).strip()[:120]
        if "header" in detail and total == 0:
            raise InputError(f"cannot read image: not {what}-compressed data ({detail})",
                             path) from None
        raise InputError(f"cannot read image: its {what} data are damaged ({detail}): a "
                         "corrupt or partly copied file", path) from None
    if not d.eof:
        raise InputError(f"{what} stream ends early after {total:,} bytes: the file is "
                         "truncated (partly copied or downloaded?)", path)
    return total


def _compare(path: Path, have: int, need: int, shape: str, *, at_least: bool = False) -> None:
    if have < need:
        pct = 100.0 * have / need if need else 0.0
        raise InputError(f"is truncated: {have:,} of the {need:,} bytes of voxel data its "
                         f"header describes ({shape}) are present ({pct:.0f}%)", path)
    if have > need and not at_least:
        raise InputError(f"holds {have:,} bytes of voxel data but its header describes "
                         f"{need:,} ({shape}): header sizes (slice count?) do not match the "
                         "data", path)


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


# ------------------------------------------------------------------------- NIfTI


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point data
_DEFLATE_MAX_RATIO = 1032  # a deflate stream inflates to at most ~1032 times its size


def _nifti_header(first: bytes, path: Path) -> tuple[int, int, str, np.dtype | None]:
    """(vox_offset, data bytes, shape text, float dtype or None) from a NIfTI-1/-2 header."""
    from cartiq.io.nifti import NiftiHeader, byte_order

    if len(first) < 348:
        raise InputError(f"is truncated: {len(first)} bytes, shorter than a NIfTI header",
                         path)
    head = NiftiHeader.parse(first)
    if head is None:
        raise InputError(f"not a valid NIfTI header (sizeof_hdr {byte_order(first)[1]})",
                         path)
    sizeof, end, dims, datatype, bitpix = (head.sizeof, head.end, head.dims, head.datatype,
                                           head.bitpix)
    offset = int(head.offset)
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or min(dims[1:ndim + 1]) < 1:
        raise InputError(f"not a valid NIfTI header (dim {list(dims[:ndim + 1])}, bitpix "
                         f"{bitpix})", path)
    shape = dims[1:ndim + 1]
    dtype = np.dtype(end + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
    return (max(offset, sizeof), _prod(shape) * bitpix // 8,
            "x".join(map(str, shape)) + f", {bitpix} bit", dtype)


class _NiftiScan:
    """Consumes a NIfTI byte stream in order: parses the header, then counts non-finite
    values of float data (ITK's reader turns NaN/Inf into 0 without a word).

    ``keep_limit``: keep the first ``vox_offset + data bytes`` of the stream (``kept``) when
    the header's size is at most this many bytes (a larger one cannot be complete)."""

    def __init__(self, path: Path, keep_limit: int | None = None) -> None:
        self.path = path
        self.header: tuple[int, int, str, np.dtype | None] | None = None
        self.buf = b""
        self.pos = 0  # stream offset of the next piece
        self.rest = b""
        self.nonfinite = 0
        self.keep_limit = keep_limit
        self.kept: np.ndarray | None = None

    def __call__(self, piece: bytes) -> None:
        if self.header is None:
            self.buf += piece
            if len(self.buf) < 540 and not (len(self.buf) >= 348 and self.buf[:4] in (
                    struct.pack("<i", 348), struct.pack(">i", 348))):
                return
            self.header = _nifti_header(self.buf, self.path)
            piece, self.buf = self.buf, b""
            self._start_keeping()
        offset, need, _, dtype = self.header
        if self.kept is not None:
            self._keep(piece)
        lo, hi = max(offset - self.pos, 0), min(offset + need - self.pos, len(piece))
        self.pos += len(piece)
        if dtype is None or hi <= lo:
            return
        data = self.rest + piece[lo:hi] if self.rest else memoryview(piece)[lo:hi]
        n = len(data) - len(data) % dtype.itemsize
        values = np.frombuffer(data[:n], dtype=dtype)
        self.nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.rest = bytes(data[n:])

    def _start_keeping(self) -> None:
        offset, need = self.header[:2]
        if self.keep_limit is not None and offset + need <= self.keep_limit:
            self.kept = np.empty(offset + need, np.uint8)  # pages are touched as filled

    def _keep(self, piece) -> None:
        n = min(len(piece), self.kept.size - self.pos)
        if n > 0:
            self.kept[self.pos:self.pos + n] = np.frombuffer(piece, np.uint8, n)

    def finish(self) -> tuple[int, int, str, np.dtype | None]:
        if self.header is None:
            self.header = _nifti_header(self.buf, self.path)
        return self.header


def _check_nifti(path: Path, *, gz: bool, keep: bool = False) -> Checked:
    f = _Hashing(path)
    limit = f.size * (_DEFLATE_MAX_RATIO if gz else 1) + (1 << 16) if keep else None
    scan = _NiftiScan(path, keep_limit=limit)
    if gz:
        total = _inflated_length(f.chunks(), path, what="gzip",
                                 new=lambda: zlib.decompressobj(31), sink=scan)
    else:
        total = 0
        for block in f.chunks():
            scan(block)
            total += len(block)
    offset, need, shape, _ = scan.finish()
    _compare(path, total - offset, need, shape)
    return Checked(f.hexdigest(), scan.nonfinite, scan.kept)


# ------------------------------------------------------------------------- NRRD


def _text_header(path: Path, *, stop: Callable[[str], bool]) -> tuple[list[str], int]:
    """Header lines up to (and excluding) the line where ``stop`` is true; data offset."""
    lines: list[str] = []
    with open(path, "rb") as fh:
        while True:
            raw = fh.readline(1 << 16)
            if not raw:
                return lines, fh.tell()
            line = raw.decode("latin-1").rstrip("\r\n")
            if stop(line):
                if line.strip():
                    lines.append(line)
                return lines, fh.tell()
            lines.append(line)
            if len(lines) > 10000:
                raise InputError("header has no end (not a NRRD/MetaImage file?)", path)


def _check_nrrd(path: Path) -> Checked:
    lines, data_start = _text_header(path, stop=lambda ln: not ln.strip())
    if not lines or not lines[0].startswith("NRRD"):
        raise InputError("not a NRRD file (no NRRD magic line)", path)
    fields: dict[str, str] = {}
    listed: list[str] | None = None  # file names after "data file: LIST"
    for line in lines[1:]:
        if listed is not None:
            listed.append(line.strip())
            continue
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if sep:
            key = key.strip().lower().replace("datafile", "data file")
            fields[key] = value.strip()
            if key == "data file" and value.split()[:1] == ["LIST"]:
                listed = []
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
        type_name = " ".join(fields["type"].lower().split())
        nbytes = int(fields["block size"]) if type_name == "block" else _NRRD_BYTES[type_name]
    except (KeyError, ValueError) as exc:
        raise InputError(f"NRRD header lacks a valid field ({exc})", path) from None
    skips = (int(fields.get("line skip", fields.get("lineskip", "0")) or 0),
             int(fields.get("byte skip", fields.get("byteskip", "0")) or 0))
    encoding = fields.get("encoding", "raw").lower()
    shape = "x".join(map(str, sizes)) + f" {type_name}"
    n_values = _prod(sizes)
    f = _Hashing(path)
    if "data file" not in fields:
        _check_nrrd_data(f, data_start, n_values, nbytes, shape, encoding, skips)
        return Checked(f.hexdigest())
    files = _nrrd_data_files(fields["data file"], listed or [], path)
    for _ in f.chunks():  # hash the header file itself
        pass
    for i, data in enumerate(files):
        if not data.is_file():
            raise InputError(f"its data file {data.name} does not exist", path)
        part = shape + (f", data file {i + 1} of {len(files)}" if len(files) > 1 else "")
        _check_nrrd_data(_Hashing(data), 0, n_values // len(files), nbytes, part, encoding,
                         skips)
    return Checked(f.hexdigest())


def _nrrd_data_files(datafile: str, listed: list[str], path: Path) -> list[Path]:
    base = path.parent
    parts = datafile.split()
    if parts and parts[0] == "LIST":
        return [base / name for name in listed if name]
    if len(parts) >= 4 and "%" in parts[0]:
        try:
            fmt, lo, hi, step = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
            names = [fmt % i for i in range(lo, hi + (1 if step > 0 else -1), step)]
        except (ValueError, TypeError):
            raise InputError(f"invalid NRRD 'data file' field {datafile!r}", path) from None
        return [base / n for n in names]
    return [base / datafile]


def _skip_lines(chunks, n: int):
    """Drop the first ``n`` lines of a byte stream."""
    for block in chunks:
        while n and block:
            i = block.find(b"\n")
            block = b"" if i < 0 else block[i + 1:]
            n -= 0 if i < 0 else 1
        if block:
            yield block


def _check_nrrd_data(f: _Hashing, start: int, n_values: int, nbytes: int, shape: str,
                     encoding: str, skips: tuple[int, int]) -> None:
    path, (line_skip, byte_skip) = f.path, skips
    need = n_values * nbytes
    chunks = f.chunks(start)
    if line_skip:
        chunks = _skip_lines(chunks, line_skip)
    if encoding == "raw":
        have = sum(len(b) for b in chunks)
        if byte_skip == -1:  # the data are the last bytes of the file
            _compare(path, have, need, shape, at_least=True)
        else:
            _compare(path, have - byte_skip, need, shape)
    elif encoding in ("gzip", "gz", "bzip2", "bz2"):
        if encoding.startswith("bz"):
            have = _inflated_length(chunks, path, what="bzip2", new=bz2.BZ2Decompressor)
        else:
            have = _inflated_length(chunks, path, what="gzip")
        _compare(path, have - max(byte_skip, 0), need, shape)
    elif encoding in ("ascii", "text", "txt"):
        values = sum(len(b.split()) for b in _whole_tokens(chunks))
        _compare(path, values * nbytes, need, shape + " as text")
    elif encoding == "hex":
        digits = sum(len(re.sub(rb"[^0-9a-fA-F]", b"", b)) for b in chunks)
        _compare(path, digits // 2, need, shape + " as hex")
    else:
        raise InputError(f"NRRD encoding {encoding!r} is not supported", path)


def _whole_tokens(chunks):
    """Re-block a byte stream at whitespace so no token is split across blocks."""
    rest = b""
    for block in chunks:
        block = rest + block
        cut = max(block.rfind(b" "), block.rfind(b"\n"), block.rfind(b"\t"))
        rest, block = (block[cut + 1:], block[:cut + 1]) if cut >= 0 else (block, b"")
        yield block
    yield rest


# ------------------------------------------------------------------------- MetaImage


def _check_metaimage(path: Path) -> Checked:
    lines, data_start = _text_header(
        path, stop=lambda ln: ln.split("=")[0].strip().lower() == "elementdatafile")
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    try:
        dims = [int(s) for s in fields["dimsize"].split()]
        nbytes = _MET_BYTES[fields["elementtype"].upper()]
        channels = int(fields.get("elementnumberofchannels", "1"))
        datafile = fields["elementdatafile"]
    except (KeyError, ValueError) as exc:
        raise InputError(f"MetaImage header lacks a valid field ({exc})", path) from None
    need = _prod(dims) * nbytes * channels
    shape = "x".join(map(str, dims)) + f" {fields['elementtype']}"
    compressed = fields.get("compresseddata", "false").lower() == "true"
    header_size = int(fields.get("headersize", "0") or 0)
    f = _Hashing(path)
    if datafile.upper() == "LOCAL":
        target, start = f, data_start
    else:
        if datafile.split()[0].upper() == "LIST" or "%" in datafile:
            for _ in f.chunks():  # multi-file MetaImage: left to the reader
                pass
            return Checked(f.hexdigest())
        data = path.parent / datafile
        if not data.is_file():
            raise InputError(f"its data file {datafile} does not exist", path)
        for _ in f.chunks():
            pass
        target, start = _Hashing(data), 0
    where = target.path  # errors name the file whose data are wrong
    if compressed:
        have = _inflated_length(target.chunks(start), where, what="zlib")
        _compare(where, have, need, shape)
    else:
        have = sum(len(b) for b in target.chunks(start))
        if header_size == -1:
            _compare(where, have, need, shape, at_least=True)
        else:
            _compare(where, have - header_size, need, shape)
    return Checked(f.hexdigest())
