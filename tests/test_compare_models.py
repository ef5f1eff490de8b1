"""benchmarks/compare_models.py: the paired comparison of evaluated models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import compare_models as cm  # noqa: E402

PLATES = cm.PLATES


def _run(contrast, mm, seed, dice, ratio=1.0):
    return {"contrast": contrast, "slice_mm": mm, "seed": seed, "side_found": "right",
            "dice": {p: dice for p in PLATES}, "volume_ratio": {p: ratio for p in PLATES}}


def _eval(runs, qdess=None):
    data = {"model": "m", "lomo": [{"fold": "mskt_right", "side": "right", "runs": runs}]}
    if qdess:
        data["real"] = {"qdess": qdess}
    return data


def test_paired_difference_is_over_shared_renderings_with_its_standard_error():
    base = cm.summarize(_eval([_run("dess", 1.0, 100, 0.80), _run("t1", 3.0, 100, 0.60)]))
    arm = cm.summarize(_eval([_run("dess", 1.0, 100, 0.82), _run("t1", 3.0, 100, 0.63),
                              _run("t2", 1.0, 101, 0.10)]))  # not in the baseline: ignored
    d = cm.paired_difference(arm["per_rendering"], base["per_rendering"])
    # differences 0.02 and 0.03: mean 0.025, sample SD 0.00707, SE = 0.00707 / sqrt(2) = 0.005
    assert d["n"] == 2
    assert d["mean"] == pytest.approx(0.025)
    assert d["se"] == pytest.approx(0.005)
    assert base["plates_mean"] == pytest.approx(0.70)
    assert arm["lowest_plate"] == pytest.approx(0.10)


def test_volume_ratio_summary_and_too_few_shared_renderings():
    s = cm.summarize(_eval([_run("dess", 1.0, 100, 0.8, ratio=1.2),
                            _run("t1", 1.0, 100, 0.8, ratio=0.8)]))
    assert s["volume_ratio"]["femoral_cartilage"] == pytest.approx(1.0)
    assert s["mean_abs_log_ratio"] == pytest.approx(0.0)
    with pytest.raises(SystemExit, match="fewer than two"):
        cm.paired_difference({("dess", 1.0, 100): 0.8}, {("dess", 1.0, 100): 0.7})


def test_command_line_prints_the_table(tmp_path):
    q = {"plates": {"femoral_cartilage": {"volume_mm3": 14104.4}}, "qc_status": "pass",
         "pykneer_reference": {"dice_vs_band": 0.628,
                               "disagreement": {"cartiq_only_mm3": {"beyond_2mm": 3018}}}}
    paths = []
    for name, dice, qd in (("base", 0.80, None), ("arm", 0.81, q)):
        (tmp_path / name).mkdir()
        p = tmp_path / name / "eval.json"
        p.write_text(json.dumps(_eval([_run("dess", 1.0, 100, dice),
                                       _run("t1", 3.0, 100, dice + 0.01)], qd)))
        paths.append(str(p))
    out = subprocess.run([sys.executable, str(BENCH / "compare_models.py"), *paths,
                          "--markdown", str(tmp_path / "t.md")],
                         capture_output=True, text=True, check=True).stdout
    assert "| mean of the plates | 0.8050 | 0.8150 |" in out
    assert "+0.0100 (SE 0.0000, n 2)" in out
    assert "14,104 / pass" in out and "0.628 / 3018" in out and "not run" in out
    assert (tmp_path / "t.md").read_text() == out.rstrip("\n") + "\n"


def test_files_of_different_folds_are_refused(tmp_path):
    paths = []
    for fold in ("mskt_right", "spl"):
        data = _eval([_run("dess", 1.0, 100, 0.8), _run("t1", 3.0, 100, 0.7)])
        data["lomo"][0]["fold"] = fold
        p = tmp_path / f"{fold}.json"
        p.write_text(json.dumps(data))
        paths.append(str(p))
    r = subprocess.run([sys.executable, str(BENCH / "compare_models.py"), *paths],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "different folds" in r.stderr


def test_by_contrast_summarises_each_family_on_its_own(tmp_path):
    runs = [_run("dess", 1.0, 100, 0.70, ratio=1.4), _run("dess", 3.0, 100, 0.74, ratio=1.2),
            _run("t1", 1.0, 100, 0.90, ratio=0.9)]
    parts = cm.by_contrast(_eval(runs))
    assert sorted(parts) == ["dess", "t1"]
    assert parts["dess"]["renderings"] == 2 and parts["t1"]["renderings"] == 1
    assert parts["dess"]["plates_mean"] == pytest.approx(0.72)
    assert parts["dess"]["volume_ratio"]["femoral_cartilage"] == pytest.approx(1.3)
    assert parts["t1"]["plates_mean"] == pytest.approx(0.90)
    paths = []
    for name, shift in (("base", 0.0), ("arm", 0.02)):
        (tmp_path / name).mkdir()
        p = tmp_path / name / "eval.json"
        p.write_text(json.dumps(_eval([{**r, "dice": {k: v + shift for k, v in r["dice"].items()}}
                                       for r in runs])))
        paths.append(str(p))
    out = subprocess.run([sys.executable, str(BENCH / "compare_models.py"), *paths,
                          "--by-contrast"], capture_output=True, text=True, check=True).stdout
    dess = out.split("dess renderings only:")[1].split("t1 renderings only:")[0]
    assert "| mean of the plates | 0.7200 | 0.7400 |" in dess
    assert "+0.0200 (SE 0.0000, n 2)" in dess
    t1 = out.split("t1 renderings only:")[1]
    assert "n/a (fewer than two renderings in common)" in t1
