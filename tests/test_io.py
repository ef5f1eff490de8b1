"""Scan I/O on the real public samples and on bad input (pipeline/io.py, pipeline/dicom.py).

Real DICOM/NRRD files come through the fetch step from the local mirror (skipped without
one).  DICOM geometry is checked against the headers read with pydicom, pixel values
against pydicom's pixel arrays, file formats by exact round trips, re-orientation by world
coordinates of the same content.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cartiq.io.dicom import list_series
from cartiq.errors import InputError
from cartiq.data.fetch import fetch_sample
from cartiq.io.volume import Geometry, check_same_geometry, read_volume, write_volume


@pytest.fixture(scope="module")
def sample(data_mirror, tmp_path_factory):
    cache = tmp_path_factory.mktemp("samples")
    return lambda name: fetch_sample(name, mirror=data_mirror, cache_dir=cache)


@pytest.fixture(scope="module")
def qdess(sample):
    folder = sample("pykneer_qdess")
    return folder, read_volume(folder), read_volume(folder, echo=2)


@pytest.fixture(scope="module")
def pymskt_labels(sample):
    return read_volume(sample("pymskt_dess_labels"), kind="labels")


def _check_against_headers(vol, slices=(0, None, -1)):
    """World position of voxels and pixel values agree with the DICOM files, per slice."""
    files = vol.meta["files"]
    n = len(files)
    for k in slices:
        k = n // 2 if k is None else k % n
        ds = pydicom.dcmread(files[k])
        ipp = np.asarray(ds.ImagePositionPatient, float)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dr, dc = (float(x) for x in ds.PixelSpacing)  # row spacing, column spacing
        for i, j in ((0, 0), (5, 7), (vol.array.shape[0] - 1, 3)):
            expect = ipp + i * dc * iop[:3] + j * dr * iop[3:]
            np.testing.assert_allclose(vol.geometry.index_to_world([i, j, k])[0], expect,
                                       atol=2e-3)
        pix = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1) or 1) \
            + float(ds.get("RescaleIntercept", 0) or 0)
        np.testing.assert_array_equal(vol.array[:, :, k], pix.T)


# --------------------------------------------------------------------------- DICOM


def test_qdess_parent_folder_gives_echo1_and_echo2_on_request(qdess):
    folder, e1, e2 = qdess
    series = list_series(folder)
    assert len(series) == 1 and series[0].number == "5"
    assert len(series[0].uids) == 2  # two SeriesInstanceUIDs, one SeriesNumber
    assert {k: len(v) for k, v in series[0].echoes.items()} == {1: 80, 2: 80}
    for vol, echo, te in ((e1, 1, 7.48), (e2, 2, 42.52)):
        assert vol.geometry.shape == (512, 512, 80)
        np.testing.assert_allclose(vol.geometry.spacing, (0.3125, 0.3125, 1.5), atol=1e-4)
        assert vol.meta["echo"] == echo and vol.meta["n_echoes"] == 2
        assert vol.meta["echo_time_ms"] == pytest.approx(te)
        assert all(f"/echo{echo}/" in f for f in vol.meta["files"])
        assert vol.array.dtype == np.int16
        _check_against_headers(vol)
    assert e1.geometry == e2.geometry
    assert e1.array.mean() > 1.5 * e2.array.mean()  # the S+ echo is the brighter one


def test_dicom_file_reads_its_own_series_and_echo(qdess):
    folder, _, e2 = qdess
    one = sorted((folder / "echo2").iterdir())[10]
    vol = read_volume(one)
    assert vol.meta["echo"] == 2 and vol.geometry == e2.geometry
    np.testing.assert_array_equal(vol.array, e2.array)


def test_mese_default_echo1_and_echo3(sample):
    folder = sample("pymskt_mese_t2")
    e1 = read_volume(folder)
    e3 = read_volume(folder, echo=3)
    for vol, echo, te in ((e1, 1, 6.312), (e3, 3, 18.936)):
        assert vol.geometry.shape == (256, 256, 24)
        np.testing.assert_allclose(vol.geometry.spacing, (0.625, 0.625, 4.0), atol=1e-4)
        assert vol.meta["echo"] == echo and vol.meta["n_echoes"] == 8
        assert vol.meta["echo_time_ms"] == pytest.approx(te)
        _check_against_headers(vol)
    # oblique: no index axis is aligned with a world axis
    assert np.abs(e1.geometry.matrix).max(axis=0).max() < 0.9999
    assert e1.geometry == e3.geometry
    assert e1.array.astype(float).mean() > e3.array.astype(float).mean()  # T2 decay
    with pytest.raises(InputError, match=r"echoes \[1, 2, 3, 4, 5, 6, 7, 8\]; --echo 9"):
        read_volume(folder, echo=9)


def _link_all(src: Path, dst: Path, names=None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if names is None or f.name in names:
            os.symlink(f.resolve(), dst / f.name)


def test_series_selection_in_a_mixed_folder(sample, tmp_path):
    qd, mese = sample("pykneer_qdess"), sample("pymskt_mese_t2")
    mixed = tmp_path / "mixed"
    _link_all(qd / "echo1", mixed / "dess")
    # first-echo slices of the MESE: files 1, 9, 17, ... (8 echoes per slice position)
    mese_e1 = [f.name for f in sorted(mese.iterdir())
               if pydicom.dcmread(f, stop_before_pixels=True).EchoNumbers == 1]
    assert len(mese_e1) == 24
    _link_all(mese, mixed / "t2", names=set(mese_e1))
    with pytest.raises(InputError, match="several series.*5 'Sag DESS.*8 ''") as info:
        read_volume(mixed)
    assert str(mixed) in str(info.value)
    t2 = read_volume(mixed, series="8")
    assert t2.geometry.shape == (256, 256, 24) and t2.meta["series_number"] == 8
    dess = read_volume(mixed, series="sag dess")  # description substring, any case
    assert dess.geometry.shape == (512, 512, 80) and dess.meta["series_number"] == 5
    uid = str(pydicom.dcmread(next((mixed / "t2").iterdir())).SeriesInstanceUID)
    assert read_volume(mixed, series=uid).geometry == t2.geometry
    with pytest.raises(InputError, match="no series matches --series 'knee'"):
        read_volume(mixed, series="knee")


def test_exact_series_number_beats_description_substring(sample, tmp_path):
    """'--series 5' picks series 5 even when another description contains a '5'."""
    qd, mese = sample("pykneer_qdess"), sample("pymskt_mese_t2")
    folder = tmp_path / "two"
    _link_all(qd / "echo1", folder / "dess")
    (folder / "t2").mkdir()
    files = sorted(mese.iterdir())[:24]  # 3 slice positions x 8 echoes
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = "T2 map 5 mm"
        ds.save_as(folder / "t2" / f.name)
    assert read_volume(folder, series="5").geometry.shape == (512, 512, 80)
    t2 = read_volume(folder, series="t2 map", echo=2)
    assert t2.geometry.shape == (256, 256, 3) and t2.meta["echo"] == 2


def test_missing_slice_is_rejected(sample, tmp_path):
    folder = sample("pymskt_mese_t2")
    names = sorted(f.name for f in folder.iterdir())
    names.remove("E3655S8I081.MR.dcm")  # one echo-1 slice in the middle of the stack
    gap = tmp_path / "gap"
    _link_all(folder, gap, names=set(names))
    with pytest.raises(InputError, match="not uniform.*missing slices"):
        read_volume(gap)
    # a hidden copy (macOS resource fork, partial download) is not taken for the slice
    shutil.copyfile(folder / "E3655S8I081.MR.dcm", gap / "._E3655S8I081.MR.dcm")
    with pytest.raises(InputError, match="not uniform.*missing slices"):
        read_volume(gap)
    assert len(read_volume(gap, echo=2).meta["files"]) == 24  # echo 2 is complete


def test_single_2d_dicom_slice_is_a_clear_error(sample):
    path = sample("dicom_single")
    for p in (path, path.parent):
        with pytest.raises(InputError, match="is 2D.*single slice") as info:
            read_volume(p)
        assert str(p) in str(info.value)


# --------------------------------------------------------------------------- label maps


def test_nrrd_label_maps(sample, pymskt_labels):
    v = pymskt_labels
    assert v.geometry.shape == (384, 384, 160) and v.array.dtype == np.uint16
    np.testing.assert_allclose(v.geometry.spacing, (0.36458333, 0.36458333, 0.7), atol=1e-6)
    assert sorted(np.unique(v.array)) == list(range(11))
    m = v.geometry.matrix
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)
    # oblique sagittal: i and k are rotated by 5 degrees about the superior axis
    for axis in (0, 2):
        assert np.degrees(np.arccos(np.abs(m[:, axis]).max())) == pytest.approx(5.0, abs=0.01)
    spl = read_volume(sample("spl_knee_atlas_labels"), kind="labels")
    assert spl.geometry.shape == (512, 512, 119)
    np.testing.assert_allclose(spl.geometry.spacing, (0.27734, 0.27734, 1.0), atol=1e-5)
    assert {81, 82, 83, 84, 85, 86, 95, 96, 97, 98} <= set(np.unique(spl.array).tolist())
    assert len(np.unique(spl.array)) == 50


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_round_trip_keeps_exact_geometry(pymskt_labels, tmp_path, suffix):
    v = pymskt_labels
    sub = v.array[100:260, 80:300, 20:140]  # crop: an origin that is not the file's
    origin = v.geometry.index_to_world([100, 80, 20])[0]
    # a left-handed grid (det -1) as well as the file's own (det +1)
    for flip in (1.0, -1.0):
        direction = v.geometry.matrix.copy()
        direction[:, 2] *= flip
        g = Geometry(shape=sub.shape, spacing=v.geometry.spacing, origin=tuple(origin),
                     direction=tuple(direction.ravel()))
        out = write_volume(tmp_path / f"lab{int(flip)}{suffix}", sub, g)
        back = read_volume(out, kind="labels")
        np.testing.assert_array_equal(back.array, sub)
        assert back.geometry.shape == g.shape
        np.testing.assert_allclose(back.geometry.spacing, g.spacing, rtol=1e-6)
        np.testing.assert_allclose(back.geometry.origin, g.origin, atol=1e-4)
        np.testing.assert_allclose(back.geometry.matrix, g.matrix, atol=1e-6)
        check_same_geometry(g, back.geometry, None, out)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _world_centroids(vol) -> dict[int, tuple[int, np.ndarray]]:
    """Voxel count and world (LPS mm) centroid of every non-zero label."""
    flat = np.flatnonzero(vol.array)
    values = vol.array.ravel()[flat]
    ijk = np.stack(np.unravel_index(flat, vol.array.shape), axis=1).astype(float)
    counts = np.bincount(values)
    out = {}
    for value in np.flatnonzero(counts):
        sel = values == value
        out[int(value)] = (int(counts[value]), vol.geometry.index_to_world(ijk[sel].mean(0))[0])
    return out


def test_reoriented_storage_gives_same_world_content(sample, pymskt_labels, tmp_path):
    import SimpleITK as sitk

    from cartiq.io.orient import reorient

    ref = _world_centroids(pymskt_labels)
    assert len(ref) == 10
    # every label lies in this crop (ITK x, y, z = our i, j, k); slicing keeps the geometry
    image = sitk.ReadImage(str(sample("pymskt_dess_labels")))[50:305, :, 30:155]
    permuted = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    variants = {"permute_flip.nii.gz": permuted,
                "ras.nrrd": sitk.DICOMOrient(image, "RAS"),
                "ail.mha": sitk.DICOMOrient(image, "AIL")}
    for name, img in variants.items():
        sitk.WriteImage(img, str(tmp_path / name))
        vol = read_volume(tmp_path / name, kind="labels")
        got = _world_centroids(vol)
        assert got.keys() == ref.keys()
        for value, (count, centroid) in ref.items():
            assert got[value][0] == count
            np.testing.assert_allclose(got[value][1], centroid, atol=1e-3, err_msg=name)
    # cartiq.io.orient.reorient gives the same array and grid as SimpleITK's permute + flip
    sitk.WriteImage(image, str(tmp_path / "crop.nrrd"))
    crop = read_volume(tmp_path / "crop.nrrd", kind="labels")
    arr, geo = reorient(crop.array, crop.geometry, [2, 0, 1], [True, False, True])
    vol = read_volume(tmp_path / "permute_flip.nii.gz", kind="labels")
    np.testing.assert_array_equal(arr, vol.array)
    check_same_geometry(geo, vol.geometry, None, vol.path)


# --------------------------------------------------------------------------- bad input


def _grid(shape=(12, 10, 8), spacing=(0.5, 0.6, 1.5), origin=(1.0, 2.0, 3.0)) -> Geometry:
    c, s = np.cos(0.3), np.sin(0.3)
    d = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return Geometry(shape=shape, spacing=spacing, origin=origin, direction=tuple(d.ravel()))


def _write_sitk(path: Path, array_zyx: np.ndarray, spacing=None) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_zyx)
    if spacing:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _write_4d(path: Path) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8, 3), np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path):
    g = _grid()
    rng = np.random.default_rng(0)
    noise = rng.normal(100, 10, g.shape).astype(np.float32)
    img = write_volume(tmp_path / "image.nii.gz", noise, g)
    seg = write_volume(tmp_path / "seg.nii.gz", np.zeros(g.shape, np.uint8), g)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    nan = rng.normal(size=g.shape).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[1, 1, 1] = np.inf
    cases = {
        "missing": (tmp_path / "nope.nii.gz", "does not exist"),
        "corrupt": (corrupt, "cannot read image"),
        "2d": (_write_sitk(tmp_path / "flat.nii.gz", np.zeros((10, 12), np.float32)), "is 2D"),
        "4d": (_write_4d(tmp_path / "series.nii.gz"), r"is 4D \(3 volumes\)"),
        "nan_nifti": (write_volume(tmp_path / "nan.nii.gz", nan, g),
                      "2 non-finite intensities"),
        "nan_nrrd": (write_volume(tmp_path / "nan.nrrd", nan, g), "2 non-finite intensities"),
    }
    return img, seg, cases


@pytest.mark.parametrize("case", ["missing", "corrupt", "2d", "4d", "nan_nifti", "nan_nrrd"])
def test_bad_image_errors_name_the_file(bad_inputs, case):
    _, _, cases = bad_inputs
    path, problem = cases[case]
    with pytest.raises(InputError, match=problem) as info:
        read_volume(path)
    assert str(info.value).startswith(str(path))


def test_bad_label_maps(tmp_path):
    g = _grid()
    frac = np.zeros(g.shape, np.float32)
    frac[2, 2, 2] = 1.5
    p = write_volume(tmp_path / "frac.nii.gz", frac, g)
    with pytest.raises(InputError, match="non-integer values"):
        read_volume(p, kind="labels")
    neg = np.zeros(g.shape, np.int16)
    neg[0, 0, 0] = -3
    with pytest.raises(InputError, match="negative label -3"):
        read_volume(write_volume(tmp_path / "neg.nrrd", neg, g), kind="labels")
    nan = np.zeros(g.shape, np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="label map contains 1 non-finite"):
        read_volume(write_volume(tmp_path / "nan.nii.gz", nan, g), kind="labels")


@pytest.mark.parametrize("change,problem", [
    ({"shape": (12, 10, 9)}, "shape 12x10x9 differs from 12x10x8"),
    ({"spacing": (0.5, 0.6, 1.6)}, "spacing"),
    ({"origin": (1.0, 2.0, 3.5)}, "origin"),
    ({"direction": tuple(np.eye(3).ravel())}, "orientation"),
])
def test_geometry_mismatch(change, problem):
    a = _grid()
    kw = {"shape": a.shape, "spacing": a.spacing, "origin": a.origin, "direction": a.direction}
    kw.update(change)
    with pytest.raises(InputError, match=problem) as info:
        check_same_geometry(a, Geometry(**kw), Path("img.nii.gz"), Path("seg.nii.gz"))
    assert str(info.value).startswith("seg.nii.gz") and "img.nii.gz" in str(info.value)
    # below tolerance: accepted
    tiny = Geometry(shape=a.shape, spacing=tuple(np.add(a.spacing, 1e-6)),
                    origin=tuple(np.add(a.origin, 1e-4)), direction=a.direction)
    check_same_geometry(a, tiny, None, None)


@pytest.mark.parametrize("case", ["missing", "corrupt", "2d", "4d", "nan_nifti", "nan_nrrd",
                                  "seg_missing", "seg_geometry"])
def test_cli_measure_bad_input_one_line_exit_2(bad_inputs, tmp_path, capfd, case):
    from cartiq.cli import main

    img, seg, cases = bad_inputs
    if case == "seg_missing":
        image, labels, named = img, tmp_path / "noseg.nii.gz", tmp_path / "noseg.nii.gz"
    elif case == "seg_geometry":
        g = _grid(spacing=(0.5, 0.6, 2.0))
        labels = write_volume(tmp_path / "seg_other.nii.gz", np.zeros(g.shape, np.uint8), g)
        image, named = img, labels
    else:
        image, labels, named = cases[case][0], seg, cases[case][0]
    out = tmp_path / "out"
    capfd.readouterr()
    with pytest.raises(SystemExit) as ex:
        main(["measure", str(image), "--seg", str(labels), "-o", str(out)])
    assert ex.value.code == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("cartiq: error: ") and str(named) in err[0]
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_mixed_slice_orientations_are_rejected(sample, tmp_path):
    folder = tmp_path / "tilted"
    folder.mkdir()
    files = sorted(sample("pymskt_mese_t2").iterdir())[:24]  # 3 slice positions x 8 echoes
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if n == 8:  # one slice of echo 1 tilted by ~6 degrees
            ds.ImageOrientationPatient = [0.0, 0.995, -0.0998, 0.0, 0.0998, 0.995]
        ds.save_as(folder / f.name)
    with pytest.raises(InputError, match="mixes slice orientations"):
        read_volume(folder)
    assert read_volume(folder, echo=2).geometry.shape == (256, 256, 3)


def test_sibling_echo_series_without_echo_numbers(sample, tmp_path):
    """qDESS exported as two series sharing SeriesNumber 5 but without EchoNumbers: each
    SeriesInstanceUID is an echo, ordered by echo time."""
    qd = sample("pykneer_qdess")
    for echo in ("echo2", "echo1"):
        (tmp_path / echo).mkdir()
        for f in sorted((qd / echo).iterdir())[30:36]:
            ds = pydicom.dcmread(f)
            del ds.EchoNumbers
            ds.save_as(tmp_path / echo / f.name)
    first = read_volume(tmp_path)
    assert first.geometry.shape == (512, 512, 6) and first.meta["n_echoes"] == 2
    assert first.meta["echo_time_ms"] == pytest.approx(7.48)
    assert all("/echo1/" in f for f in first.meta["files"])
    second = read_volume(tmp_path, echo=2)
    assert second.meta["echo_time_ms"] == pytest.approx(42.52)
    assert all("/echo2/" in f for f in second.meta["files"])
