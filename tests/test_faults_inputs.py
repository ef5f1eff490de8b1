"""Fault injection, input side: every damaged or contradictory input stops `cartiq measure`
with exit code 2, one line naming the file, and no output folder marked complete.

Cut files (NIfTI, NIfTI.gz, NRRD raw/gzip, MHA), a NRRD header listing fewer slices than its
data, ``X.nii`` lying beside ``X.nii.gz``, a cut DICOM slice, an all-zero label map (in
``measure`` and in ``batch``), and a knee side that the anatomy of the real label maps
contradicts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cartiq.errors import InputError
from cartiq.io.labels import load_mapping, to_default_scheme
from cartiq.io.volume import read_volume, write_volume
from _cli import run_cartiq as _cartiq

SPL_TO_OAI = {95: 1, 83: 2, 96: 3, 84: 4, 85: 4}  # femur, fem. cart., tibia, both tib. plates


def _fails_cleanly(res, out: Path, path: Path, *needles: str) -> str:
    """Exit 2, exactly one line on stderr naming ``path``, no complete output folder."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert str(path) in lines[0], (str(path), lines[0])
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (out / "manifest.json").exists()
    return lines[0]


def _cut(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


@pytest.fixture(scope="module")
def knee(tmp_path_factory):
    """A small knee phantom (right knee): image.nii.gz + seg.nii.gz, labels in memory."""
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    d = tmp_path_factory.mktemp("knee")
    ph = make_phantom(PhantomSpec(fov_mm=(80.0, 80.0, 90.0), spacing_mm=(0.6, 0.6, 1.2),
                                  noise_sigma=0.0, bias_field=0.0))
    paths = write_phantom(ph, d)
    return paths["image"], paths["seg"], ph.labels


# ---------------------------------------------------------------------- cut files


@pytest.mark.parametrize("name,compress,needle", [
    ("seg.nii.gz", True, "gzip stream ends early"),
    ("seg.nii", False, "is truncated"),
    ("seg.nrrd", False, "is truncated"),
    ("seg.nrrd", True, "gzip stream ends early"),
    ("seg.mha", False, "is truncated"),
    ("seg.mha", True, "zlib stream ends early"),
])
def test_cut_label_map_is_refused(knee, tmp_path, name, compress, needle):
    image, _, labels = knee
    seg = tmp_path / name
    write_volume(seg, labels.array, labels.geometry, compress=compress)
    read_volume(seg, kind="labels")  # whole, it reads
    _cut(seg)
    out = tmp_path / "out"
    _fails_cleanly(_cartiq("measure", image, "--seg", seg, "-o", out), out, seg, needle)


def test_cut_image_is_refused(knee, tmp_path):
    image, seg, _ = knee
    cut = tmp_path / "image.nii.gz"
    shutil.copy(image, cut)
    _cut(cut, 0.9)
    out = tmp_path / "out"
    _fails_cleanly(_cartiq("measure", cut, "--seg", seg, "-o", out), out, cut,
                   "gzip stream ends early", "truncated")


def test_damaged_gzip_crc_is_refused(knee, tmp_path):
    _, _, labels = knee
    seg = tmp_path / "seg.nii.gz"
    write_volume(seg, labels.array, labels.geometry)
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: only the CRC (or inflate) can tell
    seg.write_bytes(bytes(data))
    with pytest.raises(InputError, match="gzip data are damaged") as info:
        read_volume(seg, kind="labels")
    assert str(seg) in str(info.value)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
@pytest.mark.parametrize("delta", [-5, +5])
def test_nrrd_header_slice_count_must_match_the_data(knee, tmp_path, encoding, delta):
    """A NRRD header listing fewer (or more) slices than its data is refused."""
    image, _, labels = knee
    seg = tmp_path / "seg.nrrd"
    write_volume(seg, labels.array, labels.geometry, compress=encoding == "gzip")
    raw = seg.read_bytes()
    end = raw.index(b"\n\n")
    header = raw[:end].decode("latin-1").splitlines()
    i = next(n for n, ln in enumerate(header) if ln.startswith("sizes:"))
    sizes = header[i].split()[1:]
    assert header[i] == "sizes: " + " ".join(sizes) and f"encoding: {encoding}" in header
    sizes[-1] = str(int(sizes[-1]) + delta)
    header[i] = "sizes: " + " ".join(sizes)
    seg.write_bytes("\n".join(header).encode("latin-1") + raw[end:])
    out = tmp_path / "out"
    res = _cartiq("measure", image, "--seg", seg, "-o", out)
    needle = "header sizes (slice count?) do not match" if delta < 0 else "truncated"
    _fails_cleanly(res, out, seg, needle)


# ---------------------------------------------------------------------- which file


def test_nii_beside_nii_gz_reads_and_hashes_the_named_file(knee, tmp_path):
    image, seg, labels = knee
    named = tmp_path / "X.nii.gz"
    shutil.copy(seg, named)
    decoy = labels.array.copy()
    decoy[decoy == 4] = 0  # X.nii: no femoral cartilage at all
    write_volume(tmp_path / "X.nii", decoy, labels.geometry, compress=False)
    out = tmp_path / "out"
    res = _cartiq("measure", image, "--seg", named, "-o", out)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["seg"]["path"] == str(named.resolve())
    assert manifest["inputs"]["seg"]["sha256"] == hashlib.sha256(named.read_bytes()).hexdigest()
    rows = (out / "measurements.csv").read_text().splitlines()
    vol = next(float(r.split(",")[3]) for r in rows
               if r.startswith("femoral_cartilage,all,volume,"))
    expected = float((labels.array == 4).sum()) * labels.geometry.voxel_volume_mm3
    assert vol == pytest.approx(expected, rel=1e-5) and vol > 1000  # the CSV rounds
    # and reading X.nii still reads X.nii
    assert not (read_volume(tmp_path / "X.nii", kind="labels").array == 4).any()


# ---------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("keep", [0.7, 0.002])  # cut in the pixel data / in the header
def test_cut_dicom_slice_error_names_the_file(data_mirror, knee, tmp_path, keep):
    _, seg, _ = knee
    series = tmp_path / "dicom"
    shutil.copytree(data_mirror / "pykneer_qdess" / "echo1", series)
    victim = sorted(series.glob("*.dcm"))[-1]  # the last slice: no gap would give it away
    victim.chmod(0o644)
    _cut(victim, keep)
    out = tmp_path / "out"
    res = _cartiq("measure", series, "--seg", seg, "-o", out)
    _fails_cleanly(res, out, victim, "DICOM file is", "truncated")


def test_dicom_sha256_covers_exactly_the_files_read(data_mirror):
    """A multi-echo folder: the hash is of the 24 files of echo 2, not of the folder."""
    import pydicom

    folder = data_mirror / "pymskt_mese_t2"
    vol = read_volume(folder, echo=2)
    files = sorted((p for p in folder.iterdir() if p.is_file() and str(
        pydicom.dcmread(p, stop_before_pixels=True).get("EchoNumbers")) == "2"),
        key=lambda p: p.name)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    assert len(files) == 24 and vol.meta["sha256"] == h.hexdigest()


# ---------------------------------------------------------------------- empty label map


def test_empty_label_map_fails_in_measure_and_in_batch(knee, tmp_path):
    image, _, labels = knee
    empty = tmp_path / "empty.nii.gz"
    write_volume(empty, np.zeros(labels.array.shape, np.uint8), labels.geometry)
    out = tmp_path / "out"
    _fails_cleanly(_cartiq("measure", image, "--seg", empty, "-o", out), out, empty,
                   "label map is empty")
    manifest = tmp_path / "trial.csv"
    manifest.write_text(f"subject_id,timepoint,image,seg,side\nS1,bl,{image},{empty},right\n")
    bout = tmp_path / "batch"
    res = _cartiq("batch", manifest, "-o", bout, "--workers", "1", "--no-progress",
                  "--no-report")
    assert res.returncode == 3, res.stderr[-2000:]
    import pandas as pd

    fail = pd.read_csv(bout / "failures.csv")
    assert fail[["subject_id", "timepoint"]].values.tolist() == [["S1", "bl"]]
    assert str(empty) in fail.error[0] and "label map is empty" in fail.error[0]
    assert not (bout / "S1" / "bl" / "manifest.json").exists()


# ---------------------------------------------------------------------- knee side


def test_phantom_wrong_side_stops_unless_overridden(knee, tmp_path):
    image, seg, _ = knee
    out = tmp_path / "out"
    line = _fails_cleanly(_cartiq("measure", image, "--seg", seg, "-o", out, "--side", "left"),
                          out, seg, "--side says left but the anatomy says right",
                          "anatomy:plates", "--side-override")
    assert "swapped" not in line
    res = _cartiq("measure", image, "--seg", seg, "-o", out, "--side", "left",
                  "--side-override")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert (m["side"], m["side_source"]) == ("left", "flag")
    assert m["side_check"]["anatomy"] == "right" and m["side_check"]["overridden"] is True


@pytest.fixture(scope="module")
def real_maps(data_mirror, tmp_path_factory):
    """pymskt DESS (RIGHT, fibula) and SPL atlas (LEFT, fibula) label maps with a blank
    image of their geometry; the SPL map also in the OAI-ZIB convention (one tibial label,
    no fibula)."""
    d = tmp_path_factory.mktemp("real")
    out = {}
    for key, rel in (("pymskt", "labels/pymskt_dess_right_label.nrrd"),
                     ("spl", "labels/spl_knee_atlas_labels.nrrd")):
        vol = read_volume(data_mirror / rel, kind="labels")
        write_volume(d / f"{key}_image.nii.gz", np.zeros(vol.array.shape, np.uint8),
                     vol.geometry)
        out[key] = (d / f"{key}_image.nii.gz", data_mirror / rel, vol)
    _, _, spl = out["spl"]
    oai = np.zeros(spl.array.shape, np.uint8)
    for src, dst in SPL_TO_OAI.items():
        oai[spl.array == src] = dst
    write_volume(d / "spl_oai.nii.gz", oai, spl.geometry)
    out["spl_oai"] = (out["spl"][0], d / "spl_oai.nii.gz", oai)
    return out


@pytest.mark.parametrize("key,labels,wrong,source", [
    ("pymskt", "pymskt_dess", "left", "anatomy:fibula"),
    ("spl", "spl_knee_atlas", "right", "anatomy:fibula"),
    ("spl_oai", "oai_zib", "right", "anatomy:bone shape"),
])
def test_real_map_wrong_side_stops(real_maps, tmp_path, key, labels, wrong, source):
    image, seg, _ = real_maps[key]
    out = tmp_path / "out"
    right = "right" if wrong == "left" else "left"
    _fails_cleanly(_cartiq("measure", image, "--seg", seg, "--labels", labels, "-o", out,
                           "--side", wrong), out, seg,
                   f"--side says {wrong} but the anatomy says {right} ({source}")


def test_oai_zib_left_knee_plates_not_exchanged(real_maps, data_mirror):
    """OAI-ZIB convention (one tibial label) of the LEFT SPL knee: the femur's shape gives
    the side, and the split matches the atlas' own medial/lateral labels."""
    _, _, spl = real_maps["spl"]
    _, _, oai = real_maps["spl_oai"]
    out, info = to_default_scheme(oai, load_mapping("oai_zib"), spl.geometry.affine)
    assert (info["side"], info["side_source"]) == ("left", "anatomy:bone shape")
    med, lat = spl.array == 85, spl.array == 84  # the atlas' medial / lateral plates
    agree = ((out == 5) & med).sum() + ((out == 6) & lat).sum()
    assert agree / (med.sum() + lat.sum()) > 0.95
    with pytest.raises(InputError, match="--side says right but the anatomy says left"):
        to_default_scheme(oai, load_mapping("oai_zib"), spl.geometry.affine, side="right")
    # one tibial label and no evidence at all (no femur, no fibula, no side): refused
    no_femur = np.where(oai == 1, 0, oai)
    with pytest.raises(InputError, match="cannot tell the knee side"):
        to_default_scheme(no_femur, load_mapping("oai_zib"), spl.geometry.affine)


def test_header_side_against_anatomy(real_maps):
    _, _, vol = real_maps["pymskt"]
    mapping, aff = load_mapping("pymskt_dess"), vol.geometry.affine
    with pytest.raises(InputError, match="DICOM header says left but the anatomy says right"):
        to_default_scheme(vol.array, mapping, aff, header_side="left")
    with pytest.raises(InputError, match="--side says right but the DICOM header says left"):
        to_default_scheme(vol.array, mapping, aff, side="right", header_side="left")
    _, info = to_default_scheme(vol.array, mapping, aff, header_side="right")
    assert (info["side"], info["side_source"]) == ("right", "header")
    # the plate labels against the fibula: swapped plates are refused
    swapped = vol.array.copy()
    swapped[vol.array == 2], swapped[vol.array == 3] = 3, 2
    with pytest.raises(InputError, match="swapped plate labels"):
        to_default_scheme(swapped, mapping, aff)


@pytest.mark.parametrize("encoding", ["ascii", "bzip2", "raw-byte-skip-end"])
def test_other_nrrd_encodings_cut_short(tmp_path, encoding):
    """Hand-written NRRD files in the encodings ITK does not write: whole ones pass, ones
    missing their last values are refused."""
    import bz2

    from cartiq.io.integrity import check_complete

    values = np.arange(24, dtype="<i2")
    head = "NRRD0004\ntype: short\ndimension: 3\nsizes: 2 3 4\nendian: little\n"

    def nrrd(data: np.ndarray) -> bytes:
        if encoding == "ascii":
            return (head + "encoding: ascii\n\n" + " ".join(map(str, data)) + "\n").encode()
        if encoding == "bzip2":
            return (head + "encoding: bzip2\n\n").encode() + bz2.compress(data.tobytes())
        return (head + "encoding: raw\nbyte skip: -1\n\n").encode() + b"pad" + data.tobytes()

    whole, cut = tmp_path / "whole.nrrd", tmp_path / "cut.nrrd"
    whole.write_bytes(nrrd(values))
    cut.write_bytes(nrrd(values[:20]))
    assert check_complete(whole).sha256 == hashlib.sha256(whole.read_bytes()).hexdigest()
    with pytest.raises(InputError, match=r"is truncated: 4[03] of the 48 bytes") as info:
        check_complete(cut)
    assert str(cut) in str(info.value)
