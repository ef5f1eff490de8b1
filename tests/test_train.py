"""Synthetic rendering and training: shapes, contrast variety, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from cartiq.errors import ConfigError, InputError
from cartiq.io.volume import Geometry, write_volume
from cartiq.io.labels import default_scheme
from cartiq.segmentation.models import load_model
from cartiq.segmentation.synth import (MODEL_CLASSES, TISSUE0, Renderer, SynthConfig,
                                       load_label_map_canonical, to_model_classes)
from cartiq.segmentation.train import dice_per_class, train

S = default_scheme()
C = {n: i for i, n in enumerate(MODEL_CLASSES)}


def toy_knee(shape=(40, 64, 64)) -> np.ndarray:
    """Cartiq-scheme toy knee: femur over tibia with cartilage caps and a meniscus ring."""
    lab = np.zeros(shape, np.uint8)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    r_f = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - 44) ** 2)
    lab[r_f < 18] = S["femur"]
    lab[(r_f >= 18) & (r_f < 21) & (z < 40)] = S["femoral_cartilage"]
    lab[(z < 20) & (np.abs(y - cy) < 20) & (np.abs(x - cx) < 16)] = S["tibia"]
    tib_cart = (z >= 20) & (z < 23) & (np.abs(y - cy) < 16) & (np.abs(x - cx) < 14)
    lab[tib_cart & (x < cx)] = S["medial_tibial_cartilage"]
    lab[tib_cart & (x >= cx)] = S["lateral_tibial_cartilage"]
    lab[(z >= 20) & (z < 24) & (np.abs(y - cy) >= 16) & (np.abs(y - cy) < 20)
        & (np.abs(x - cx) < 14)] = S["medial_meniscus"]
    return lab


def write_toy(folder: Path, name="toy.nii.gz", spacing=(1.0, 1.0, 1.0)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lab = toy_knee()
    geom = Geometry(lab.shape, spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return write_volume(folder / name, lab, geom)


def tiny_config(tmp_path: Path, dims: int = 2, **over) -> Path:
    cfg = {
        "name": "tiny_test",
        "network": {"name": "UNet", "spatial_dims": dims, "in_channels": 1,
                    "out_channels": len(MODEL_CLASSES),
                    "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "input": {"spacing_mm": [1.0, 1.0, 1.0],
                  "patch_size": [32, 32] if dims == 2 else [16, 32, 32]},
        "synth": {"spacing_mm": 1.0, "crop_depth": 8},
        "epochs": 1, "iterations_per_epoch": 3, "crops_per_batch": 1, "slices_per_crop": 2,
        "val_crops": 1, "seed": 0,
    }
    cfg.update(over)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


# ----------------------------------------------------------------------------- synth


def test_model_classes_merge_medial_lateral():
    lab = toy_knee()
    m = to_model_classes(lab)
    assert set(np.unique(m)) <= set(range(len(MODEL_CLASSES)))
    tib = (lab == S["medial_tibial_cartilage"]) | (lab == S["lateral_tibial_cartilage"])
    assert (m[tib] == C["tibial_cartilage"]).all()
    assert (m[lab == S["medial_meniscus"]] == C["meniscus"]).all()


def test_renderer_shapes_and_varied_contrast():
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    r = Renderer(SynthConfig(spacing_mm=1.0), seed=1)
    means = []
    for _ in range(6):
        img, lab = r.sample(labels, (8, 32, 48))
        assert img.shape == lab.shape == (8, 32, 48)
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        assert set(torch.unique(lab).tolist()) <= set(range(len(MODEL_CLASSES)))
        fem = lab == C["femur"]
        if fem.sum() > 20:
            means.append(float(img[fem].mean()))
    assert len(means) >= 3
    assert np.std(means) > 0.05  # contrast differs between renderings


@pytest.mark.parametrize("family, brighter, darker", [
    ("dess", "femoral_cartilage", "femur"),      # DESS: cartilage over marrow
    ("pdfs", "femoral_cartilage", "femur"),      # fat-sat: marrow suppressed
    ("t1", "femur", "femoral_cartilage"),        # T1: fatty marrow bright
    ("t2", "femur", "femoral_cartilage"),        # T2 FSE (no fat-sat): cartilage dark
])
def test_contrast_family_can_be_chosen(family, brighter, darker):
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    cfg = SynthConfig(spacing_mm=1.0, random_contrast_probability=0.0,
                      contrast_families=(family,), noise_std=(0.0, 0.0), bias_std=0.0,
                      gamma_std=0.0, slice_thickness_mm=(1.0, 1.0),
                      inplane_resolution_mm=(1.0, 1.0), rotation_deg=0, elastic_mm=0,
                      scale_fraction=0, mirror_probability=0, bml_probability=0,
                      cortex_probability=0.0)
    center = torch.tensor([19.5, 31.5, 31.5])
    for seed in range(3):
        img, lab = Renderer(cfg, seed=seed).sample(labels, (40, 64, 64), center=center)
        hi, lo = lab == C[brighter], lab == C[darker]
        assert float(img[hi].mean()) > float(img[lo].mean()), (family, seed)
        # the meniscus is dark in every family
        assert float(img[lab == C["meniscus"]].mean()) < float(img[hi].mean())


def _with_tissues() -> torch.Tensor:
    """The toy knee with a "ligament" block in the gap beside the femur and a "fat" block
    in front of it, coded the way load_label_map_canonical stores named tissues."""
    lab = to_model_classes(toy_knee())
    lab[16:24, 4:10, 26:36] = TISSUE0 + 2   # ligament
    lab[16:24, 54:60, 26:36] = TISSUE0 + 0  # fat
    return torch.from_numpy(lab)


@pytest.mark.parametrize("family, fat_brighter", [("dess", False), ("t1", True)])
def test_named_tissues_render_as_themselves_and_train_as_background(family, fat_brighter):
    labels = _with_tissues()
    cfg = _fixed(random_contrast_probability=0.0, contrast_families=(family,),
                 noise_std=(0.0, 0.0), bias_std=0.0, gamma_std=0.0, fluid_probability=0.0,
                 intensity_std=(0.0, 0.0), slice_thickness_mm=(0.5, 0.5),
                 inplane_resolution_mm=(0.5, 0.5))
    center = torch.tensor([19.5, 31.5, 31.5])
    for seed in range(3):
        img, lab = Renderer(cfg, seed=seed).sample(labels, (40, 64, 64), center=center)
        assert set(torch.unique(lab).tolist()) <= set(range(len(MODEL_CLASSES)))
        lig = torch.zeros_like(lab, dtype=torch.bool)
        lig[17:23, 5:9, 27:35] = True  # inside the blocks, away from blurred edges
        fat = torch.zeros_like(lig)
        fat[17:23, 55:59, 27:35] = True
        assert (lab[lig] == 0).all() and (lab[fat] == 0).all()
        cart = lab == C["femoral_cartilage"]
        # ligaments are dark in every family, and uniform (one tissue, not random blobs)
        assert float(img[lig].mean()) < float(img[cart].mean()) - 0.2
        assert float(img[lig].std()) < 0.02
        fat_mean = float(img[fat].mean())
        assert (fat_mean > 0.5) == fat_brighter, (family, seed, fat_mean)


def test_effusion_brightens_background_along_the_bones_only():
    """Effusion pockets (DESS: bright fluid) replace background near the bones and the joint;
    the labels, and the image away from the bones, are those of the same seed without."""
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    center = torch.tensor([19.5, 31.5, 31.5])
    common = dict(random_contrast_probability=0.0, contrast_families=("dess",),
                  noise_std=(0.0, 0.0), bias_std=0.0, gamma_std=0.0, fluid_probability=0.0,
                  intensity_std=(0.0, 0.0), slice_thickness_mm=(0.5, 0.5),
                  inplane_resolution_mm=(0.5, 0.5), effusion_mm=(8.0, 8.0))
    r = Renderer(_fixed(effusion_probability=1.0, **common), seed=5)
    lab = labels.clone().to(torch.uint8)
    bone = (lab == C["femur"]) | (lab == C["tibia"])
    soft = _cart(lab) | (lab == C["meniscus"])
    pockets = r._effusion(lab, bone, soft)
    assert pockets.sum() > 20
    assert not (pockets & (lab != 0)).any()  # background only
    near_bone = F.max_pool3d(bone[None, None].float(), 9, 1, 4)[0, 0] > 0
    assert (pockets <= near_bone).all()  # within 4 mm of a bone
    for seed in range(3):
        _, out = Renderer(_fixed(effusion_probability=1.0, **common), seed=seed).sample(
            labels, (40, 64, 64), center=center)
        assert torch.equal(out, labels.long())  # effusion is background for the network
    # the pockets are drawn as joint fluid: the same intensity as fluid given explicitly
    pocket = torch.zeros_like(bone)
    pocket[16:24, 4:10, 26:36] = True
    given = torch.zeros_like(bone)
    given[16:24, 54:60, 26:36] = True
    assert not ((pocket | given) & (lab != 0)).any()
    r = Renderer(_fixed(effusion_probability=1.0, **common), seed=6)
    r._effusion = lambda *_masks: pocket
    img = r.render(lab, fluid=given)
    inner_p, inner_g = img[17:23, 5:9, 27:35], img[17:23, 55:59, 27:35]
    assert abs(float(inner_p.median()) - float(inner_g.median())) < 1e-3
    assert float(inner_p.median()) > float(img[lab == 0].median()) + 0.2


def test_label_map_tissues_are_stored_for_the_renderer(tmp_path):
    """An SPL-coded map: mapped structures become training classes, the tissues the mapping
    names become TISSUE0 + i, and unnamed labels (a nerve) background."""
    src = np.zeros((40, 40, 40), np.uint8)
    src[5:20, 5:35, 5:35] = 95      # femur
    src[20:23, 5:35, 5:35] = 83     # femoral cartilage
    src[25:35, 5:35, 5:35] = 96     # tibia
    src[23:25, 10:20, 10:20] = 31   # anterior cruciate ligament
    src[23:25, 22:30, 22:30] = 9    # infrapatellar fat
    src[36:38, 5:10, 5:10] = 61     # peroneus nerve: not named
    geom = Geometry(src.shape, (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = write_volume(tmp_path / "spl_like.nii.gz", src, geom)
    out = load_label_map_canonical(path, "spl_knee_atlas", 0.5)
    values, counts = np.unique(out, return_counts=True)
    got = dict(zip(values.tolist(), counts.tolist()))
    assert got[TISSUE0 + 2] == 2 * 10 * 10 and got[TISSUE0 + 0] == 2 * 8 * 8
    assert got[C["femoral_cartilage"]] == 3 * 30 * 30
    assert set(got) == {0, C["femur"], C["tibia"], C["femoral_cartilage"], TISSUE0,
                        TISSUE0 + 2}


def test_unknown_contrast_family_is_refused():
    with pytest.raises(ValueError):
        SynthConfig(contrast_families=("flair",))


def test_renderer_plants_bml_inside_bone():
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    cfg = SynthConfig(spacing_mm=1.0, bml_probability=1.0, rotation_deg=0, elastic_mm=0,
                      scale_fraction=0, mirror_probability=0, bml_radius_mm=(3.0, 4.0))
    r = Renderer(cfg, seed=2)
    center = torch.tensor([19.5, 31.5, 31.5])
    n_found = 0
    for _ in range(4):
        _, lab = r.sample(labels, (40, 64, 64), center=center)
        bml = lab == C["bone_marrow_lesion"]
        n_found += int(bml.any())
        # every BML voxel lies where the unplanted map has femur or tibia
        base = labels[tuple(torch.nonzero(bml).T)]
        assert set(base.tolist()) <= {C["femur"], C["tibia"]}
    assert n_found >= 3


def _fixed(**over) -> SynthConfig:
    return SynthConfig(spacing_mm=1.0, rotation_deg=0, elastic_mm=0, scale_fraction=0,
                       mirror_probability=0, bml_probability=0, **over)


def _cart(lab: torch.Tensor) -> torch.Tensor:
    return ((lab == C["femoral_cartilage"]) | (lab == C["tibial_cartilage"])
            | (lab == C["patellar_cartilage"]))


@pytest.mark.parametrize("partial", [0.0, 1.0])
def test_planted_defects_remove_cartilage_and_show_fluid(partial):
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    center = torch.tensor([19.5, 31.5, 31.5])
    shape = (40, 64, 64)
    _, plain = Renderer(_fixed(), seed=3).sample(labels, shape, center=center)
    cfg = _fixed(defect_probability=1.0, defect_radius_mm=(5.0, 6.0),
                 partial_defect_fraction=partial, random_contrast_probability=0.0,
                 contrast_families=("dess",), fluid_probability=0.0, noise_std=(0.0, 0.0),
                 bias_std=0.0, gamma_std=0.0, inplane_resolution_mm=(0.5, 0.5),
                 slice_thickness_mm=(0.5, 0.5))
    img, lab = Renderer(cfg, seed=3).sample(labels, shape, center=center)
    removed = _cart(plain) & (lab == 0)
    assert removed.sum() > 30
    # only cartilage was removed, nothing else changed
    assert torch.equal(lab[~removed], plain[~removed])
    # the removed cartilage is rendered as bright fluid (DESS), not as the dark background
    bg = (plain == 0)
    assert float(img[removed].mean()) > float(img[bg].mean()) + 0.2
    bone = (plain == C["femur"]) | (plain == C["tibia"])
    touching = removed & (F.max_pool3d(bone[None, None].float(), 3, 1, 1)[0, 0] > 0)
    if partial == 1.0:  # partial defects keep the cartilage that touches bone
        assert touching.sum() == 0
    else:
        assert touching.sum() > 0


def _toy_crop_with_and_without(**over) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy knee's training labels for one crop, plain and with the settings ``over``."""
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    center = torch.tensor([19.5, 31.5, 31.5])
    shape = (40, 64, 64)
    _, plain = Renderer(_fixed(), seed=4).sample(labels, shape, center=center)
    _, lab = Renderer(_fixed(**over), seed=4).sample(labels, shape, center=center)
    return plain, lab


def test_plate_thinning_removes_the_articular_layer_only():
    plain, lab = _toy_crop_with_and_without(thinning_probability=1.0)
    before, after = int(_cart(plain).sum()), int(_cart(lab).sum())
    assert 0.4 * before < after < 0.9 * before  # one voxel of a 3-voxel-thick cap
    bone = (plain == C["femur"]) | (plain == C["tibia"])
    near_bone = F.max_pool3d(bone[None, None].float(), 3, 1, 1)[0, 0] > 0
    assert torch.equal(_cart(lab) & near_bone, _cart(plain) & near_bone)


def test_plate_thickening_adds_an_articular_layer_of_the_plates_own_class():
    plain, lab = _toy_crop_with_and_without(thickening_probability=1.0)
    before, after = int(_cart(plain).sum()), int(_cart(lab).sum())
    assert 1.1 * before < after < 1.8 * before  # one voxel on a 3-voxel-thick cap
    changed = lab != plain
    assert bool((plain[changed] == 0).all())  # only background became cartilage
    assert bool(_cart(lab)[changed].all())
    bone = (plain == C["femur"]) | (plain == C["tibia"])
    near_bone = F.max_pool3d(bone[None, None].float(), 3, 1, 1)[0, 0] > 0
    assert not bool((changed & near_bone).any())  # the bone side is untouched
    for c in ("femoral_cartilage", "tibial_cartilage"):  # each plate grows with its own class
        grown = changed & (lab == C[c])
        own = F.max_pool3d((plain == C[c])[None, None].float(), 3, 1, 1)[0, 0] > 0
        assert grown.sum() > 0 and bool(own[grown].all())


def _toy_label_crop(r: Renderer) -> torch.Tensor:
    """The toy knee's training labels on ``r``'s crop grid, before any anatomy change."""
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    grid = r._grid(labels, (40, 64, 64), torch.tensor([19.5, 31.5, 31.5]))
    return F.grid_sample(labels[None, None].float(), grid, mode="nearest",
                         align_corners=True)[0, 0].round().to(torch.uint8)


def test_thickening_never_fills_the_cartilage_a_defect_removed():
    r = Renderer(_fixed(thinning_probability=1.0, thickening_probability=1.0), seed=4)
    lab = _toy_label_crop(r)
    removed = r._thin(lab)
    added = r._thicken(lab, removed)
    assert removed.sum() > 0 and added.sum() > 0
    assert not bool((added & removed).any())


def test_effusion_reach_from_bone_is_configurable():
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    bone = (labels == C["femur"]) | (labels == C["tibia"])
    soft = _cart(labels.long())
    shares = []
    for reach in ((1.0, 1.0), (8.0, 8.0)):
        r = Renderer(_fixed(effusion_probability=1.0, effusion_mm=(30.0, 30.0),
                            effusion_bone_mm=reach), seed=3)
        pockets = r._effusion(labels.clone(), bone, soft)
        far = ~(F.max_pool3d(bone[None, None].float(), 5, 1, 2)[0, 0] > 0)  # > 2 mm away
        shares.append(int((pockets & far).sum()))
    assert shares[0] == 0 and shares[1] > 0


def test_mirroring_flips_left_right():
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    base = dict(spacing_mm=1.0, rotation_deg=0, elastic_mm=0, scale_fraction=0,
                bml_probability=0)
    center = torch.tensor([19.5, 31.5, 31.5])
    _, a = Renderer(SynthConfig(mirror_probability=0, **base), 0).sample(
        labels, (40, 64, 64), center=center)
    _, b = Renderer(SynthConfig(mirror_probability=1, **base), 0).sample(
        labels, (40, 64, 64), center=center)
    assert torch.equal(a, labels.long())
    assert torch.equal(b, torch.flip(a, dims=[0]))


def test_dice_per_class():
    t = torch.tensor([0, 1, 1, 2, 2, 2])
    p = torch.tensor([0, 1, 2, 2, 2, 0])
    d = dice_per_class(p, t, 4)
    assert d[0] == pytest.approx(2 / 3)
    assert d[1] == pytest.approx(4 / 6)
    assert np.isnan(d[2])


# ----------------------------------------------------------------------------- train


def test_training_writes_package_checkpoint_and_resumes(tmp_path):
    labels = tmp_path / "labels"
    write_toy(labels)
    out = tmp_path / "model"
    cfg = tiny_config(tmp_path)
    s1 = train(labels, out, config_path=cfg, progress=False)
    assert s1["epochs"] == 1 and s1["steps"] == 3
    assert (out / "checkpoints" / "last.pt").exists()
    log = (out / "train.log").read_text()
    assert "val mean Dice" in log and "femoral_cartilage=" in log
    m = load_model(out)  # sha256 in metadata.json matches the weights
    assert m.metadata.name == "tiny_test"
    assert json.loads((out / "metadata.json").read_text())["training"]["steps"] == 3
    cfg2 = tiny_config(tmp_path, epochs=2)
    s2 = train(labels, out, config_path=cfg2, resume=True, progress=False)
    assert s2["epochs"] == 2 and s2["steps"] == 6
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and len(ck["history"]) == 2
    # the compact copy committed between sessions resumes too, with float32 moments again
    from cartiq.segmentation.train import compact_checkpoint

    small = compact_checkpoint(out / "checkpoints" / "last.pt", tmp_path / "small.pt")
    assert small.stat().st_size < (out / "checkpoints" / "last.pt").stat().st_size
    out2 = tmp_path / "model2"
    (out2 / "checkpoints").mkdir(parents=True)
    small.replace(out2 / "checkpoints" / "last.pt")
    s3 = train(labels, out2, config_path=tiny_config(tmp_path, epochs=3), resume=True,
               progress=False)
    assert s3["epochs"] == 3 and s3["steps"] == 9
    # the last epoch's weights (not the best by validation) become a loadable package
    from cartiq.segmentation.train import export_package

    pkg = export_package(out2 / "checkpoints" / "last.pt", tmp_path / "last_pkg")
    last = torch.load(out2 / "checkpoints" / "last.pt", weights_only=False)
    m3 = load_model(pkg)
    for k, v in m3.network.state_dict().items():
        assert torch.equal(v, last["model"][k])
    meta = json.loads((pkg / "metadata.json").read_text())["training"]
    assert meta["steps"] == 9 and meta["best_val"]["epoch"] == 3 and len(meta["history"]) == 3
    with pytest.raises(InputError, match="not a cartiq training checkpoint"):
        export_package(pkg / "model.pt", tmp_path / "bad")


def test_training_is_deterministic_on_cpu(tmp_path):
    labels = tmp_path / "labels"
    write_toy(labels)
    cfg = tiny_config(tmp_path)
    train(labels, tmp_path / "a", config_path=cfg, progress=False)
    train(labels, tmp_path / "b", config_path=cfg, progress=False)
    a = torch.load(tmp_path / "a" / "model.pt")
    b = torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_training_with_images(tmp_path):
    labels = tmp_path / "labels"
    images = tmp_path / "images"
    write_toy(labels, "knee1.nii.gz")
    lab = toy_knee()
    rng = np.random.default_rng(0)
    img = (lab * 10 + rng.normal(0, 2, lab.shape)).astype(np.float32)
    images.mkdir()
    write_volume(images / "knee1.nii.gz", img,
                 Geometry(lab.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    s = train(labels, tmp_path / "sup", config_path=tiny_config(tmp_path), images_dir=images,
              progress=False)
    assert s["steps"] == 3
    (images / "knee1.nii.gz").rename(images / "other.nii.gz")
    with pytest.raises(InputError, match="no image with the stem"):
        train(labels, tmp_path / "sup2", config_path=tiny_config(tmp_path), images_dir=images,
              progress=False)


def test_training_3d_network_runs(tmp_path):
    labels = tmp_path / "labels"
    write_toy(labels)
    s = train(labels, tmp_path / "m3d", config_path=tiny_config(tmp_path, dims=3,
              iterations_per_epoch=2), progress=False)
    assert s["steps"] == 2


def test_bad_config_and_inputs(tmp_path):
    labels = tmp_path / "labels"
    write_toy(labels)
    cfg = tiny_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["network"]["out_channels"] = 3
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="out_channels"):
        train(labels, tmp_path / "x", config_path=cfg, progress=False)
    with pytest.raises(InputError, match="nothing to resume"):
        train(labels, tmp_path / "y", config_path=tiny_config(tmp_path), resume=True,
              progress=False)
    reversed_range = tiny_config(tmp_path, synth={"spacing_mm": 1.0, "crop_depth": 8,
                                                  "slice_thickness_mm": [3.0, 0.5]})
    with pytest.raises(ConfigError, match="slice_thickness_mm") as err:
        train(labels, tmp_path / "r", config_path=reversed_range, progress=False)
    assert "0 <= low <= high" in str(err.value) and "cfg.yaml" in str(err.value)
    assert not (tmp_path / "r").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label maps"):
        train(tmp_path / "empty", tmp_path / "z", config_path=tiny_config(tmp_path),
              progress=False)


def test_loss_terms_are_configurable(tmp_path):
    labels = tmp_path / "labels"
    write_toy(labels)
    weights, losses = {}, {}
    for name, over in {"default": {}, "ce_only": {"dice_weight": 0.0},
                       "dice_only": {"ce_weight": 0.0}, "batch": {"batch_dice": True}}.items():
        folder = tmp_path / name
        folder.mkdir()
        s = train(labels, folder / "m", config_path=tiny_config(folder, **over), progress=False)
        weights[name] = torch.load(folder / "m" / "model.pt")
        losses[name] = s["history"][0]["loss"]
    # untrained: cross-entropy about ln(10 classes), soft Dice loss below 1, the sum of both
    assert abs(losses["ce_only"] - np.log(len(MODEL_CLASSES))) < 0.3
    assert 0.5 < losses["dice_only"] < 1.0
    assert losses["default"] > losses["ce_only"] + 0.5
    for name in ("ce_only", "dice_only", "batch"):
        assert any(not torch.equal(weights["default"][k], weights[name][k])
                   for k in weights["default"]), name
    with pytest.raises(ConfigError, match="both 0"):
        train(labels, tmp_path / "none", config_path=tiny_config(
            tmp_path, dice_weight=0.0, ce_weight=0.0), progress=False)


# ----------------------------------------------------------------------------- 2.5D


def test_context_stack_takes_neighbours_in_slice_order():
    from cartiq.segmentation.train import context_stack

    crop = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 2, 2)
    x = context_stack(crop, torch.tensor([4, 5]), context=1, step=3)
    assert x.shape == (2, 3, 2, 2)
    assert x[:, :, 0, 0].tolist() == [[1, 4, 7], [2, 5, 8]]
    # past the crop the edge slice repeats (as at inference past the scan)
    assert context_stack(crop, torch.tensor([0, 9]), 2, 1)[:, :, 0, 0].tolist() == \
        [[0, 0, 0, 1, 2], [7, 8, 9, 9, 9]]


@pytest.mark.parametrize("slice_mm,keep,step", [(0.5, True, 1), (1.0, True, 2), (1.6, True, 3),
                                                 (3.0, True, 4), (0.2, True, 1), (3.0, False, 1)])
def test_context_step_is_the_inference_grid_spacing(tmp_path, slice_mm, keep, step):
    """Neighbours in training lie as far apart as at inference: the scan's slice spacing
    clipped to the model's range (2 mm here), on the 0.5 mm rendering grid."""
    from cartiq.segmentation.train import TrainConfig, _Batcher

    cfg = TrainConfig.model_validate({
        "network": {"name": "UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 10},
        "input": {"context_slices": 1, "keep_slice_spacing": keep,
                  "slice_spacing_range_mm": [0.5, 2.0]},
        "synth": {"spacing_mm": 0.5, "crop_depth": 12}, "slices_per_crop": 3})
    assert _Batcher(cfg, [], seed=0).context_step(slice_mm) == step


def test_renderer_reports_the_slice_thickness_it_drew():
    r = Renderer(SynthConfig(spacing_mm=1.0, slice_thickness_mm=(2.0, 2.5)), seed=3)
    lab = torch.from_numpy(to_model_classes(toy_knee()))
    r.sample(lab, (8, 32, 32))
    assert 2.0 <= r.last_slice_thickness_mm <= 2.5


@pytest.mark.parametrize("over,message", [
    ({"in_channels": 1, "context_slices": 1}, "in_channels is 1, but cartiq feeds 3"),
    ({"in_channels": 3, "context_slices": 0}, "in_channels is 3, but cartiq feeds 1"),
    ({"in_channels": 3, "context_slices": 1, "crop_depth": 5}, "crop_depth 5 is too small"),
])
def test_2p5d_config_must_fit(tmp_path, over, message):
    labels = tmp_path / "labels"
    write_toy(labels)
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["network"]["in_channels"] = over["in_channels"]
    cfg["input"]["context_slices"] = over["context_slices"]
    cfg["synth"]["crop_depth"] = over.get("crop_depth", 8)
    cfg["synth"]["slice_thickness_mm"] = [1.0, 2.0]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=message):
        train(labels, tmp_path / "m", config_path=path, progress=False)


def test_2p5d_training_from_a_1_channel_package_starts_where_it_was(tmp_path):
    """``--init`` with a 1-channel package: the 2.5D net's first layers get its weights on
    the own-slice channel and zeros on the neighbours, so before any step it computes the
    same as the package (the default model's architecture, residual units included)."""
    from cartiq.segmentation.models import NetworkSpec, build_network
    from cartiq.segmentation.train import inflate_input_channels

    spec = {"name": "UNet", "spatial_dims": 2, "out_channels": len(MODEL_CLASSES),
            "kwargs": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2}}
    torch.manual_seed(0)
    one = build_network(NetworkSpec(**spec, in_channels=1)).eval()
    three = build_network(NetworkSpec(**spec, in_channels=3)).eval()
    grown = inflate_input_channels(one.state_dict(), three.state_dict())
    assert sum(v.shape != one.state_dict()[k].shape for k, v in grown.items()) >= 2
    three.load_state_dict(grown)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(three(x), one(x[:, 1:2]), atol=1e-5)
    # and through `cartiq train --init`: one 2.5D epoch runs from the 1-channel package
    labels = tmp_path / "labels"
    write_toy(labels)
    base = tiny_config(tmp_path)
    train(labels, tmp_path / "one", config_path=base, progress=False)
    cfg = yaml.safe_load(base.read_text())
    cfg["network"]["in_channels"] = 3
    cfg["input"]["context_slices"] = 1
    cfg["synth"].update(crop_depth=8, slice_thickness_mm=[0.5, 1.0])
    path = tmp_path / "c25.yaml"
    path.write_text(yaml.safe_dump(cfg))
    s = train(labels, tmp_path / "two5", config_path=path, progress=False,
              init_weights=tmp_path / "one")
    assert s["steps"] == 3
    m = load_model(tmp_path / "two5")
    assert m.metadata.input.context_slices == 1 and m.metadata.network.in_channels == 3


def test_edge_crops_show_slices_beyond_the_knee():
    """Crops centre on the knee's structures; edge crops move the centre across the slices
    so that some show no bone at all (as at the edge of a scan's field of view).  Off by
    default, without drawing a random number: existing recipes render exactly as before."""
    lab = torch.from_numpy(to_model_classes(toy_knee()))
    bones = [C["femur"], C["tibia"]]

    def bony_share(**over):
        r = Renderer(SynthConfig(spacing_mm=1.0, elastic_mm=0.0, **over), seed=4)
        crops = [r.sample(lab, (6, 24, 24)) for _ in range(40)]
        share = np.mean([bool(np.isin(c[1].numpy(), bones).any()) for c in crops])
        return share, crops

    plain, a = bony_share()
    unused, b = bony_share(edge_crop_mm=30.0)
    edged, _ = bony_share(edge_crop_probability=1.0, edge_crop_mm=30.0)
    assert plain == 1.0 and edged < 0.8
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_plate_thickness_variety_changes_each_plate_by_its_own_drawn_layers():
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    center = torch.tensor([19.5, 31.5, 31.5])
    shape = (40, 64, 64)
    draws = []
    for seed in range(6):
        _, plain = Renderer(_fixed(), seed=seed).sample(labels, shape, center=center)
        r = Renderer(_fixed(plate_thickness_probability=1.0, plate_thickness_layers=2), seed=seed)
        _, lab = r.sample(labels, shape, center=center)
        layers = r.last_plate_layers
        assert sorted(layers) == sorted(C[c] for c in ("femoral_cartilage", "tibial_cartilage",
                                                        "patellar_cartilage"))
        assert all(-2 <= k <= 2 for k in layers.values())
        draws.append(tuple(layers.values()))
        changed = lab != plain
        # only plate voxels and background traded places
        assert bool(((plain[changed] == 0) | _cart(plain)[changed]).all())
        assert bool(((lab[changed] == 0) | _cart(lab)[changed]).all())
        bone = (plain == C["femur"]) | (plain == C["tibia"]) | (plain == C["patella"])
        near_bone = F.max_pool3d(bone[None, None].float(), 3, 1, 1)[0, 0] > 0
        assert not bool((changed & near_bone).any())  # the bone side is never touched
        for c, k in layers.items():
            before, after = plain == c, lab == c
            if int(before.sum()) == 0:
                continue
            if k == 0:
                assert torch.equal(before, after)
            elif k > 0:
                assert bool(after[before].all()) and int(after.sum()) > int(before.sum())
            else:
                assert bool(before[after].all()) and int(after.sum()) < int(before.sum())
    # the plates are varied independently: some crop has plates changed by different amounts
    assert any(len(set(d)) > 1 for d in draws)


def test_plate_thickness_variety_removes_more_with_more_layers():
    r = Renderer(_fixed(), seed=4)
    lab = _toy_label_crop(r)
    fc = C["femoral_cartilage"]
    n0 = int((lab == fc).sum())
    tc_before = lab == C["tibial_cartilage"]
    one = int(r._thin(lab, (fc,)).sum())
    two = int(r._thin(lab, (fc,)).sum())
    assert one > 0 and two > 0 and int((lab == fc).sum()) == n0 - one - two
    assert torch.equal(lab == C["tibial_cartilage"], tc_before)  # other plates untouched
    grown = r._thicken(lab, None, (C["tibial_cartilage"],))
    assert grown.sum() > 0 and bool((lab[grown] == C["tibial_cartilage"]).all())


def test_plate_thickness_variety_is_off_by_default():
    assert SynthConfig().plate_thickness_probability == 0.0
    with pytest.raises(ValueError):
        SynthConfig(plate_thickness_layers=0)


def test_decoys_lie_on_bare_bone_away_from_cartilage_and_train_as_background():
    """Decoys cover only background in a thin layer along the bones, no nearer than the
    margin to cartilage or a meniscus, never over removed cartilage, and leave the labels
    exactly as the same seed draws them without decoys."""
    r = Renderer(_fixed(decoy_probability=1.0, decoy_layers=2, decoy_margin_mm=3.0), seed=2)
    lab = _toy_label_crop(r)
    bone = (lab == C["femur"]) | (lab == C["tibia"])
    soft = _cart(lab) | (lab == C["meniscus"])
    masks = [r._decoy(lab, None) for _ in range(6)]
    assert all(int(m.sum()) > 0 for m in masks)
    assert len({int(m.sum()) for m in masks}) > 1  # depth and patches are drawn per crop
    within_2 = F.max_pool3d(bone[None, None].float(), 5, 1, 2)[0, 0] > 0
    near_soft = F.max_pool3d(soft[None, None].float(), 7, 1, 3)[0, 0] > 0  # 3 mm box
    for m in masks:
        assert bool((lab[m] == 0).all())
        assert bool(within_2[m].all())
        assert not bool((m & near_soft).any())
    removed = torch.zeros_like(bone)
    removed[masks[0].nonzero()[0].tolist()[0]] = True  # one slice of it
    assert not bool((r._decoy(lab, removed) & removed).any())
    labels = torch.from_numpy(to_model_classes(toy_knee()))
    center = torch.tensor([19.5, 31.5, 31.5])
    for seed in range(3):
        _, plain = Renderer(_fixed(), seed=seed).sample(labels, (40, 64, 64), center=center)
        _, with_d = Renderer(_fixed(decoy_probability=1.0), seed=seed).sample(
            labels, (40, 64, 64), center=center)
        assert torch.equal(plain, with_d)


@pytest.mark.parametrize("factor, same", [(1.0, True), (0.5, False)])
def test_decoys_are_drawn_at_a_fraction_of_the_cartilage_intensity(factor, same):
    common = dict(random_contrast_probability=0.0, contrast_families=("dess",),
                  noise_std=(0.0, 0.0), bias_std=0.0, gamma_std=0.0, fluid_probability=0.0,
                  cortex_probability=0.0, intensity_std=(0.0, 0.0),
                  slice_thickness_mm=(0.5, 0.5), inplane_resolution_mm=(0.5, 0.5))
    lab = torch.zeros((24, 48, 48), dtype=torch.uint8)
    lab[4:20, 4:14, 4:44] = C["femur"]
    lab[4:20, 30:36, 4:44] = C["femoral_cartilage"]
    decoy = torch.zeros_like(lab, dtype=torch.bool)
    decoy[4:20, 14:20, 4:44] = True  # on the bone, labelled background
    r = Renderer(_fixed(decoy_intensity=(factor, factor), **common), seed=1)
    img = r.render(lab, decoy=decoy)
    d, c = float(img[6:18, 16:18, 8:40].median()), float(img[6:18, 32:34, 8:40].median())
    if same:
        assert abs(d - c) < 1e-3
    else:
        assert d < c - 0.1


def test_decoys_are_off_by_default_and_checked():
    assert SynthConfig().decoy_probability == 0.0
    with pytest.raises(ValueError):
        SynthConfig(decoy_layers=0)
    with pytest.raises(ValueError):
        SynthConfig(decoy_probability=1.5)
    for bad in ((1.0, 0.5), (-0.2, 0.5)):  # every (low, high) range is ordered, non-negative
        with pytest.raises(ValueError, match="0 <= low <= high"):
            SynthConfig(decoy_intensity=bad)


def test_the_log_names_validation_maps_as_such(tmp_path):
    labels, held_out = tmp_path / "labels", tmp_path / "held_out"
    write_toy(labels)
    write_toy(held_out, name="other_knee.nii.gz")
    out = tmp_path / "model"
    train(labels, out, config_path=tiny_config(tmp_path), val_labels_dir=held_out,
          progress=False)
    log = (out / "train.log").read_text()
    assert "training map toy.nii.gz" in log
    assert "validation map other_knee.nii.gz" in log
    assert "training map other_knee.nii.gz" not in log


def test_resample_crop_keeps_positions_linear_and_labels_nearest():
    from cartiq.segmentation.train import resample_crop

    # a fine crop (ratio 1.5) whose image is each voxel's offset from the centre along the
    # last axis, in coarse voxels; labels: 1 where that offset is positive
    shape, ratio = (6, 10, 12), 1.5
    fine = tuple(round(n * ratio) for n in shape)
    off = (torch.arange(fine[2], dtype=torch.float32) - (fine[2] - 1) / 2) / ratio
    img = off.expand(fine).clone()
    lab = (img > 0).to(torch.uint8)
    out_img, out_lab = resample_crop(img, lab, shape, ratio)
    want = (torch.arange(shape[2], dtype=torch.float32) - (shape[2] - 1) / 2).expand(shape)
    assert out_img.shape == shape and out_lab.shape == shape and out_lab.dtype == torch.uint8
    assert torch.allclose(out_img, want, atol=1e-5)  # linear of a linear ramp is exact
    assert torch.equal(out_lab, (want > 0).to(torch.uint8))
    # ratio 1: the crop itself
    same_img, same_lab = resample_crop(img, lab, fine, 1.0)
    assert torch.allclose(same_img, img, atol=1e-5) and torch.equal(same_lab, lab)


def test_render_spacing_renders_finer_and_gives_crops_on_the_model_grid(tmp_path):
    from cartiq.segmentation.train import TrainConfig, _Batcher, _load_samples

    labels = tmp_path / "labels"
    write_toy(labels, spacing=(0.5, 0.5, 0.5))
    base = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg = TrainConfig(**{**base, "synth": {"spacing_mm": 1.0, "render_spacing_mm": 0.5,
                                           "crop_depth": 8}})
    samples = _load_samples(labels, None, cfg)
    assert tuple(samples[0].labels.shape) == (40, 64, 64)  # loaded at 0.5 mm, not 1.0
    b = _Batcher(cfg, samples, seed=0)
    assert b.renderer.cfg.spacing_mm == 0.5  # the renderer converts mm on its own grid
    img, lab, _ = b._one(samples[0])
    assert tuple(img.shape) == (8, 32, 32) == tuple(lab.shape)
    x, y = b.batch()
    assert x.shape == (2, 1, 32, 32) and y.shape == (2, 1, 32, 32)
    with pytest.raises(ValidationError, match="must be finer"):
        TrainConfig(**{**base, "synth": {"spacing_mm": 1.0, "render_spacing_mm": 1.0}})


def test_training_with_a_finer_render_grid_runs(tmp_path):
    labels = tmp_path / "labels"
    write_toy(labels, spacing=(0.5, 0.5, 0.5))
    cfg = tiny_config(tmp_path, synth={"spacing_mm": 1.0, "render_spacing_mm": 0.5,
                                       "crop_depth": 8})
    s = train(labels, tmp_path / "m", config_path=cfg, progress=False)
    assert s["steps"] == 3 and load_model(tmp_path / "m").metadata.name == "tiny_test"
