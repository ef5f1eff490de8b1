"""Label scheme and mappings (pipeline/labels.py, configs/label_maps/*.yaml) on the real maps.

pymskt DESS: a RIGHT knee with a fibula label; SPL Knee Atlas: a LEFT knee with soft-tissue
labels (SOURCES.md).  The automatic medial/lateral split of a single tibial-cartilage label
(OAI-ZIB style) is checked against the original two-label assignment.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cartiq.errors import ConfigError, InputError
from cartiq.data.fetch import fetch_sample
from cartiq.io.volume import read_volume
from cartiq.io.labels import (available_mappings, default_scheme, infer_side, lateral_sign,
                             load_mapping, to_default_scheme)

S = default_scheme()
# source label values of the real maps (from SOURCES.md)
PYMSKT = {"femoral_cartilage": 1, "medial_tibial_cartilage": 2, "lateral_tibial_cartilage": 3,
          "patellar_cartilage": 4, "femur": 5, "tibia": 6, "patella": 7, "fibula": 8,
          "lateral_meniscus": 9, "medial_meniscus": 10}
SPL = {"lateral_meniscus": 81, "medial_meniscus": 82, "femoral_cartilage": 83,
       "lateral_tibial_cartilage": 84, "medial_tibial_cartilage": 85, "patellar_cartilage": 86,
       "femur": 95, "tibia": 96, "fibula": 97, "patella": 98}


@pytest.fixture(scope="module")
def pymskt(data_mirror, tmp_path_factory):
    cache = tmp_path_factory.mktemp("samples")
    return read_volume(fetch_sample("pymskt_dess_labels", mirror=data_mirror, cache_dir=cache),
                       kind="labels")


@pytest.fixture(scope="module")
def spl(data_mirror, tmp_path_factory):
    cache = tmp_path_factory.mktemp("samples")
    return read_volume(fetch_sample("spl_knee_atlas_labels", mirror=data_mirror,
                                    cache_dir=cache), kind="labels")


def _lut(source: dict[str, int]) -> np.ndarray:
    """Source value -> expected cartiq value (0 for the fibula and anything unnamed)."""
    lut = np.zeros(256, np.uint8)
    for name, value in source.items():
        lut[value] = S[name] if name in S.labels else 0
    return lut


def _agreement(out: np.ndarray, src: np.ndarray, medial: int, lateral: int) -> float:
    """Fraction of the source tibial-cartilage voxels given the same side after a split."""
    ok = ((out == S["medial_tibial_cartilage"]) & (src == medial)).sum() \
        + ((out == S["lateral_tibial_cartilage"]) & (src == lateral)).sum()
    return float(ok) / float(np.isin(src, [medial, lateral]).sum())


def test_scheme_and_shipped_mappings():
    assert [S[n] for n in ("background", "femur", "tibia", "patella", "femoral_cartilage",
                           "medial_tibial_cartilage", "lateral_tibial_cartilage",
                           "patellar_cartilage", "medial_meniscus", "lateral_meniscus",
                           "bone_marrow_lesion")] == list(range(11))
    assert {"cartiq", "oai_zib", "pymskt_dess", "spl_knee_atlas"} <= set(available_mappings())
    assert load_mapping("pymskt_dess").map == {v: k for k, v in PYMSKT.items()}
    assert load_mapping("spl_knee_atlas").map == {v: k for k, v in SPL.items()}
    assert load_mapping("oai_zib").map == {1: "femur", 2: "femoral_cartilage", 3: "tibia",
                                           4: "tibial_cartilage"}
    assert lateral_sign("right") == -1.0 and lateral_sign("left") == 1.0


def test_pymskt_right_knee_side_from_labels_and_from_fibula(pymskt):
    src, aff = pymskt.array, pymskt.geometry.affine
    out, info = to_default_scheme(src, load_mapping("pymskt_dess"), aff)
    assert info["side"] == "right" and info["side_source"] == "anatomy:fibula"
    assert [e["source"] for e in info["side_check"]["evidence"]] == ["anatomy:fibula",
                                                                    "anatomy:plates"]
    np.testing.assert_array_equal(out, _lut(PYMSKT)[src])  # fibula -> background
    # the fibula alone (no medial/lateral labels) must give the same side
    no_ml = np.where(np.isin(out, [S["medial_tibial_cartilage"],
                                   S["lateral_tibial_cartilage"]]), 0, out)
    assert infer_side(no_ml, aff, fibula=src == PYMSKT["fibula"]) == ("right", "anatomy:fibula")
    # a given side the anatomy contradicts stops, unless overridden
    assert infer_side(out, aff, side="right") == ("right", "flag")
    with pytest.raises(InputError, match="--side says left but the anatomy says right"):
        infer_side(out, aff, side="left")
    with pytest.raises(InputError, match="DICOM header says left but the anatomy says right"):
        infer_side(out, aff, header_side="left")
    assert infer_side(out, aff, side="left", override=True) == ("left", "flag")


def test_spl_left_knee_soft_tissue_becomes_background(spl):
    src, aff = spl.array, spl.geometry.affine
    out, info = to_default_scheme(src, load_mapping("spl_knee_atlas"), aff)
    assert info["side"] == "left" and info["side_source"] == "anatomy:fibula"
    assert out.dtype == np.uint8 and set(np.unique(out)) == set(range(10))
    np.testing.assert_array_equal(out, _lut(SPL)[src])  # everything else -> background
    soft = np.ones(int(src.max()) + 1, bool)
    soft[[0, *SPL.values()]] = False
    assert soft[src].sum() > 1_000_000  # the soft tissues really were there
    assert {12, 31, 32, 71} <= set(info["dropped_labels"])  # muscles, cruciates, artery
    assert not set(info["dropped_labels"]) & set(SPL.values())
    no_ml = np.where(np.isin(out, [S["medial_tibial_cartilage"],
                                   S["lateral_tibial_cartilage"]]), 0, out)
    assert infer_side(no_ml, aff, fibula=src == SPL["fibula"]) == ("left", "anatomy:fibula")


def test_spl_rendered_tissues_match_the_atlas_colour_table(spl, data_mirror, tmp_path):
    """The tissues the training renderer draws for the SPL atlas are what its own colour
    table calls them, every one is present in the map, and none is a measured structure."""
    tissues = load_mapping("spl_knee_atlas").tissues
    ctbl = fetch_sample("spl_knee_atlas_colors", mirror=data_mirror, cache_dir=tmp_path)
    names = {int(line.split()[0]): line.split()[1] for line in ctbl.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    words = {"fat": ("fat",), "muscle": ("muscle",), "ligament": ("ligament", "tendon", "tract"),
             "vessel": ("artery", "vein")}
    for value, tissue in tissues.items():
        assert any(w in names[value] for w in words[tissue]), (value, names[value], tissue)
    assert {31, 32} <= {v for v, t in tissues.items() if t == "ligament"}  # the cruciates
    assert tissues[9] == "fat" and "infrapatellar" in names[9]
    assert set(tissues) <= set(np.unique(spl.array).tolist())
    assert not set(tissues) & set(SPL.values())


def _as_oai_zib(src: np.ndarray) -> np.ndarray:
    oai = np.zeros(src.shape, np.uint8)
    for name, value in (("femur", 1), ("femoral_cartilage", 2), ("tibia", 3)):
        oai[src == PYMSKT[name]] = value
    oai[np.isin(src, [PYMSKT["medial_tibial_cartilage"], PYMSKT["lateral_tibial_cartilage"]])] = 4
    return oai


def test_oai_zib_single_tibial_label_split_recovers_medial_lateral(pymskt):
    src, aff = pymskt.array, pymskt.geometry.affine
    oai = _as_oai_zib(src)
    out, info = to_default_scheme(oai, load_mapping("oai_zib"), aff, side="right")
    assert info["tibial_split"] and info["side_source"] == "flag"
    assert _agreement(out, src, PYMSKT["medial_tibial_cartilage"],
                      PYMSKT["lateral_tibial_cartilage"]) > 0.95
    # the wrong side swaps the plates: the split really uses the side
    wrong, _ = to_default_scheme(oai, load_mapping("oai_zib"), aff, side="left",
                                 side_override=True)
    assert _agreement(wrong, src, PYMSKT["medial_tibial_cartilage"],
                      PYMSKT["lateral_tibial_cartilage"]) < 0.05
    # ...and without --side-override the femur's shape stops it
    with pytest.raises(InputError, match="--side says left but the anatomy says right "
                                         r"\(anatomy:bone shape"):
        to_default_scheme(oai, load_mapping("oai_zib"), aff, side="left")
    # no side: the femur's shape decides
    _, info = to_default_scheme(oai, load_mapping("oai_zib"), aff)
    assert (info["side"], info["side_source"]) == ("right", "anatomy:bone shape")
    # no side, no header, no fibula, no femur: a clear error, not a guess
    oai[oai == 1] = 0
    with pytest.raises(InputError, match="cannot tell the knee side.*--side") as info:
        to_default_scheme(oai, load_mapping("oai_zib"), aff, path=pymskt.path)
    assert str(pymskt.path) in str(info.value)


def test_false_femur_piece_is_no_side_evidence(pymskt):
    """A model can add a narrow piece of "femur" below the condyles (0.4.0 on the phantom):
    measured naively the shaft then "leans" 40 mm and the piece's lower half looks like a
    medial condyle, i.e. a confident wrong side.  It has no femur's shape, so it is no
    evidence: without a side the map is refused, and a given side stands."""
    src, aff = pymskt.array, pymskt.geometry.affine
    oai = _as_oai_zib(src)
    _, info = to_default_scheme(oai, load_mapping("oai_zib"), aff)
    assert (info["side"], info["side_source"]) == ("right", "anatomy:bone shape")
    fem = np.argwhere(oai == 1) @ aff[:3, :3].T + aff[:3, 3]
    z_lo = np.percentile(fem[:, 2], 0.5)
    low = fem[fem[:, 2] < z_lo + 25]
    cx, cy = low[:, 0].mean(), low[:, 1].mean()
    # a 10 mm wide block 40 mm to the -x side, 30-35 mm below the condyles, its -x half lower
    x, y, z = np.meshgrid(np.arange(cx - 45, cx - 35, 0.3), np.arange(cy - 5, cy + 5, 0.3),
                          np.arange(z_lo - 35, z_lo, 0.3), indexing="ij")
    keep = (z >= z_lo - 30) | (x < cx - 40)
    world = np.stack([x[keep], y[keep], z[keep]], axis=1)
    idx = np.round((world - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T).astype(int)
    inside = np.all((idx >= 0) & (idx < oai.shape), axis=1)
    assert inside.mean() > 0.9
    oai[tuple(idx[inside].T)] = 1
    with pytest.raises(InputError, match="cannot tell the knee side"):
        to_default_scheme(oai, load_mapping("oai_zib"), aff)
    _, info = to_default_scheme(oai, load_mapping("oai_zib"), aff, side="right")
    assert info["side"] == "right" and info["side_check"]["anatomy"] is None


@pytest.mark.parametrize("edge", [5, 95])
def test_condyle_step_no_condyle_has_is_no_side_evidence(pymskt, edge):
    """What a trimmed false piece leaves: a 10 mm stub hanging 15 mm below one condyle's
    edge.  A medial condyle reaches at most a few mm lower (the real maps: 2.9-8.0 mm), so a
    15 mm step is no evidence, on either side (before the bound, the stub under the medial
    condyle gave this right knee's side by luck)."""
    src, aff = pymskt.array, pymskt.geometry.affine
    oai = _as_oai_zib(src)
    fem = np.argwhere(oai == 1) @ aff[:3, :3].T + aff[:3, 3]
    z_lo = np.percentile(fem[:, 2], 0.5)
    low = fem[fem[:, 2] < z_lo + 25]
    x0, cy = np.percentile(low[:, 0], edge), low[:, 1].mean()
    x, y, z = np.meshgrid(np.arange(x0 - 5, x0 + 5, 0.3), np.arange(cy - 5, cy + 5, 0.3),
                          np.arange(z_lo - 15, z_lo + 3, 0.3), indexing="ij")
    world = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    idx = np.round((world - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T).astype(int)
    oai[tuple(idx.T)] = 1
    with pytest.raises(InputError, match="cannot tell the knee side"):
        to_default_scheme(oai, load_mapping("oai_zib"), aff)


def test_tibial_split_with_touching_plates_and_side_from_fibula(pymskt, tmp_path):
    """One connected tibial label (plates bridged) falls back to the sparsest-plane split;
    the side comes from a fibula label of a user mapping file."""
    src, aff = pymskt.array, pymskt.geometry.affine
    oai = _as_oai_zib(src)
    oai[src == PYMSKT["fibula"]] = 8
    c_med = np.argwhere(src == PYMSKT["medial_tibial_cartilage"]).mean(axis=0)
    c_lat = np.argwhere(src == PYMSKT["lateral_tibial_cartilage"]).mean(axis=0)
    for t in np.linspace(0.0, 1.0, 400):  # a 3-voxel-thick bridge between the plates
        i, j, k = np.round(c_med + (c_lat - c_med) * t).astype(int)
        oai[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = 4
    import cc3d

    assert cc3d.connected_components((oai == 4).astype(np.uint8)).max() == 1
    mapping_file = tmp_path / "oai_with_fibula.yaml"
    mapping_file.write_text("name: oai_fib\nmap:\n  1: femur\n  2: femoral_cartilage\n"
                            "  3: tibia\n  4: tibial_cartilage\n  8: fibula\n")
    out, info = to_default_scheme(oai, load_mapping(str(mapping_file)), aff)
    assert (info["side"], info["side_source"]) == ("right", "anatomy:fibula")
    assert _agreement(out, src, PYMSKT["medial_tibial_cartilage"],
                      PYMSKT["lateral_tibial_cartilage"]) > 0.95


def test_tibial_split_at_femoral_notch_when_the_spines_are_covered(pymskt):
    """A prediction that covers the whole tibial plateau, spines included, has no sparse
    plane between the plates: the split is anchored on the femoral notch instead."""
    src, aff = pymskt.array, pymskt.geometry.affine
    oai = _as_oai_zib(src)
    med, lat = (src == PYMSKT["medial_tibial_cartilage"]), (src == PYMSKT["lateral_tibial_cartilage"])
    x_of = lambda m: np.argwhere(m) @ aff[0, :3] + aff[0, 3]  # noqa: E731
    lo, hi = sorted((x_of(lat).max(), x_of(med).min()))  # right knee: lateral at -x
    # a 2 mm cartilage layer on the tibia's upper surface all across the gap between plates
    up = int(np.argmax(np.abs(aff[2, :3])))
    step = 1 if aff[2, up] > 0 else -1
    tibia = src == PYMSKT["tibia"]
    n_layer = int(round(2.0 / pymskt.geometry.spacing[up]))
    grid_x = (np.indices(src.shape).reshape(3, -1).T @ aff[0, :3] + aff[0, 3]).reshape(src.shape)
    in_gap = (grid_x > lo - 1.0) & (grid_x < hi + 1.0)
    above = tibia.copy()
    layer = np.zeros_like(tibia)
    for _ in range(n_layer):
        above = np.roll(above, step, axis=up)
        layer |= above
    bridge = layer & ~tibia & in_gap & (oai == 0)
    oai[bridge] = 4
    x_tib = x_of(oai == 4)
    hist, _ = np.histogram(x_tib, bins=np.arange(lo - 6, hi + 7, 1.0))
    assert hist.min() > 0  # no empty plane left between the plates
    out, info = to_default_scheme(oai, load_mapping("oai_zib"), aff, side="right")
    assert info["tibial_split"] == "femoral notch"
    assert _agreement(out, src, PYMSKT["medial_tibial_cartilage"],
                      PYMSKT["lateral_tibial_cartilage"]) > 0.99
    # the bridge itself is split at the notch, which lies in the gap between the plates
    from cartiq.io.labels import femoral_notch_x

    assert lo - 1.0 <= femoral_notch_x(src == PYMSKT["femur"], aff) <= hi + 1.0


def test_spl_merged_tibial_label_split_left_knee(spl):
    src, aff = spl.array, spl.geometry.affine
    merged = np.where(src == SPL["medial_tibial_cartilage"], SPL["lateral_tibial_cartilage"], src)
    base = load_mapping("spl_knee_atlas")
    mapping = replace(base, map={**{k: v for k, v in base.map.items()
                                    if k != SPL["medial_tibial_cartilage"]},
                                 SPL["lateral_tibial_cartilage"]: "tibial_cartilage"})
    out, info = to_default_scheme(merged, mapping, aff)
    assert (info["side"], info["side_source"]) == ("left", "anatomy:fibula")
    assert _agreement(out, src, SPL["medial_tibial_cartilage"],
                      SPL["lateral_tibial_cartilage"]) > 0.95


def test_unknown_label_values_are_a_clear_error(pymskt):
    src = pymskt.array.copy()
    src[0, 0, 0] = 42
    src[0, 0, 1] = 17
    with pytest.raises(InputError, match=r"unknown label values \[17, 42\] for label scheme "
                                         r"'pymskt_dess'") as info:
        to_default_scheme(src, load_mapping("pymskt_dess"), pymskt.geometry.affine,
                          path=pymskt.path)
    assert str(info.value).startswith(str(pymskt.path))
    # the default cartiq scheme hints at --labels (pymskt's 8 = fibula is not a cartiq label)
    small = np.zeros((4, 4, 4), np.uint16)
    small[1, 1, 1] = 11
    with pytest.raises(InputError, match=r"unknown label values \[11\].*--labels"):
        to_default_scheme(small, load_mapping(None), np.eye(4), side="right")


def test_unknown_mapping_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown label mapping 'nope'.*oai_zib"):
        load_mapping("nope")


@pytest.mark.parametrize("text, message", [
    ("map:\n  1: femur\n  2: cartilage_of_doom\n", "maps to unknown structure 'cartilage_of_doom'"),
    ("map:\n  one: femur\n", "'one' is not an integer"),
    ("map: [1, 2]\n", "needs a 'map'"),
    ("map:\n  1: femur\ntissues:\n  bone_of_contention: [2]\n",
     "unknown tissue 'bone_of_contention'.*ligament"),
    ("map:\n  1: femur\ntissues:\n  fat: [1]\n", "label 1 is listed twice"),
    ("map:\n  1: femur\ntissues:\n  fat: 2\n", "'fat' needs a list"),
])
def test_bad_mapping_files(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_mapping(str(bad))


@pytest.mark.parametrize("offset_mm, expected", [(25.0, "left"), (-25.0, "right"),
                                                 (5.0, None), (-8.0, None)])
def test_fibula_counts_only_where_a_fibula_sits(offset_mm, expected):
    """A fibula is evidence only well lateral of the tibia (real knees here: 22-31 mm); one
    under the tibia's middle (a model's false piece on a knee without one: 5 mm) is not."""
    from cartiq.io.side import anatomy_evidence

    s = default_scheme()
    labels = np.zeros((120, 40, 40), np.uint8)  # 1 mm voxels, axis 0 = LPS x
    labels[40:80, 10:30, 5:25] = s["tibia"]  # centroid x = 59.5 mm
    fibula = np.zeros(labels.shape, bool)
    c = int(round(59.5 + offset_mm))
    fibula[c - 5:c + 5, 25:35, 2:12] = True
    labels[fibula] = 0
    evidence = anatomy_evidence(labels, np.eye(4), dict(s.labels), fibula=fibula,
                                plates_labelled=False)
    found = [e for e in evidence if e.source == "anatomy:fibula"]
    assert (found[0].side if found else None) == expected
