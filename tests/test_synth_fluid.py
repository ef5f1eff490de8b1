"""The renderer's joint fluid on the plates: the film's thickness and the cartilage/fluid
contrast of a family, both drawn per crop from configured ranges."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from cartiq.segmentation.synth import _PLATES, FLUID, MODEL_CLASSES, Renderer, SynthConfig

C = {n: i for i, n in enumerate(MODEL_CLASSES)}
# no noise, bias, gamma, jitter or blur: every rendering class is one grey level
FLAT = dict(spacing_mm=1.0, rotation_deg=0, elastic_mm=0, scale_fraction=0,
            mirror_probability=0, bml_probability=0, random_contrast_probability=0.0,
            contrast_families=("t2",), noise_std=(0.0, 0.0), bias_std=0.0, gamma_std=0.0,
            cortex_probability=0.0, intensity_std=(0.0, 0.0),
            slice_thickness_mm=(0.5, 0.5), inplane_resolution_mm=(0.5, 0.5))


def _film_depth(voxels: tuple[int, int], seed: int) -> int:
    """Voxels of fluid grey above a cartilage slab (the film's thickness in this crop)."""
    lab = torch.zeros((12, 40, 12), dtype=torch.uint8)
    lab[:, 20:26, :] = C["femoral_cartilage"]
    r = Renderer(SynthConfig(fluid_probability=1.0, fluid_film_voxels=voxels, **FLAT), seed=seed)
    img = r.render(lab)
    column = img[6, :, 6]
    fluid = column[19]  # the voxel on the slab is always film (thickness >= 1)
    assert float(fluid) > float(column[22]) + 0.3  # t2: fluid far brighter than cartilage
    depth = 0
    while abs(float(column[19 - depth]) - float(fluid)) < 0.05:  # a trace of blur
        depth += 1
    return depth


@pytest.mark.parametrize("voxels", [(1, 1), (2, 2), (3, 3)])
def test_the_film_is_as_thick_as_configured(voxels):
    assert {_film_depth(voxels, seed) for seed in range(3)} == {voxels[0]}


def test_the_film_thickness_is_drawn_per_crop_from_its_range():
    depths = {_film_depth((1, 3), seed) for seed in range(16)}
    assert depths == {1, 2, 3}


@pytest.mark.parametrize("bad", [(0, 2), (3, 1), (-1, 1)])
def test_film_ranges_below_one_voxel_or_reversed_are_refused(bad):
    with pytest.raises(ValidationError, match="voxel range"):
        SynthConfig(fluid_film_voxels=bad)


def _plates_over_fluid(cfg: SynthConfig, seed: int, n: int = 200) -> torch.Tensor:
    r = Renderer(cfg, seed=seed)
    out = []
    for _ in range(n):
        mu, _fam = r._means()
        out.append(mu[list(_PLATES)].mean() / mu[FLUID])
    return torch.stack(out)


def test_the_cartilage_fluid_ratio_is_drawn_from_the_family_range():
    base = dict(random_contrast_probability=0.0, contrast_families=("dess",))
    own = _plates_over_fluid(SynthConfig(**base), seed=0)
    assert float(own.max()) > 0.9  # the dess family's own ranges: cartilage near fluid
    ratio = _plates_over_fluid(SynthConfig(cartilage_fluid_ratio={"dess": (0.3, 0.5)}, **base),
                               seed=0)
    # each plate keeps its +-0.05 jitter around the common mean (cartilage 0.5-0.8)
    assert 0.27 < float(ratio.min()) and float(ratio.max()) < 0.53
    assert float(ratio.max() - ratio.min()) > 0.15  # drawn per crop, not fixed


def test_families_not_named_keep_their_own_means():
    others = dict(random_contrast_probability=0.0, contrast_families=("pdfs", "t1", "t2"))
    a = Renderer(SynthConfig(**others), seed=3)
    b = Renderer(SynthConfig(cartilage_fluid_ratio={"dess": (0.3, 0.5)}, **others), seed=3)
    for _ in range(20):  # the same random stream, the same means
        assert torch.equal(a._means()[0], b._means()[0])
    c = Renderer(SynthConfig(cartilage_fluid_ratio={"t1": (2.0, 2.5)}, **others), seed=3)
    a = Renderer(SynthConfig(**others), seed=3)
    assert any(not torch.equal(a._means()[0], c._means()[0]) for _ in range(20))


def test_an_unknown_family_in_the_ratio_is_refused():
    with pytest.raises(ValidationError):
        SynthConfig(cartilage_fluid_ratio={"flair": (0.3, 0.5)})


def _bone_means(cfg: SynthConfig, seed: int, n: int = 200) -> torch.Tensor:
    r = Renderer(cfg, seed=seed)
    return torch.stack([r._means()[0][C["femur"]] for _ in range(n)])


def test_a_family_range_replaces_the_family_own():
    base = dict(random_contrast_probability=0.0, contrast_families=("dess",))
    own = _bone_means(SynthConfig(**base), seed=0)
    assert float(own.min()) > 0.15  # dess marrow 0.2-0.45, each bone jittered by 0.04
    dark = _bone_means(SynthConfig(family_ranges={"dess": {"bone": (0.03, 0.1)}}, **base),
                       seed=0)
    assert float(dark.max()) < 0.15 and float(dark.min()) < 0.06
    # the other classes of that family are drawn as before (same stream, same draws)
    a, b = Renderer(SynthConfig(**base), seed=1), Renderer(
        SynthConfig(family_ranges={"dess": {"bone": (0.03, 0.1)}}, **base), seed=1)
    for _ in range(10):
        ma, mb = a._means()[0], b._means()[0]
        assert torch.equal(ma[FLUID], mb[FLUID]) and torch.equal(ma[list(_PLATES)],
                                                                    mb[list(_PLATES)])
        assert not torch.equal(ma[C["femur"]], mb[C["femur"]])


def test_family_ranges_leave_other_families_alone():
    others = dict(random_contrast_probability=0.0, contrast_families=("pdfs", "t1", "t2"))
    a = Renderer(SynthConfig(**others), seed=3)
    b = Renderer(SynthConfig(family_ranges={"dess": {"bone": (0.03, 0.1)}}, **others), seed=3)
    for _ in range(20):
        assert torch.equal(a._means()[0], b._means()[0])


def test_a_family_range_reaches_the_named_tissues():
    base = dict(random_contrast_probability=0.0, contrast_families=("t1",))
    r = Renderer(SynthConfig(family_ranges={"t1": {"fat": (0.0, 0.05)}}, **base), seed=0)
    for _ in range(20):
        _mu, fam = r._means()
        assert float(r._tissue_means(fam)[0]) <= 0.05  # fat: RENDER_TISSUES[0]


@pytest.mark.parametrize("bad", [{"flair": {"bone": (0.1, 0.2)}}, {"dess": {"bg": (0.1, 0.2)}},
                                 {"dess": {"bone": (0.4, 0.2)}}])
def test_unknown_or_reversed_family_ranges_are_refused(bad):
    with pytest.raises(ValidationError):
        SynthConfig(family_ranges=bad)
