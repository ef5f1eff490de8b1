"""Anatomical constraints after the network (cartiq.segmentation.post) on synthetic label arrays.

A phantom label map is turned into model outputs (tibial cartilage and menisci without a
medial/lateral distinction), broken in one anatomical way, cleaned, and checked.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cartiq.io.labels import default_scheme
from cartiq.segmentation.post import (CARTILAGE_BAND_MM, FEMUR_BELOW_PLATEAU_MM,
                                     check_medial_lateral, clean_prediction,
                                      shell_outside_fraction)
from cartiq.segmentation.synth import MODEL_CLASSES

S = default_scheme()
M = {n: i for i, n in enumerate(MODEL_CLASSES)}
LABELS = {i: n for i, n in enumerate(MODEL_CLASSES) if n != "background"}


@pytest.fixture(scope="module")
def phantom():
    from cartiq.data.phantom import PhantomSpec, make_phantom

    return make_phantom(PhantomSpec(seed=5, spacing_mm=(0.8, 0.8, 1.2)))


@pytest.fixture
def raw(phantom):
    """The phantom's labels as model outputs."""
    lab = phantom.labels.array
    out = np.zeros(lab.shape, np.uint8)
    for name, value in M.items():
        if name != "background" and name in S.labels:
            out[lab == S[name]] = value
    out[np.isin(lab, [S["medial_tibial_cartilage"], S["lateral_tibial_cartilage"]])] = \
        M["tibial_cartilage"]
    out[np.isin(lab, [S["medial_meniscus"], S["lateral_meniscus"]])] = M["meniscus"]
    return out


def clean(raw, phantom):
    return clean_prediction(raw, phantom.labels.geometry, LABELS, 20.0)


def dist_to(mask, geom):
    return ndimage.distance_transform_edt(~mask, sampling=geom.spacing)


def test_clean_phantom_is_kept(raw, phantom):
    out = clean(raw, phantom)
    for name in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage", "meniscus",
                 "bone_marrow_lesion"):
        assert (out == M[name]).sum() == (raw == M[name]).sum(), name


def test_cartilage_only_in_a_band_along_its_own_bone(raw, phantom):
    g = phantom.labels.geometry
    d = dist_to(raw == M["femur"], g)
    fc = raw == M["femoral_cartilage"]
    # a tongue of "cartilage" grown from the plate into soft tissue, 20 mm out
    tongue = np.zeros_like(fc)
    grown = fc.copy()
    for _ in range(40):
        grown = ndimage.binary_dilation(grown) & ((raw == 0) | grown) & (d < 20)
    tongue = grown & ~fc & (raw == 0)
    assert (d[tongue] > CARTILAGE_BAND_MM).sum() > 500  # part of it beyond the band
    broken = raw.copy()
    broken[tongue] = M["femoral_cartilage"]
    out = clean(broken, phantom)
    kept = out == M["femoral_cartilage"]
    assert not (kept & (d > CARTILAGE_BAND_MM)).any()
    assert (kept & fc).sum() == fc.sum()  # the plate itself is untouched


def test_menisci_only_between_femur_and_tibia(raw, phantom):
    g = phantom.labels.geometry
    dt, df = dist_to(raw == M["tibia"], g), dist_to(raw == M["femur"], g)
    # meniscus-labelled voxels along the tibial shaft: on the tibia, far below the femur
    shaft = (raw == 0) & (dt < 2.0) & (df > 25.0)
    assert shaft.sum() > 200
    broken = raw.copy()
    broken[shaft] = M["meniscus"]
    out = clean(broken, phantom)
    assert not (out[shaft] == M["meniscus"]).any()
    assert (out == M["meniscus"]).sum() == (raw == M["meniscus"]).sum()


def test_bml_only_inside_bone(raw, phantom):
    g = phantom.labels.geometry
    femur = raw == M["femur"]
    # a lesion enclosed by the femur is kept; a lesion lying on its outer surface is not
    inner = ndimage.binary_erosion(femur, iterations=6)
    c = np.argwhere(inner)[len(np.argwhere(inner)) // 2]
    ball = np.zeros_like(femur)
    ball[tuple(slice(max(0, v - 4), v + 5) for v in c)] = True
    ball &= inner
    d = dist_to(femur, g)
    shell = (raw == 0) & (d > 0) & (d <= 2.5)
    idx = np.argwhere(shell)
    patch = np.zeros_like(shell)
    lo = idx[len(idx) // 3]
    patch[tuple(slice(v - 8, v + 9) for v in lo)] = True
    patch &= shell
    assert ball.sum() > 100 and patch.sum() > 100
    broken = raw.copy()
    broken[ball | patch] = M["bone_marrow_lesion"]
    out = clean(broken, phantom)
    assert (out[ball] == M["bone_marrow_lesion"]).all()
    assert not (out[patch] == M["bone_marrow_lesion"]).any()
    assert ((out == M["bone_marrow_lesion"]) & (raw == M["bone_marrow_lesion"])).sum() == \
        (raw == M["bone_marrow_lesion"]).sum()  # the phantom's own lesion stays


def test_femur_only_above_the_tibial_plateau():
    """A false piece of "femur" hanging from the condyles down beside the tibia (what the
    default model draws at the field of view's edge) is cut at 10 mm below the plateau's
    lowest cartilage; the real femur is untouched."""
    from cartiq.io.volume import Geometry

    g = Geometry((70, 60, 80), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    raw = np.zeros(g.shape, np.uint8)  # index k is patient z (superior): LPS
    raw[10:50, 10:50, 0:30] = M["tibia"]
    raw[10:50, 10:50, 30:32] = M["tibial_cartilage"]
    raw[10:50, 10:50, 34:80] = M["femur"]
    raw[50:58, 25:35, 5:40] = M["femur"]  # touches the femur at z 34-39, beside the tibia
    out = clean_prediction(raw, g, LABELS, 20.0)
    limit = 30 - FEMUR_BELOW_PLATEAU_MM  # the lowest tibial cartilage is at z = 30
    assert (out[10:50, 10:50, 34:80] == M["femur"]).all()
    piece = out[50:58, 25:35, 5:40] == M["femur"]
    assert not piece[:, :, : int(limit) - 5].any() and piece[:, :, int(limit) - 5:].all()
    assert (out == M["tibia"]).sum() == (raw == M["tibia"]).sum()


def _patella_scene(flip_y: bool):
    """A femur, a small true patella in front of it (LPS -y) and a larger false "patella"
    behind it with more "patellar cartilage" on it; ``flip_y`` stores the array with its
    second axis pointing anterior, so only the world geometry tells front from back."""
    from cartiq.io.volume import Geometry

    raw = np.zeros((40, 80, 40), np.uint8)
    raw[5:35, 25:45, 5:35] = M["femur"]
    raw[12:28, 8:16, 12:28] = M["patella"]            # 2,048 mm3, anterior
    raw[12:28, 16:18, 12:28] = M["patellar_cartilage"]
    raw[8:32, 52:70, 8:32] = M["patella"]             # 10,368 mm3, in the popliteal fossa
    raw[8:32, 48:52, 8:32] = M["patellar_cartilage"]
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    if flip_y:
        raw = raw[:, ::-1].copy()
        direction = (1, 0, 0, 0, -1, 0, 0, 0, 1)
    return raw, Geometry(raw.shape, (1.0, 1.0, 1.0), (0, 0, 0), direction)


@pytest.mark.parametrize("flip_y", [False, True])
def test_patella_is_chosen_in_front_of_the_femur(flip_y):
    """The true patella is kept although the false one behind the femur is larger and
    carries more cartilage (what the 0.4 mm arm drew on the real qDESS)."""
    raw, g = _patella_scene(flip_y)
    out = clean_prediction(raw, g, LABELS, 20.0)
    true = np.zeros(raw.shape, bool)
    true[12:28, 8:16, 12:28] = True
    if flip_y:
        true = true[:, ::-1]
    assert ((out == M["patella"]) == true).all()


def test_patella_behind_the_femur_only_falls_back_to_its_cartilage():
    """With no candidate in front of the femur the constraint chooses nothing: the
    component the cartilage lies on is kept, as before."""
    raw, g = _patella_scene(False)
    raw[:, :25] = 0  # no true patella
    raw[8:32, 72:76, 8:32] = M["patella"]  # a small second piece, also behind
    out = clean_prediction(raw, g, LABELS, 20.0)
    assert (out[8:32, 52:70, 8:32] == M["patella"]).all()
    assert not (out[8:32, 72:76, 8:32] == M["patella"]).any()


@pytest.mark.parametrize("sample,mapping,side", [
    ("pymskt_dess_labels", "pymskt_dess", "right"),
    ("mskt_right_knee_labels", "pymskt_dess", "right"),
    ("mskt_t2_left_knee_labels", "pymskt_dess", "left"),
    ("spl_knee_atlas_labels", "spl_knee_atlas", "left"),
])
def test_real_maps_keep_their_whole_femur(sample, mapping, side, data_mirror, tmp_path):
    from cartiq.data.fetch import fetch_sample
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.io.volume import read_volume
    from cartiq.segmentation.synth import to_model_classes

    path = fetch_sample(sample, mirror=data_mirror, cache_dir=tmp_path)
    vol = read_volume(path, kind="labels")
    cart, _ = to_default_scheme(vol.array, load_mapping(mapping), vol.geometry.affine,
                                side=side, path=path)
    model = to_model_classes(cart, None)
    out = clean_prediction(model, vol.geometry, LABELS, 20.0)
    assert (out == M["femur"]).sum() == (model == M["femur"]).sum()


def test_small_detached_islands_are_removed(raw, phantom):
    g = phantom.labels.geometry
    d = dist_to(raw == M["tibia"], g)
    spot = np.argwhere((raw == 0) & (d > 1.0) & (d < 1.6))[0]
    broken = raw.copy()
    broken[tuple(slice(v, v + 2) for v in spot)] = M["tibial_cartilage"]  # ~6 mm3, detached
    out = clean(broken, phantom)
    assert (out == M["tibial_cartilage"]).sum() == (raw == M["tibial_cartilage"]).sum()


def test_shell_outside_fraction():
    ctx = np.zeros((20, 20, 20), np.uint8)
    ctx[2:18, 2:18, 2:18] = 1  # "bone"
    inside = np.zeros(ctx.shape, bool)
    inside[8:11, 8:11, 8:11] = True
    outside = np.zeros(ctx.shape, bool)
    outside[0:2, 5:9, 5:9] = True  # in the air against the bone's face
    ctx[inside] = 2
    _, n, frac = shell_outside_fraction(inside | outside, ctx, [1, 2])
    assert n == 2 and sorted(np.round(frac[1:], 2)) == [0.0, pytest.approx(0.8, abs=0.2)]


def test_medial_lateral_split_checked_against_the_side(phantom):
    lab = phantom.labels.array.copy()
    g = phantom.labels.geometry
    assert check_medial_lateral(lab, g, "right")["relabelled_voxels"] == {}
    med, lat = lab == S["medial_tibial_cartilage"], lab == S["lateral_tibial_cartilage"]
    mm, lm = lab == S["medial_meniscus"], lab == S["lateral_meniscus"]
    swapped = lab.copy()
    swapped[lm] = S["medial_meniscus"]  # the lateral meniscus labelled medial
    info = check_medial_lateral(swapped, g, "right")
    assert info["checked"] and info["relabelled_voxels"] == {"medial_meniscus": int(lm.sum())}
    assert np.array_equal(swapped, lab)
    # with the opposite side every plate and meniscus is on the wrong side
    other = lab.copy()
    info = check_medial_lateral(other, g, "left")
    assert (other[med] == S["lateral_tibial_cartilage"]).all()
    assert (other[lat] == S["medial_tibial_cartilage"]).all()
    assert (other[mm] == S["lateral_meniscus"]).all()
    assert check_medial_lateral(lab.copy(), g, None) == {"checked": False, "relabelled_voxels": {}}


def test_intensity_bml_detector_searches_marrow_only():
    """A lesion label lying on the bone's outer surface (bright soft tissue) is not marrow."""
    from cartiq.segmentation.bml import detect_bml

    sp = (0.5, 0.5, 0.5)
    shape = (120, 120, 120)
    g = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij"), -1)
    r = np.sqrt(((g - 30.0) ** 2).sum(-1))
    lab = np.where(r < 20, S["femur"], 0).astype(np.uint8)
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, shape).astype(np.float32)
    img[lab == 0] = rng.normal(40, 10, int((lab == 0).sum()))
    cap = (r >= 20) & (r < 26) & (g[..., 0] > 44)  # a thick cap on the bone's outer surface
    lab[cap] = S["bone_marrow_lesion"]
    img[cap] = 300.0  # bright fluid
    found = detect_bml(img, lab, sp)
    assert not (found & cap).any()
    inner = (r < 5)
    img[inner] += 150.0  # a real lesion inside the marrow is still found
    found = detect_bml(img, lab, sp)
    assert (found & inner).sum() > 0.5 * inner.sum() and not (found & cap).any()
