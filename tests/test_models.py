"""Model packages: metadata schema, sha256 check, registry, external formats."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cartiq.errors import ModelError
from cartiq.io.volume import sha256_file
from cartiq.segmentation.models import (DEFAULT_MODEL, MODELS_DIR, build_network, list_models, load_model,
                             model_info, read_metadata, resolve_model)
from cartiq.segmentation.synth import MODEL_CLASSES

LABELS = {i: n for i, n in enumerate(MODEL_CLASSES) if n != "background"}


def tiny_spec(in_channels: int = 1, dims: int = 2) -> dict:
    return {"name": "UNet", "spatial_dims": dims, "in_channels": in_channels,
            "out_channels": len(MODEL_CLASSES),
            "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}}


def make_package(folder: Path, *, in_channels: int = 1, dims: int = 2, seed: int = 0,
                 name: str = "tiny", sha: bool = True) -> Path:
    """A small but valid cartiq model package with random weights."""
    from cartiq.segmentation.models import NetworkSpec

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_network(NetworkSpec(**tiny_spec(in_channels, dims)))
    torch.save(net.state_dict(), folder / "model.pt")
    meta = {"name": name, "network": tiny_spec(in_channels, dims), "labels": LABELS,
            "input": {"spacing_mm": [1.0, 1.0, 1.0], "patch_size": [32, 32, 32][:dims]},
            "weights": "model.pt",
            "weights_sha256": sha256_file(folder / "model.pt") if sha else None}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_package_loads_and_verifies_sha(tmp_path):
    pkg = make_package(tmp_path / "tiny")
    m = load_model(pkg)
    assert m.weights_sha256 == sha256_file(pkg / "model.pt")
    assert m.metadata.labels[4] == "femoral_cartilage"
    assert not m.network.training


def test_sha_mismatch_is_a_clear_error(tmp_path):
    pkg = make_package(tmp_path / "tiny")
    data = bytearray((pkg / "model.pt").read_bytes())
    data[-20] ^= 0xFF
    (pkg / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_model(pkg)


def test_missing_or_corrupt_weights(tmp_path):
    pkg = make_package(tmp_path / "tiny", sha=False)
    (pkg / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model(pkg)
    (pkg / "model.pt").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(pkg)


def test_weights_that_do_not_fit_the_network(tmp_path):
    pkg = make_package(tmp_path / "tiny")
    meta = json.loads((pkg / "metadata.json").read_text())
    meta["network"]["kwargs"]["channels"] = [8, 16]
    (pkg / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="do not fit"):
        load_model(pkg)


def test_unknown_model_name_lists_known_ones(tmp_path):
    make_package(tmp_path / "tiny")
    with pytest.raises(ModelError, match="unknown model 'nope'.*tiny"):
        resolve_model("nope", models_dir=tmp_path)
    assert [m.name for m in list_models(tmp_path)] == ["tiny"]


def test_invalid_metadata_is_rejected(tmp_path):
    pkg = make_package(tmp_path / "tiny")
    meta = json.loads((pkg / "metadata.json").read_text())
    meta["labels"]["4"] = "kneecap_cartilage"
    (pkg / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="unknown structures"):
        read_metadata(pkg / "metadata.json")
    meta["labels"]["4"] = "femoral_cartilage"
    meta["surprise"] = 1
    (pkg / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="surprise"):
        read_metadata(pkg / "metadata.json")


def _set_meta(pkg: Path, **changes) -> None:
    meta = json.loads((pkg / "metadata.json").read_text())
    meta.update(changes)
    (pkg / "metadata.json").write_text(json.dumps(meta))


def _tiny_with_input(tmp_path: Path, **inputs) -> Path:
    """The tiny package with these ``input`` fields changed."""
    pkg = make_package(tmp_path / "tiny")
    meta = json.loads((pkg / "metadata.json").read_text())
    _set_meta(pkg, input={**meta["input"], **inputs})
    return pkg


def _random_image(seed: int):
    """A 30 x 36 x 40 random volume on an axis-aligned 1.0 x 0.8 x 0.8 mm grid."""
    from cartiq.io.volume import Geometry, Volume

    return Volume(np.random.default_rng(seed).random((30, 36, 40), np.float32),
                  Geometry((30, 36, 40), (1.0, 0.8, 0.8), (5, -3, 2),
                           (1, 0, 0, 0, 1, 0, 0, 0, 1)))


@pytest.mark.parametrize("weights,fmt,message", [
    ({"kneecap_cartilage": 0.5}, None, "class_weights names 'kneecap_cartilage'"),
    ({"femoral_cartilage": 0.0}, None, "must be a positive number"),
    ({"femoral_cartilage": -1.0}, None, "must be a positive number"),
    ({"femoral_cartilage": float("inf")}, None, "must be a positive number"),
    ({"femoral_cartilage": 0.5}, "nnunetv2", "not to nnU-Net"),
])
def test_bad_class_weights_are_rejected(tmp_path, weights, fmt, message):
    pkg = make_package(tmp_path / "tiny")
    _set_meta(pkg, class_weights=weights, **({"format": fmt} if fmt else {}))
    with pytest.raises(ModelError, match=message):
        read_metadata(pkg / "metadata.json")


@pytest.mark.parametrize("in_channels,context,dims,message", [
    (3, 1, 2, None), (5, 2, 2, None), (3, 0, 2, "in_channels is 3, but cartiq feeds 1"),
    (1, 1, 2, "feeds 3 .one image channel and 1 neighbouring slice"),
    (3, 1, 3, "2D networks only"),
])
def test_2p5d_metadata_channels_must_match(tmp_path, in_channels, context, dims, message):
    pkg = make_package(tmp_path / "tiny", in_channels=in_channels, dims=dims)
    meta = json.loads((pkg / "metadata.json").read_text())
    _set_meta(pkg, input={**meta["input"], "context_slices": context})
    if message is None:
        assert read_metadata(pkg / "metadata.json").input.context_slices == context
    else:
        with pytest.raises(ModelError, match=message):
            read_metadata(pkg / "metadata.json")


def test_class_weights_scale_probabilities_before_the_argmax(tmp_path):
    from cartiq.io.volume import Geometry, Volume
    from cartiq.segmentation.segmenter import Segmenter

    # the arithmetic: 0.6 femoral cartilage vs 0.4 background, halved, loses
    g = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    probs = np.zeros((len(MODEL_CLASSES), 4, 4, 4), np.float16)
    probs[0], probs[4] = 0.4, 0.6
    w = np.ones(len(MODEL_CLASSES), np.float32)
    assert (Segmenter._probs_back([(probs, g)], g, w) == 4).all()
    w[4] = 0.5
    assert (Segmenter._probs_back([(probs, g)], g, w) == 0).all()
    # through a package: the metadata's weights reach the arg-max, and the provenance
    image = Volume(np.random.default_rng(0).random((40, 40, 40), np.float32),
                   Geometry((40, 40, 40), (1.0, 1.0, 1.0), (0, 0, 0),
                            (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    pkg = make_package(tmp_path / "tiny")
    counts = {}
    for factor in (1.0, 1e-6, 1e6):
        _set_meta(pkg, class_weights={"femoral_cartilage": factor})
        seg = Segmenter(pkg, device="cpu")
        counts[factor] = int((seg._predict(image) == 4).sum())
        assert seg.model.provenance()["class_weights"] == {"femoral_cartilage": factor}
    assert counts[1e-6] == 0 and counts[1e6] > max(counts[1.0], 0.9 * image.array.size)


def test_torchscript_model_with_metadata_file(tmp_path):
    from cartiq.segmentation.models import NetworkSpec

    net = build_network(NetworkSpec(**tiny_spec())).eval()
    ts = torch.jit.trace(net, torch.zeros(1, 1, 32, 32))
    path = tmp_path / "seg.ts"
    ts.save(str(path))
    meta = {"name": "ts", "format": "torchscript", "network": tiny_spec(), "labels": LABELS,
            "weights": "seg.ts", "weights_sha256": sha256_file(path)}
    (tmp_path / "seg.json").write_text(json.dumps(meta))
    m = load_model(path)
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(m.network(x), net(x), atol=1e-5)


def test_monai_bundle_folder(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text("{}")
    from cartiq.segmentation.models import NetworkSpec

    net = build_network(NetworkSpec(**tiny_spec()))
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    meta = {"name": "bundle", "format": "monai_bundle", "network": tiny_spec(),
            "labels": LABELS, "weights": "models/model.pt",
            "weights_sha256": sha256_file(bundle / "models" / "model.pt")}
    (bundle / "cartiq.json").write_text(json.dumps(meta))
    m = load_model(bundle)
    assert m.metadata.format == "monai_bundle"


def test_nnunet_without_extra_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("nnunetv2") is not None:
        pytest.skip("nnunetv2 is installed")
    folder = tmp_path / "nnunet"
    (folder / "fold_0").mkdir(parents=True)
    meta = {"name": "nn", "format": "nnunetv2", "labels": {1: "femur"}}
    (folder / "cartiq.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="pip install 'cartiq\\[nnunet\\]'"):
        load_model(folder)


def test_default_model_package_is_complete():
    meta_path = resolve_model(None)
    assert meta_path == MODELS_DIR / DEFAULT_MODEL / "metadata.json"
    meta = read_metadata(meta_path)
    weights = meta_path.parent / meta.weights
    assert weights.stat().st_size < 50 * 1024 * 1024
    assert meta.weights_sha256 == sha256_file(weights)
    assert (meta_path.parent / "README.md").exists()
    info = model_info(DEFAULT_MODEL)
    assert info["card"] and info["network"]["spatial_dims"] == 2
    assert set(meta.labels.values()) >= {"femur", "tibia", "femoral_cartilage"}


def test_dynunet3d_config_builds_and_runs_forward():
    from cartiq.config import load_config
    from cartiq.segmentation.train import TrainConfig

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" /
                      "train_dynunet3d.yaml", TrainConfig)
    net = build_network(cfg.network).eval()
    with torch.no_grad():
        y = net(torch.zeros(1, 1, 32, 32, 32))
    assert tuple(y.shape) == (1, len(MODEL_CLASSES), 32, 32, 32)
    assert np.isfinite(y.numpy()).all()


@pytest.mark.parametrize("shifts", [[[0.0, 0.0]], [[1.0, 0.0]], [[0.5, -1.5]]])
def test_grid_shifts_must_be_fractions_of_a_voxel(tmp_path, shifts):
    pkg = _tiny_with_input(tmp_path, grid_shifts=shifts)
    with pytest.raises(ModelError, match="grid shift"):
        read_metadata(pkg / "metadata.json")


def test_probs_back_averages_the_passes_before_the_argmax():
    from cartiq.io.volume import Geometry
    from cartiq.segmentation.segmenter import Segmenter

    g = Geometry((3, 3, 3), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    a = np.zeros((len(MODEL_CLASSES), 3, 3, 3), np.float16)
    b = np.zeros_like(a)
    a[0], a[4] = 0.1, 0.9     # pass 1: femoral cartilage
    b[0], b[4] = 0.8, 0.2     # pass 2: background; the mean is 0.55 cartilage
    assert (Segmenter._probs_back([(a, g), (b, g)], g) == 4).all()
    b[0], b[4] = 1.0, 0.0     # now the mean is 0.45 cartilage against 0.55 background
    assert (Segmenter._probs_back([(a, g), (b, g)], g) == 0).all()


def test_grid_shifts_run_one_pass_each_on_a_moved_grid(tmp_path, monkeypatch):
    from cartiq.segmentation.segmenter import Segmenter

    image = _random_image(1)
    pkg = _tiny_with_input(tmp_path, grid_shifts=[[0.5, 0.25]])
    seg = Segmenter(pkg, device="cpu")
    sp = seg.model.metadata.input.spacing_mm
    _, plain = seg._canonical(image)
    _, moved = seg._canonical(image, (0.5, 0.25))
    assert moved.shape == plain.shape and moved.spacing == plain.spacing
    # slice axis 0 stays; the in-plane axes move by the fraction of their voxel
    assert np.allclose(np.subtract(moved.origin, plain.origin), [0.0, 0.5 * sp[1], 0.25 * sp[2]])
    grids = []
    real = Segmenter._canonical_probs

    def spy(self, volume, shift=(0.0, 0.0), scale=1.0):
        grids.append(shift)
        return real(self, volume, shift, scale)

    monkeypatch.setattr(Segmenter, "_canonical_probs", spy)
    labels = seg._predict(image)
    assert grids == [(0.0, 0.0), (0.5, 0.25)] and labels.shape == image.geometry.shape


def test_grid_scales_run_one_pass_each_on_a_coarser_grid(tmp_path, monkeypatch):
    from cartiq.segmentation.segmenter import Segmenter

    image = _random_image(1)
    pkg = _tiny_with_input(tmp_path, grid_scales=[1.25])
    seg = Segmenter(pkg, device="cpu")
    _, plain = seg._canonical(image)
    _, coarse = seg._canonical(image, scale=1.25)
    # the slice axis (0) keeps the scan's spacing; the in-plane spacing grows by the scale
    assert coarse.spacing[0] == plain.spacing[0]
    assert np.allclose(coarse.spacing[1:], np.multiply(plain.spacing[1:], 1.25))
    seen = []
    real = Segmenter._canonical_probs

    def spy(self, volume, shift=(0.0, 0.0), scale=1.0):
        probs, grid = real(self, volume, shift, scale)
        seen.append((scale, grid.spacing))
        return probs, grid

    monkeypatch.setattr(Segmenter, "_canonical_probs", spy)
    labels = seg._predict(image)
    assert [s for s, _ in seen] == [1.0, 1.25] and labels.shape == image.geometry.shape
    assert seen[1][1] == coarse.spacing


@pytest.mark.parametrize("scales", [[1.0], [0.2], [3.0]])
def test_grid_scales_must_be_near_one_and_not_one(tmp_path, scales):
    pkg = _tiny_with_input(tmp_path, grid_scales=scales)
    with pytest.raises(ModelError, match="grid scale"):
        read_metadata(pkg / "metadata.json")


def test_test_time_passes_on_a_3d_network_are_refused(tmp_path):
    pkg = _tiny_with_input(tmp_path, grid_scales=[1.25])
    meta = json.loads((pkg / "metadata.json").read_text())
    _set_meta(pkg, network={**meta["network"], "spatial_dims": 3})
    with pytest.raises(ModelError, match="input.grid_scales applies to cartiq's own 2D"):
        read_metadata(pkg / "metadata.json")


def test_probabilities_are_what_the_prediction_takes_the_argmax_of(tmp_path):
    from cartiq.segmentation.segmenter import Segmenter

    image = _random_image(2)
    pkg = _tiny_with_input(tmp_path, grid_shifts=[[0.5, 0.5]])
    seg = Segmenter(pkg, device="cpu")
    p = seg.probabilities(image)
    assert p.shape == (len(MODEL_CLASSES),) + image.geometry.shape and p.dtype == np.float16
    # a distribution per voxel (float16 rounding aside) ...
    assert np.allclose(p.astype(np.float32).sum(0), 1.0, atol=1e-2)
    # ... whose arg-max is the prediction wherever the top two are not a float16 tie
    top2 = np.sort(p.astype(np.float32), 0)[-2:]
    clear = top2[1] - top2[0] > 2e-3
    assert clear.mean() > 0.5   # an untrained net: close calls are common
    assert (p.argmax(0)[clear] == seg._predict(image)[clear]).all()
