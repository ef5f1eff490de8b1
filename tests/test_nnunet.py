"""nnU-Net v2 models end to end, without the real weights: a tiny real nnU-Net cascade
(3d_lowres -> 3d_cascade_fullres, one fold, labels of ``nnunet_knee``) made by nnU-Net's own
planner and trainer (tests/_nnunet_tiny.py; committed under tests/data/nnunet_tiny, 0.9 MB),
registered with ``cartiq models add`` and run through ``cartiq segment``/``run``.

The model is fitted only roughly (femur, femoral cartilage and tibia of the phantom), so the
tests check the plumbing (label mapping, geometry, manifest, storage independence, errors),
not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="the optional extra cartiq[nnunet] is not installed")

import torch  # noqa: E402

from cartiq.errors import ModelError  # noqa: E402
from cartiq.io.orient import reorient  # noqa: E402
from cartiq.io.volume import Geometry, Volume, read_volume, sha256_file, write_volume  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _nnunet_tiny import DATASET, ORIENTATION, SPACING, phantom  # noqa: E402

TRAINED = "nnUNetTrainer__nnUNetResEncUNetMPlans__"
# nnunet_knee value -> cartiq value (configs/labels.yaml)
TO_CARTIQ = {1: 7, 2: 4, 3: 5, 4: 6, 5: 8, 6: 9, 7: 1, 8: 2, 9: 3}


def cli(*args: str) -> int:
    from cartiq.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


@pytest.fixture(scope="session")
def tiny() -> Path:
    """Results root holding Dataset999_TinyKnee: committed (0.9 MB; building it takes from
    one to ten minutes on a busy CPU), made by ``python tests/_nnunet_tiny.py --out
    tests/data/nnunet_tiny``; ``NNUNET_TINY_REBUILD=1`` builds a fresh one for the session."""
    if os.environ.get("NNUNET_TINY_REBUILD") == "1":
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="tiny_nnunet_"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
        proc = subprocess.run([sys.executable, str(HERE / "_nnunet_tiny.py"), "--out",
                               str(out)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out
    return HERE / "data" / "nnunet_tiny"


def _geometry(origin=(-20.0, -30.0, 10.0)) -> Geometry:
    return Geometry(shape=phantom(0)[0].shape, spacing=SPACING, origin=origin,
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture(scope="session")
def scan(tmp_path_factory) -> Path:
    img, _ = phantom(11)
    return write_volume(tmp_path_factory.mktemp("scan") / "knee.nii.gz", img, _geometry())


@pytest.fixture(scope="session")
def models_dir(tiny, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    assert cli("models", "add", tiny, "--name", "tinyknee", "--orientation", ORIENTATION,
               "--no-tta", "--models-dir", d) == 0
    return d


@pytest.fixture
def registry_env(models_dir, monkeypatch) -> Path:
    monkeypatch.setenv("CARTIQ_MODELS_DIR", str(models_dir))
    return models_dir


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny / DATASET, dst / DATASET)
    return dst / DATASET


# ----------------------------------------------------------------------------- add / list / info


def test_add_writes_a_package_with_hashes_labels_and_cascade(tiny, models_dir, capsys):
    meta = json.loads((models_dir / "tinyknee" / "metadata.json").read_text())
    assert meta["format"] == "nnunetv2"
    assert {int(k): v for k, v in meta["labels"].items()} == {
        1: "patellar_cartilage", 2: "femoral_cartilage", 3: "medial_tibial_cartilage",
        4: "lateral_tibial_cartilage", 5: "medial_meniscus", 6: "lateral_meniscus",
        7: "femur", 8: "tibia", 9: "patella"}
    nn = meta["nnunet"]
    assert nn["configuration"] == "3d_cascade_fullres"
    assert [s["configuration"] for s in nn["stages"]] == ["3d_lowres", "3d_cascade_fullres"]
    for st in nn["stages"]:
        assert st["folds"] == ["0"] and st["checkpoint"] == "checkpoint_final.pth"
        ck = Path(st["folder"]) / "fold_0" / "checkpoint_final.pth"
        assert st["sha256"] == {"fold_0/checkpoint_final.pth": sha256_file(ck)}
    assert nn["orientation"] == "LPS" and nn["use_mirroring"] is False
    assert meta["license"] and meta["source"] and nn["expected_input"]["channels"] == {"0": "MRI"}
    assert (models_dir / "tinyknee" / "README.md").is_file()
    capsys.readouterr()
    assert cli("models", "list", "--models-dir", models_dir) == 0
    assert "tinyknee\t1\tnnunetv2" in capsys.readouterr().out
    assert cli("models", "info", "tinyknee", "--models-dir", models_dir) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nnunet"]["stages"][1]["folds"] == ["0"]


def test_add_checkpoint_and_folds_options(tiny, tmp_path):
    d = tmp_path / "m"
    assert cli("models", "add", tiny, "--name", "best", "--checkpoint", "checkpoint_best.pth",
               "--folds", "0", "--configuration", "3d_lowres", "--models-dir", d) == 0
    nn = json.loads((d / "best" / "metadata.json").read_text())["nnunet"]
    assert [s["configuration"] for s in nn["stages"]] == ["3d_lowres"]
    assert list(nn["stages"][0]["sha256"]) == ["fold_0/checkpoint_best.pth"]


# ----------------------------------------------------------------------------- bad input


def _one_line_exit_2(capsys, *args: str, match: str) -> None:
    capsys.readouterr()
    assert cli(*args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cartiq: error")]
    assert len(err) == 1 and match in err[0], err


def test_not_a_results_folder(tmp_path, capsys):
    (tmp_path / "x" / "fold_0").mkdir(parents=True)
    _one_line_exit_2(capsys, "models", "add", tmp_path / "x", "--models-dir", tmp_path / "m",
                     match="is not an nnU-Net v2 results folder")
    assert not (tmp_path / "m").exists()


def test_unmappable_labels_need_a_mapping_file(tiny, tmp_path, capsys):
    ds = _copy(tiny, tmp_path / "r")
    for f in ds.glob("*/dataset.json"):
        d = json.loads(f.read_text())
        d["labels"] = {"background": 0, **{f"structure {v}": v for v in range(1, 10)}}
        f.write_text(json.dumps(d))
    _one_line_exit_2(capsys, "models", "add", ds, "--models-dir", tmp_path / "m",
                     match="cannot be mapped into the cartiq scheme")
    assert not (tmp_path / "m").exists()
    assert cli("models", "add", ds, "--labels", "nnunet_knee", "--name", "mapped",
               "--models-dir", tmp_path / "m") == 0
    meta = json.loads((tmp_path / "m" / "mapped" / "metadata.json").read_text())
    assert meta["labels"]["7"] == "femur"


def test_cascade_without_lowres_stage(tiny, tmp_path, capsys):
    ds = _copy(tiny, tmp_path / "r")
    shutil.rmtree(ds / (TRAINED + "3d_lowres"))
    _one_line_exit_2(capsys, "models", "add", ds, "--models-dir", tmp_path / "m",
                     match="low-res stage '3d_lowres' is missing")


def test_missing_fold(tiny, tmp_path, capsys):
    _one_line_exit_2(capsys, "models", "add", tiny, "--folds", "0,3",
                     "--models-dir", tmp_path / "m", match="fold 3 is missing")


def test_replaced_checkpoint_stops_before_loading(tiny, tmp_path, scan, capsys):
    ds = _copy(tiny, tmp_path / "r")
    d = tmp_path / "m"
    assert cli("models", "add", ds, "--name", "t", "--orientation", "LPS", "--no-tta",
               "--models-dir", d) == 0
    ck = ds / (TRAINED + "3d_lowres") / "fold_0" / "checkpoint_final.pth"
    good = ck.read_bytes()
    ck.write_bytes(good + b"x")
    out = tmp_path / "out"
    _one_line_exit_2(capsys, "segment", scan, "-o", out, "--model", d / "t", "--device", "cpu",
                     match="sha256 mismatch")
    assert not out.exists() or not any(out.iterdir())
    ck.write_bytes(good)
    (ds / (TRAINED + "3d_cascade_fullres") / "fold_0" / "checkpoint_final.pth").unlink()
    _one_line_exit_2(capsys, "segment", scan, "-o", out, "--model", d / "t", "--device", "cpu",
                     match="fold_0/checkpoint_final.pth is missing")


def test_cuda_without_gpu_exits_2(registry_env, scan, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    _one_line_exit_2(capsys, "segment", scan, "-o", out, "--model", "tinyknee",
                     "--device", "cuda", match="no CUDA GPU")
    assert not out.exists() or not any(out.iterdir())


def test_without_the_extra_one_line_exit_2(registry_env, scan, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nnunetv2" else real(name, *a))
    _one_line_exit_2(capsys, "segment", scan, "-o", tmp_path / "o", "--model", "tinyknee",
                     "--device", "cpu", match="pip install 'cartiq[nnunet]'")


# ----------------------------------------------------------------------------- inference


def _nnunet_directly(tiny: Path, image: Path) -> np.ndarray:
    """The cascade run with nnU-Net's API alone on the file as SimpleITK reads it
    (the scan is stored in the training orientation): nnU-Net values, (i, j, k) order."""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    im = sitk.ReadImage(str(image))
    x = sitk.GetArrayFromImage(im)[None].astype(np.float32)
    props = {"spacing": list(im.GetSpacing()[::-1])}
    prev = None
    for conf in ("3d_lowres", "3d_cascade_fullres"):
        p = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(tiny / DATASET / (TRAINED + conf)),
                                               use_folds=(0,))
        seg = p.predict_single_npy_array(x, dict(props), prev, None, False)
        prev = seg[None].astype(np.int16)
    return seg.transpose(2, 1, 0)


def test_run_end_to_end_maps_labels_keeps_geometry_records_model(
        tiny, registry_env, scan, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("run", scan, "-o", out, "--model", "tinyknee", "--device", "auto") == 0
    if not torch.cuda.is_available():
        assert "no CUDA GPU found; running on the CPU" in capsys.readouterr().err
    seg = read_volume(out / "segmentation.nii.gz", kind="labels")
    img = read_volume(scan, kind="image")
    assert seg.geometry == img.geometry
    raw = _nnunet_directly(tiny, scan)
    lut = np.zeros(10, np.uint8)
    for k, v in TO_CARTIQ.items():
        lut[k] = v
    expected = lut[raw]
    kept = seg.array > 0  # the anatomical clean-up only removes voxels
    assert kept.sum() > 0.5 * (raw > 0).sum()
    assert np.array_equal(seg.array[kept], expected[kept])
    manifest = json.loads((out / "manifest.json").read_text())
    model = manifest["segmentation"]["model"]
    assert model["name"] == "tinyknee" and model["format"] == "nnunetv2"
    nn = model["nnunet"]
    assert nn["configuration"] == "3d_cascade_fullres"
    stages = {s["configuration"]: s for s in nn["stages"]}
    ck = tiny / DATASET / (TRAINED + "3d_cascade_fullres") / "fold_0" / "checkpoint_final.pth"
    assert stages["3d_cascade_fullres"]["folds"] == ["0"]
    assert stages["3d_cascade_fullres"]["checkpoint_sha256"] == {
        "fold_0/checkpoint_final.pth": sha256_file(ck)}
    assert "3d_lowres" in stages
    assert (out / "measurements.csv").is_file()


def test_results_do_not_depend_on_storage(registry_env):
    from cartiq.segmentation.segmenter import Segmenter

    seg = Segmenter("tinyknee", device="cpu")
    img, _ = phantom(5)
    a = Volume(img, _geometry())
    arr_b, geo_b = reorient(img, a.geometry, (2, 0, 1), (True, False, True))
    b = Volume(arr_b, geo_b)
    la = seg.segment(a)
    lb = seg.segment(b)
    back, _ = reorient(la, a.geometry, (2, 0, 1), (True, False, True))
    assert (lb > 0).sum() > 1000
    assert np.array_equal(back, lb)  # same labels at the same world positions
    # the check can fail: without cartiq's re-storing, nnU-Net's labels follow the storage
    runner = seg.model.network
    runner.spec = runner.spec.model_copy(update={"orientation": None})
    lut = np.zeros(10, np.uint8)
    for k, v in TO_CARTIQ.items():
        lut[k] = v
    as_stored = lut[runner.predict(b)]
    fg = lb > 0
    assert (as_stored[fg] == lb[fg]).mean() < 0.9


def test_nnunet_not_imported_by_cartiq_or_segmentation():
    code = ("import sys, cartiq, cartiq.cli, cartiq.segmentation.segmenter, "
            "cartiq.segmentation.models, cartiq.segmentation.model_store; "
            "bad = [m for m in ('nnunetv2', 'huggingface_hub') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- fetch


def _hub_copy(tiny: Path, dst: Path) -> Path:
    """A local folder laid out like the hub repository aagatti/nnunet_knee."""
    ds = dst / "models" / "Dataset500_KneeMRI"
    shutil.copytree(tiny / DATASET, ds)
    for stage in ds.iterdir():
        (stage / "fold_0" / "checkpoint_final.pth").unlink()
    (ds / (TRAINED + "3d_cascade_fullres") / "model_config.json").write_text(
        json.dumps({"model_info": {"fold": 0}}))
    (dst / "test_data").mkdir()
    (dst / "test_data" / "not_needed.bin").write_bytes(b"0" * 100)
    return dst


def test_fetch_known_model_from_a_local_hub_copy(tiny, tmp_path, capsys):
    hub = _hub_copy(tiny, tmp_path / "hub")
    d = tmp_path / "m"
    assert cli("models", "fetch", "nnunet_knee", "--from-dir", hub, "--models-dir", d) == 0
    meta = json.loads((d / "nnunet_knee" / "metadata.json").read_text())
    nn = meta["nnunet"]
    assert nn["known_model"] == "nnunet_knee" and nn["orientation"] == "PIR"
    assert nn["use_mirroring"] is False
    assert [(s["configuration"], s["folds"], s["checkpoint"]) for s in nn["stages"]] == [
        ("3d_lowres", ["0"], "checkpoint_best.pth"),
        ("3d_cascade_fullres", ["0"], "checkpoint_best.pth")]
    assert not Path(nn["stages"][0]["folder"]).is_absolute()
    assert "MIT" in meta["license"] and "aagatti/nnunet_knee" in meta["source"]
    assert not (d / "nnunet_knee" / "hub" / "test_data").exists()
    assert [p.name for p in d.iterdir()] == ["nnunet_knee"]
    capsys.readouterr()
    assert cli("models", "list", "--models-dir", d) == 0
    assert "nnunet_knee" in capsys.readouterr().out
    from cartiq.segmentation.models import load_model

    m = load_model("nnunet_knee", device="cpu", models_dir=d)
    assert m.extra["nnunet"]["stages"][0]["checkpoint"] == "checkpoint_best.pth"


def test_fetch_partial_download(tiny, tmp_path, capsys):
    hub = _hub_copy(tiny, tmp_path / "hub")
    (hub / "models" / "Dataset500_KneeMRI" / (TRAINED + "3d_lowres") / "fold_0" /
     "checkpoint_best.pth").unlink()
    d = tmp_path / "m"
    _one_line_exit_2(capsys, "models", "fetch", "nnunet_knee", "--from-dir", hub,
                     "--models-dir", d, match="incomplete")
    assert not d.exists() or not any(d.iterdir())  # no package, no partial folder left


def test_fetch_through_the_hub_client_and_a_wrong_checksum(tiny, tmp_path, monkeypatch):
    """The hub download path with huggingface_hub's snapshot_download replaced by a copy of
    a local folder (no network in tests)."""
    hf = pytest.importorskip("huggingface_hub")
    from cartiq.segmentation.model_store import fetch_model
    from cartiq.segmentation.nnunet_results import known_models

    hub = _hub_copy(tiny, tmp_path / "hub")
    calls = []

    def snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None,
                          repo_type=None, **kw):
        calls.append((repo_id, revision, allow_patterns, repo_type))
        from cartiq.segmentation.model_store import copy_downloader

        copy_downloader(hub)({"allow_patterns": allow_patterns}, Path(local_dir))
        return str(local_dir)

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    meta, out = fetch_model("nnunet_knee", models_dir=tmp_path / "ok")
    assert calls[0][0] == "aagatti/nnunet_knee" and calls[0][3] == "model"
    assert meta.nnunet.known_model == "nnunet_knee" and (out / "hub").is_dir()
    entry = dict(known_models()["nnunet_knee"])
    entry["sha256"] = {"3d_lowres/fold_0/checkpoint_best.pth": "0" * 64}
    with pytest.raises(ModelError, match="sha256 mismatch"):
        fetch_model("nnunet_knee", models_dir=tmp_path / "m", registry={"nnunet_knee": entry})
    assert not any((tmp_path / "m").iterdir())


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_matches_cpu(registry_env, scan):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from cartiq.segmentation.segmenter import Segmenter

    vol = read_volume(scan, kind="image")
    cpu = Segmenter("tinyknee", device="cpu").model.network.predict(vol)
    gpu_seg = Segmenter("tinyknee", device="cuda")
    assert gpu_seg.model.extra["nnunet"]["configuration"] == "3d_cascade_fullres"
    gpu = gpu_seg.model.network.predict(vol)
    assert gpu.shape == cpu.shape
    assert (gpu == cpu).mean() > 0.99


def test_batch_with_an_nnunet_model(registry_env, scan, tmp_path):
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"subject_id,timepoint,image\ns1,baseline,{scan}\n")
    out = tmp_path / "batch"
    assert cli("batch", csv, "-o", out, "--model", "tinyknee", "--device", "cpu",
               "--workers", "1", "--no-report", "--no-progress") == 0
    manifests = [json.loads(p.read_text()) for p in out.rglob("manifest.json")]
    models = [m["model"] for m in manifests if isinstance(m.get("model"), dict)
              and m["model"].get("format") == "nnunetv2"]
    assert models and models[0]["nnunet"]["configuration"] == "3d_cascade_fullres"
