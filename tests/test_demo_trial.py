"""`cartiq demo trial` on a small seeded trial: the planted changes come back out of the
cohort tables; `cartiq power`; bad input.

Planted values are taken from the trial's design (phantom parameters: defect radius, BML
semi-axes, repair fill and signal) and from each phantom's analytic truth.json (plate
thickness); the MOCART points of the planted repair states are the published categories
written out here.  Recovered values come from the batch's cohort_summary.csv / change.csv.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cartiq.demo import design_trial, run_demo_trial

N, SEED = 2, 3
GRID = ((0.8, 0.8, 1.5),)
ABS_TOL = {"mm": 0.05, "mm2": 5.0, "mm3": 25.0, "points": 2.0}
# MOCART 2.0 points (configs/mocart2.yaml) of the planted states; the other five items are
# planted at their maximum (65 points)
FILL_POINTS = {87.5: 15, 110.0: 20}
SIGNAL_POINTS = {"severe": 0, "minor": 5, "normal": 15}


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "trial"
    result = run_demo_trial(out, N, SEED, workers=2, grids=GRID)
    assert result.exit_code == 0
    return out


def _planted(out: Path) -> pd.DataFrame:
    rows = []
    for k in design_trial(N, SEED, GRID):
        vals = {}
        for v, visit in k.visits.items():
            truth = json.loads((out / "scans" / k.subject_id / v / "truth.json").read_text())
            femur_bml = 4 / 3 * math.pi * math.prod(visit.bml_radii_mm)
            vals[v] = {
                ("thickness", "femoral_cartilage"): truth["plates"]["femoral_cartilage"]["thickness_mean_mm"],
                ("thickness", "medial_tibial_cartilage"): truth["plates"]["medial_tibial_cartilage"]["thickness_mean_mm"],
                ("thickness", "lateral_tibial_cartilage"): truth["plates"]["lateral_tibial_cartilage"]["thickness_mean_mm"],
                ("denuded_area", "femoral_cartilage"): math.pi * visit.defect_radius_mm ** 2,
                ("bml_volume", "bone_marrow_lesion"): femur_bml,  # tibial BML unchanged
                ("bml_area", "femur"): math.pi * visit.bml_radii_mm[1] * visit.bml_radii_mm[2],
                ("mocart_total", "repair_sites"): 65 + FILL_POINTS[visit.fill_pct]
                + SIGNAL_POINTS[visit.signal],
            }
        for key in vals["baseline"]:
            rows.append({"subject_id": k.subject_id, "arm": k.arm, "stage_group": k.group,
                         "outcome": key[0], "structure": key[1],
                         "planted": vals["m12"][key] - vals["baseline"][key]})
    return pd.DataFrame(rows)


def _recovered(out: Path) -> pd.DataFrame:
    """Mean change per arm x stage group x outcome from the batch's cohort tables."""
    s = pd.read_csv(out / "cohort_summary.csv")
    s = s[s["arm"].isin(["MSC", "placebo"]) & s["stage_group"].isin(["early", "late"])]
    rows = [{"arm": r.arm, "stage_group": r.stage_group, "outcome": r.measure,
             "structure": r.structure, "recovered": r.mean_change, "unit": r.unit}
            for r in s.itertuples()]
    c = pd.read_csv(out / "change.csv")
    c = c[(c["structure"] == "bone_marrow_lesion") & (c["region"] == "femur")
          & (c["metric"] == "max_slice_area")]
    info = {k.subject_id: (k.arm, k.group) for k in design_trial(N, SEED, GRID)}
    c = c.assign(arm=c["subject_id"].map(lambda s: info[s][0]),
                 stage_group=c["subject_id"].map(lambda s: info[s][1]))
    for (arm, group), g in c.groupby(["arm", "stage_group"]):
        rows.append({"arm": arm, "stage_group": group, "outcome": "bml_area",
                     "structure": "femur", "recovered": g["change"].mean(), "unit": "mm2"})
    return pd.DataFrame(rows)


def test_recovered_mean_change_within_tolerance_and_signs_right(trial):
    planted = (_planted(trial).groupby(["arm", "stage_group", "outcome", "structure"])
               ["planted"].agg(["mean", "size"]).reset_index())
    both = planted.merge(_recovered(trial), on=["arm", "stage_group", "outcome", "structure"])
    assert len(both) == len(planted) == 4 * 7
    assert (both["size"] == N).all()
    problems = []
    for r in both.itertuples():
        tol = max(0.1 * abs(r.mean), ABS_TOL[r.unit])
        if not abs(r.recovered - r.mean) <= tol:
            problems.append(f"{r.outcome} {r.structure} {r.arm} {r.stage_group}: recovered "
                            f"{r.recovered:.4g} vs planted {r.mean:.4g} (tol {tol:.3g})")
        if abs(r.mean) > tol and math.copysign(1, r.recovered) != math.copysign(1, r.mean):
            problems.append(f"{r.outcome} {r.structure} {r.arm} {r.stage_group}: wrong sign")
    assert not problems, "\n".join(problems)


def test_arm_difference_ci_covers_planted_difference(trial):
    planted = _planted(trial).groupby(["outcome", "structure", "stage_group", "arm"])["planted"].mean()
    table = pd.read_csv(trial / "planted_vs_recovered.csv")
    diffs = table[table["arm"] == "MSC - placebo"]
    assert len(diffs) == 2 * 7
    for r in diffs.itertuples():
        want = (planted[(r.outcome, r.structure, r.stage_group, "MSC")]
                - planted[(r.outcome, r.structure, r.stage_group, "placebo")])
        assert r.planted_mean_change == pytest.approx(want, rel=1e-5, abs=1e-6)  # CSV: 6 digits
        assert r.ci95_low - 1e-6 <= want <= r.ci95_high + 1e-6, (r.outcome, r.structure, r.stage_group)


def test_outputs_and_report_section(trial):
    for name in ("manifest.csv", "truth.csv", "planted_vs_recovered.csv", "sample_size.csv",
                 "planted_vs_recovered.png", "cohort_summary.csv", "cohort.html"):
        assert (trial / name).is_file(), name
    html = (trial / "cohort.html").read_text()
    assert "Simulated trial: planted vs recovered change" in html
    sizes = pd.read_csv(trial / "sample_size.csv")
    assert set(sizes["outcome"]) == {"thickness", "denuded_area", "bml_volume", "bml_area",
                                     "mocart_total"}
    assert (sizes["knees_per_arm_90pct_power"] >= sizes["knees_per_arm_80pct_power"]).all()


def test_real_trial_report_has_no_demo_section(tmp_path):
    from cartiq.report.cohort import write_cohort_report

    (tmp_path / "cohort_summary.csv").write_text(",".join(["arm", "stage_group"]) + "\n")
    html = write_cohort_report(tmp_path).path.read_text()
    assert "Simulated trial" not in html


def test_power_matches_textbook_values():
    from cartiq.power import knees_per_arm

    # two-sided alpha 0.05, d = 0.5: 64 per arm (80%), 86 (90%); d = 1: 17 (80%)
    assert knees_per_arm(0.5, 1.0) == 64
    assert knees_per_arm(0.5, 1.0, power=0.9) == 86
    assert knees_per_arm(2.0, 2.0) == 17


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cartiq", *args], capture_output=True,
                          text=True, timeout=120)


def test_power_cli():
    r = _cli("power", "--outcome", "bml_area", "--sd", "40")
    assert r.returncode == 0, r.stderr
    assert "knees_per_arm_80pct_power=24" in r.stdout


@pytest.mark.parametrize("args", [
    ("demo", "trial", "-o", "{tmp}/t", "--subjects-per-group", "1"),
    ("power", "--outcome", "cartilage_colour", "--sd", "1"),
    ("power", "--effect", "0.1", "--sd", "0"),
    ("power", "--effect", "0.1", "--sd", "-0.2"),
])
def test_bad_input_one_line_exit_2(tmp_path, args):
    r = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cartiq: error:"), r.stderr
    assert not (tmp_path / "t").exists()
