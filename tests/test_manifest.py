"""Batch manifest: natural visit order, every bad row reported at once, --skip-invalid."""

from __future__ import annotations

from pathlib import Path

import pytest

from cartiq.errors import InputError
from cartiq.batch.manifest import (is_baseline_name, read_manifest_csv, stage_group,
                               timepoint_sort_key)


def _files(tmp: Path, *names: str) -> None:
    for n in names:
        (tmp / n).write_bytes(b"x")


def _write(tmp: Path, lines: list[str]) -> Path:
    p = tmp / "manifest.csv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_natural_timepoint_order():
    tps = ["m12", "24m", "fu", "m6", "baseline", "m3"]
    assert sorted(tps, key=timepoint_sort_key) == ["baseline", "m3", "m6", "m12", "24m", "fu"]
    assert sorted(["m6", "BL", "week2"], key=timepoint_sort_key) == ["BL", "week2", "m6"]
    for t in ("baseline", "bl", "BL", "m0", "0m", "week0", "screening"):
        assert is_baseline_name(t), t
    for t in ("m6", "m10", "24m", "fu", "v1"):
        assert not is_baseline_name(t), t


def test_stage_groups():
    assert [stage_group(k) for k in (None, 0, 1, 2, 3, 4)] == \
        ["unknown", "unknown", "early", "early", "late", "late"]


def test_good_manifest_rows_pairs_and_subject_info(tmp_path):
    _files(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz", "s.nii.gz")
    sub = tmp_path / "sub"
    sub.mkdir()
    _files(sub, "d.nii.gz")
    p = _write(tmp_path, [
        "subject_id,timepoint,image,seg,side,arm,kl_grade,sites",
        "P1,m12,c.nii.gz,,L,MSC,II,",
        "P1,baseline,a.nii.gz,s.nii.gz,left,MSC,2,",
        "",
        "P1,m6,b.nii.gz,,left,MSC,,s.nii.gz",
        f"P2,bl,{sub / 'd.nii.gz'},,right,placebo,KL4,",
    ])
    m = read_manifest_csv(p)
    assert [(r.subject_id, r.timepoint) for r in m.rows] == \
        [("P1", "m12"), ("P1", "baseline"), ("P1", "m6"), ("P2", "bl")]
    assert [r.line for r in m.rows] == [2, 3, 5, 6]
    subj = m.subjects()
    assert [r.timepoint for r in subj["P1"]] == ["baseline", "m6", "m12"]
    assert [(b.timepoint, f.timepoint) for b, f in m.pairs()] == [("baseline", "m6"),
                                                                    ("baseline", "m12")]
    r = subj["P1"][0]
    assert r.seg == tmp_path / "s.nii.gz" and r.image == tmp_path / "a.nii.gz"
    assert subj["P1"][2].side == "left" and subj["P1"][2].kl_grade == 2
    assert subj["P1"][1].sites == tmp_path / "s.nii.gz"
    info = m.subject_info()
    assert info["P1"] == {"arm": "MSC", "kl_grade": 2, "stage_group": "early"}
    assert info["P2"] == {"arm": "placebo", "kl_grade": 4, "stage_group": "late"}
    assert m.invalid == []


def test_visit_order_overrides_names(tmp_path):
    _files(tmp_path, "a.nii", "b.nii", "c.nii")
    p = _write(tmp_path, ["subject_id,timepoint,image,visit_order",
                          "P1,late,a.nii,2", "P1,first,b.nii,0", "P1,mid,c.nii,1"])
    m = read_manifest_csv(p)
    assert [r.timepoint for r in m.subjects()["P1"]] == ["first", "mid", "late"]
    assert [(b.timepoint, f.timepoint) for b, f in m.pairs()] == [("first", "mid"),
                                                                    ("first", "late")]


def test_missing_required_columns(tmp_path):
    p = _write(tmp_path, ["subject,timepoint,img", "P1,bl,a.nii"])
    with pytest.raises(InputError) as e:
        read_manifest_csv(p)
    msg = str(e.value)
    assert "subject_id" in msg and "image" in msg and "manifest.csv" in msg


def test_every_bad_row_listed_at_once(tmp_path):
    _files(tmp_path, "a.nii", "b.nii")
    p = _write(tmp_path, [
        "subject_id,timepoint,image,seg,side,kl_grade",
        "P1,bl,a.nii,,left,1",          # 2 ok
        "P1,m6,a.nii,,left,1",          # 3 ok
        "P1,m6,b.nii,,left,1",          # 4 duplicate of line 3
        "P2,bl,missing.nii,,,",         # 5 image does not exist
        "P2,m6,a.nii,,,",               # 6 its baseline row is invalid
        "P3,m6,a.nii,,,",               # 7 no baseline
        "P4,bl,a.nii,,middle,7",        # 8 bad side, bad KL
        "../x,bl,a.nii,,,",             # 9 unsafe subject id
        "P5,bl,a.nii,nothere.nii,,",    # 10 seg does not exist
    ])
    with pytest.raises(InputError) as e:
        read_manifest_csv(p)
    msg = str(e.value)
    assert "7 bad row(s)" in msg
    lines = {ln.strip().split(":")[0] for ln in msg.splitlines()[1:]}
    assert lines == {f"line {i}" for i in range(4, 11)}
    assert "duplicate subject_id,timepoint P1,m6 (also line 3)" in msg
    assert "image missing.nii does not exist" in msg
    assert "seg nothere.nii does not exist" in msg
    assert "baseline row of subject P2 (line 5) is invalid" in msg
    assert "subject P3 has no baseline visit" in msg
    assert "side 'middle'" in msg and "kl_grade '7'" in msg
    assert "subject_id '../x'" in msg


def test_skip_invalid_keeps_valid_rows(tmp_path):
    _files(tmp_path, "a.nii")
    p = _write(tmp_path, ["subject_id,timepoint,image",
                          "P1,bl,a.nii", "P1,m6,a.nii", "P2,bl,gone.nii", "P2,m6,a.nii",
                          "P3,m12,a.nii"])
    m = read_manifest_csv(p, skip_invalid=True)
    assert [r.key for r in m.rows] == [("P1", "bl"), ("P1", "m6")]
    assert [(b.line, b.subject_id, b.timepoint) for b in m.invalid] == \
        [(4, "P2", "bl"), (5, "P2", "m6"), (6, "P3", "m12")]


def test_conflicting_arms_and_two_baselines(tmp_path):
    _files(tmp_path, "a.nii")
    p = _write(tmp_path, ["subject_id,timepoint,image,arm",
                          "P1,bl,a.nii,MSC", "P1,baseline,a.nii,MSC", "P1,m6,a.nii,placebo"])
    with pytest.raises(InputError) as e:
        read_manifest_csv(p)
    msg = str(e.value)
    assert "different arms (MSC, placebo)" in msg
    assert "2 baseline visits (bl, baseline)" in msg


def test_cli_bad_manifest_exit_2_lists_rows(tmp_path, capsys):
    from cartiq.cli import main

    _files(tmp_path, "a.nii")
    p = _write(tmp_path, ["subject_id,timepoint,image", "P1,bl,a.nii", "P1,bl,a.nii",
                          "P2,m6,nope.nii"])
    with pytest.raises(SystemExit) as e:
        main(["batch", str(p), "-o", str(tmp_path / "out"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "line 3:" in err and "line 4:" in err and "nope.nii does not exist" in err
    assert not (tmp_path / "out" / "P1").exists()  # nothing was processed


def test_cli_bad_measure_config_exit_2_before_any_scan(tmp_path, capsys):
    """A bad --config stops a parallel batch with one line naming the file, before any scan
    (the local pool, already starting, is shut down)."""
    from cartiq.cli import main

    _files(tmp_path, "a.nii", "b.nii")
    p = _write(tmp_path, ["subject_id,timepoint,image,seg", "P1,bl,a.nii,b.nii",
                          "P2,bl,a.nii,b.nii"])
    cfg = tmp_path / "measure.yaml"
    cfg.write_text("smoothing_sigma_voxels: -3\nno_such_setting: 1\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["batch", str(p), "-o", str(tmp_path / "out"), "--config", str(cfg),
              "--workers", "2", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measure.yaml" in err[0]
    assert not (tmp_path / "out" / "P1").exists() and not (tmp_path / "out" / "P2").exists()


def test_side_override_column(tmp_path):
    from cartiq.batch.manifest import fingerprint

    _files(tmp_path, "a.nii")
    p = _write(tmp_path, [
        "subject_id,timepoint,image,side,side_override",
        "P1,bl,a.nii,left,yes",   # 2 kept against the anatomy
        "P2,bl,a.nii,right,",     # 3 empty = no
        "P3,bl,a.nii,right,0",    # 4 no
        "P4,bl,a.nii,,yes",       # 5 an override needs a side
        "P5,bl,a.nii,left,maybe",  # 6 not yes/no
    ])
    with pytest.raises(InputError) as e:
        read_manifest_csv(p)
    msg = str(e.value)
    assert "2 bad row(s)" in msg
    assert "line 5: side_override without a side" in msg
    assert "line 6: side_override 'maybe' is not yes or no" in msg
    rows = {r.subject_id: r for r in read_manifest_csv(p, skip_invalid=True).rows}
    assert rows["P1"].side_override is True
    assert rows["P2"].side_override is False and rows["P3"].side_override is False
    # an override changes what the results depend on; no override keeps old fingerprints
    plain = rows["P1"].__class__(**{**rows["P1"].__dict__, "side_override": False})
    assert fingerprint(rows["P1"], {}, None, {}) != fingerprint(plain, {}, None, {})
    # the fingerprint of a row without an override is the one earlier versions recorded
    import hashlib
    import json

    from cartiq._version import __version__
    from cartiq.batch.manifest import FINGERPRINT_VERSION

    before = {"v": FINGERPRINT_VERSION, "cartiq": __version__, "inputs": {"image": "abc"},
              "model": None, "configs": {"measure": "1"}, "side": "left", "labels": None}
    assert fingerprint(plain, {"image": "abc"}, None, {"measure": "1", "compare": "2"}) == \
        hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
