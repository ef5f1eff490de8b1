"""Batch runner end to end on phantom scans: tables, failures, resume, a real Dask cluster.

The trial: two subjects in two arms (S01 MSC, KL II = early; S02 placebo, KL III = late),
each with a baseline and an m6 visit; S02 also has an m12 scan whose image is corrupt and
an m24 scan whose label map is empty.
All scans share one coarse phantom; the label maps differ: S01's m6 has every bone-marrow
lesion healed (relabelled as the surrounding bone), S02's m6 is unchanged.  Segmentation
is given (``seg`` column), so no model runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cartiq.batch.batch import EXIT_FAILED, BatchOptions, run_batch
from cartiq.cli import main
from cartiq.io.volume import read_volume, write_volume
from cartiq.io.labels import default_scheme

HAVE_COMPARE = importlib.util.find_spec("cartiq.longitudinal.compare") is not None
HEADER = "subject_id,timepoint,image,seg,side,arm,kl_grade"


def _healed(labels: np.ndarray) -> np.ndarray:
    """Every BML voxel takes the label of the nearest non-lesion voxel (its bone)."""
    from scipy import ndimage

    bml = labels == default_scheme()["bone_marrow_lesion"]
    _, idx = ndimage.distance_transform_edt(bml, return_indices=True)
    return labels[tuple(idx)]


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    d = tmp_path_factory.mktemp("trial")
    ph = make_phantom(PhantomSpec(seed=3, spacing_mm=(1.0, 1.0, 2.0)))
    paths = write_phantom(ph, d / "phantom")
    geo = ph.labels.geometry
    write_volume(d / "seg_healed.nii.gz", _healed(ph.labels.array), geo)
    shutil.copy(paths["seg"], d / "seg_s02_m6.nii.gz")
    (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    write_volume(d / "empty.nii.gz", np.zeros(geo.shape, np.uint8), geo)
    img = paths["image"].relative_to(d)
    seg = paths["seg"].relative_to(d)
    rows = [HEADER,
            f"S01,baseline,{img},{seg},right,MSC,2",
            f"S01,m6,{img},seg_healed.nii.gz,right,MSC,II",
            f"S02,bl,{img},{seg},right,placebo,3",
            f"S02,m6,{img},seg_s02_m6.nii.gz,right,placebo,3",
            f"S02,m12,corrupt.nii.gz,{seg},right,placebo,3",
            f"S02,m24,{img},empty.nii.gz,right,placebo,3"]
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    (d / "manifest_ok.csv").write_text("\n".join(rows[:5]) + "\n")
    return d


def _run_cli(manifest: Path, out: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(["batch", str(manifest), "-o", str(out), "--no-progress", "--workers", "1",
              "--no-report", *extra])
    return e.value.code


def _last_summary(out: Path) -> tuple[int, int, int]:
    lines = [ln for ln in (out / "batch.log").read_text().splitlines() if "batch finished" in ln]
    m = re.search(r"(\d+) done, (\d+) skipped \(up to date\), (\d+) failed", lines[-1])
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


def _scan_metric(out: Path, sid: str, tp: str, structure: str, metric: str) -> float:
    df = pd.read_csv(out / sid / tp / "measurements.csv")
    sel = df[(df.structure == structure) & (df.region == "all") & (df.metric == metric)]
    return float(sel.value.iloc[0])


def _mocart_total(out: Path, sid: str, tp: str) -> float:
    df = pd.read_csv(out / sid / tp / "score" / "mocart.csv")
    return float(df[df.item == "total"].points.mean())


def _complete(folder: Path) -> bool:
    try:
        return "fingerprint" in json.loads((folder / "manifest.json").read_text())["batch"]
    except (OSError, KeyError, ValueError):
        return False


@pytest.mark.slow
def test_interrupted_batch_resumes_and_tables_are_exact(trial, tmp_path):
    out = tmp_path / "out"
    scans = [("S01", "baseline"), ("S01", "m6"), ("S02", "bl"), ("S02", "m6")]
    # 1. a run killed with SIGKILL as soon as its first scan is complete
    proc = subprocess.Popen([sys.executable, "-m", "cartiq", "batch", str(trial / "manifest.csv"),
                             "-o", str(out), "--workers", "1", "--no-progress", "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _complete(out / "S01" / "baseline"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # into the second scan
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = [s for s in scans if _complete(out / s[0] / s[1])]
    assert ("S01", "baseline") in done_before and len(done_before) < 4
    for sid, tp in scans:  # nothing half-written looks complete
        m = out / sid / tp / "manifest.json"
        assert not m.exists() or _complete(out / sid / tp) or \
            "batch" not in json.loads(m.read_text())

    # 2. resume: the finished scans are skipped, the rest computed, the corrupt one fails
    assert _run_cli(trial / "manifest.csv", out) == 3
    done, skipped, failed = _last_summary(out)
    assert (done, skipped, failed) == (4 - len(done_before), len(done_before), 2)
    assert all(_complete(out / s[0] / s[1]) for s in scans)
    assert not (out / "S02" / "m12" / "manifest.json").exists()

    # failures.csv: exactly the corrupt scan and the empty segmentation, one line each
    fail = pd.read_csv(out / "failures.csv")
    assert fail[["subject_id", "timepoint", "stage"]].values.tolist() == \
        [["S02", "m12", "measure"], ["S02", "m24", "measure"]]
    assert "corrupt.nii.gz" in fail.error[0] and "cannot read" in fail.error[0]
    assert "empty.nii.gz" in fail.error[1] and "label map is empty" in fail.error[1]
    assert not any("\n" in e for e in fail.error)
    assert not (out / "S02" / "m24" / "manifest.json").exists()

    # measurements.csv: every row of every finished scan, with subject_id,timepoint
    meas = pd.read_csv(out / "measurements.csv", keep_default_na=False)
    assert list(meas.columns) == ["subject_id", "timepoint", "structure", "region", "metric",
                                  "value", "unit", "qc_status"]
    expect = pd.concat([pd.read_csv(out / s / t / "measurements.csv", keep_default_na=False)
                        .assign(subject_id=s, timepoint=t) for s, t in scans], ignore_index=True)
    assert len(meas) == len(expect) > 100
    assert meas.subject_id.tolist() == expect.subject_id.tolist()
    for col in ("structure", "region", "metric", "unit"):
        assert meas[col].tolist() == expect[col].tolist()
    np.testing.assert_allclose(pd.to_numeric(meas.value, errors="coerce"),
                               pd.to_numeric(expect.value, errors="coerce"), rtol=1e-5)
    assert pd.read_parquet(out / "measurements.parquet").shape == meas.shape

    # the phantom's lesions: healed at S01 m6, unchanged at S02 m6
    v_bl = _scan_metric(out, "S01", "baseline", "bone_marrow_lesion", "volume")
    assert v_bl > 50
    assert _scan_metric(out, "S01", "m6", "bone_marrow_lesion", "volume") == 0
    assert _scan_metric(out, "S02", "m6", "bone_marrow_lesion", "volume") == v_bl

    # mocart.csv: every scan's score rows; summary: MOCART total change per group
    moc = pd.read_csv(out / "mocart.csv")
    assert sorted(set(zip(moc.subject_id, moc.timepoint))) == sorted(scans)
    summ = pd.read_csv(out / "cohort_summary.csv", keep_default_na=False)
    mt = summ[summ.measure == "mocart_total"]
    d = {"S01": _mocart_total(out, "S01", "m6") - _mocart_total(out, "S01", "baseline"),
         "S02": _mocart_total(out, "S02", "m6") - _mocart_total(out, "S02", "bl")}
    assert d["S02"] == 0 or np.isnan(d["S02"])  # same label map at both visits
    groups = {"S01": ("MSC", "early"), "S02": ("placebo", "late")}
    expect_m: dict[tuple[str, str], list[float]] = {}
    for sid, v in d.items():
        if np.isfinite(v):
            arm, grp = groups[sid]
            for key in ((arm, grp), (arm, "all"), ("all", grp), ("all", "all")):
                expect_m.setdefault(key, []).append(v)
    got = {(r.arm, r.stage_group): (r.n, float(r.mean_change)) for r in mt.itertuples()}
    assert got == {k: (len(v), pytest.approx(np.mean(v))) for k, v in expect_m.items()}
    assert set(mt.timepoint) <= {"m6"}

    change = pd.read_csv(out / "change.csv")
    if HAVE_COMPARE:
        assert sorted(set(zip(change.subject_id, change.baseline_timepoint, change.timepoint))) == \
            [("S01", "baseline", "m6"), ("S02", "bl", "m6")]
        bml = summ[(summ.measure == "bml_volume")]
        row = bml[(bml.arm == "all") & (bml.stage_group == "all")].iloc[0]
        assert row.n == 2
        assert float(row.mean_change) == pytest.approx(-v_bl / 2, rel=0.05)
        assert float(row.srm) == pytest.approx(-1 / np.sqrt(2), rel=0.05)
        assert (out / "S01" / "compare_baseline_m6" / "manifest.json").is_file()
        # 7 groups (arm x stage group + all) x (4 plates thickness + 4 plates and their sum
        # denuded area + BML volume), one follow-up timepoint
        core = summ[summ.measure != "mocart_total"]
        assert len(core) == 7 * 10 and set(core.timepoint) == {"m6"}
        tot = core[(core.structure == "all_plates") & (core.arm == "all")
                   & (core.stage_group == "all")].iloc[0]
        assert tot.n == 2 and tot.n_exceeding_sdc == ""
    else:
        assert len(change) == 0
        assert "compare: stage not available" in (out / "batch.log").read_text()

    # 3. unchanged re-run: everything skipped, outputs untouched
    stamp = (out / "S01" / "m6" / "manifest.json").stat().st_mtime_ns
    assert _run_cli(trial / "manifest.csv", out) == 3
    assert _last_summary(out) == (0, 4, 2)
    assert (out / "S01" / "m6" / "manifest.json").stat().st_mtime_ns == stamp

    # 4. one changed input: exactly that scan recomputed, its tables updated
    lab = read_volume(trial / "seg_s02_m6.nii.gz", kind="labels")
    write_volume(trial / "seg_s02_m6.nii.gz", _healed(lab.array), lab.geometry)
    assert _run_cli(trial / "manifest_ok.csv", out) == 0
    assert _last_summary(out) == (1, 3, 0)
    assert (out / "S01" / "m6" / "manifest.json").stat().st_mtime_ns == stamp
    assert _scan_metric(out, "S02", "m6", "bone_marrow_lesion", "volume") == 0
    assert len(pd.read_csv(out / "failures.csv")) == 0
    man = json.loads((out / "S02" / "m6" / "manifest.json").read_text())
    b = man["batch"]
    assert b["inputs_sha256"]["seg"] != json.loads(
        (out / "S02" / "bl" / "manifest.json").read_text())["batch"]["inputs_sha256"]["seg"]
    assert {"measure", "qc", "score"} <= set(b["config_hashes"]) and b["segmentation"] == "given"
    assert man["cartiq_version"] and "measure" in b["stage_timings_s"]
    scan_log = (out / "S02" / "m6" / "scan.log").read_text()  # runs 2, 3 and 4
    assert scan_log.count("processing") == 2 and scan_log.count("up to date") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCANS = [("S01", "baseline"), ("S01", "m6"), ("S02", "bl"), ("S02", "m6")]


def _assert_all_four_scans_done(r, out):
    """After a worker was killed mid-run: every scan of the trial completed, none failed."""
    assert r.exit_code == 0 and r.count("done") == 4 and r.failures == []
    for sid, tp in SCANS:
        assert _complete(out / sid / tp)
    assert _scan_metric(out, "S01", "baseline", "bone_marrow_lesion", "volume") > 50


@pytest.mark.slow
def test_dask_cluster_survives_a_killed_worker(trial, tmp_path):
    from distributed import Client

    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "5"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    workers = {}
    client = None
    try:
        for name in ("w0", "w1"):
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--name", name,
                 "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            procs.append(workers[name])
        client = Client(addr, timeout="60s")
        client.wait_for_workers(2, timeout=90)
        out = tmp_path / "out"
        result = {}
        runner = threading.Thread(target=lambda: result.update(r=run_batch(
            trial / "manifest_ok.csv", BatchOptions(out=out, scheduler=addr, reports=False))))
        runner.start()
        victim = None
        deadline = time.monotonic() + 120
        while victim is None:
            assert time.monotonic() < deadline and runner.is_alive()
            info = client.scheduler_info()["workers"]
            for waddr, keys in client.processing().items():
                if any("process_scan" in str(k) for k in keys):
                    victim = info[waddr]["name"]
                    break
            time.sleep(0.05)
        time.sleep(0.5)  # well into the scan
        workers[victim].kill()
        runner.join(timeout=200)
        assert not runner.is_alive()
        _assert_all_four_scans_done(result["r"], out)
        for sid, tp in SCANS:
            df = pd.read_csv(out / sid / tp / "measurements.csv")
            assert len(df) > 100 and df.value.notna().any()
        assert _scan_metric(out, "S01", "m6", "bone_marrow_lesion", "volume") == 0
        meas = pd.read_csv(out / "measurements.csv")
        assert sorted(set(zip(meas.subject_id, meas.timepoint))) == \
            [("S01", "baseline"), ("S01", "m6"), ("S02", "bl"), ("S02", "m6")]
        assert len(client.scheduler_info()["workers"]) == 1  # the victim really is gone
    finally:
        if client is not None:
            client.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_local_pool_survives_a_killed_worker(trial, tmp_path):
    import psutil

    out = tmp_path / "out"
    result = {}
    runner = threading.Thread(target=lambda: result.update(r=run_batch(
        trial / "manifest_ok.csv", BatchOptions(out=out, workers=2, reports=False))))
    runner.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None:  # a pool worker, once a scan is under way
        assert time.monotonic() < deadline and runner.is_alive()
        busy = any((d / "scan.log").exists() and not (d / "manifest.json").exists()
                   for d in out.glob("*/*"))
        workers = []
        for child in psutil.Process().children():
            try:
                if "forkserver" in " ".join(child.cmdline()):
                    workers += child.children()
            except psutil.Error:  # a zombie or a process that just ended
                continue
        if busy and workers:
            victim = workers[0]
        time.sleep(0.05)
    time.sleep(0.5)
    victim.kill()
    runner.join(timeout=200)
    assert not runner.is_alive()
    _assert_all_four_scans_done(result["r"], out)
    assert _scan_metric(out, "S01", "m6", "bone_marrow_lesion", "volume") == 0
    assert "a worker process died; restarting the pool" in (out / "batch.log").read_text()
    assert not victim.is_running()


def test_segmenter_loaded_once_per_worker(monkeypatch):
    import cartiq.batch.batch as batch
    import cartiq.segmentation.segmenter as segment

    made = []

    class FakeSegmenter:
        def __init__(self, model, *, device):
            made.append((model, device))

    monkeypatch.setattr(segment, "Segmenter", FakeSegmenter)
    monkeypatch.setattr(batch, "_SEGMENTERS", {})
    first = batch._segmenter(None, "cpu")
    assert batch._segmenter(None, "cpu") is first
    assert batch._segmenter("other_model", "cpu") is not first
    assert made == [(None, "cpu"), ("other_model", "cpu")]


def test_cohort_summary_statistics():
    from cartiq.batch.cohort import SUMMARY_COLUMNS, summarize_change

    values = pd.DataFrame({
        "subject_id": ["a1", "a2", "a3", "b1"], "timepoint": "m12", "measure": "thickness",
        "structure": "femoral_cartilage", "region": "all", "metric": "thickness_mean",
        "unit": "mm", "change": [-0.1, -0.3, -0.2, 0.5], "exceeds": [1.0, 1.0, 0.0, np.nan]})
    subjects = {"a1": {"arm": "MSC", "stage_group": "early"},
                "a2": {"arm": "MSC", "stage_group": "early"},
                "a3": {"arm": "MSC", "stage_group": "early"},
                "b1": {"arm": "placebo", "stage_group": "late"}}
    s = summarize_change(values, subjects)
    assert list(s.columns) == SUMMARY_COLUMNS
    got = {(r.arm, r.stage_group): r for r in s.itertuples()}
    assert list(got) == [("MSC", "early"), ("MSC", "all"), ("placebo", "late"),
                         ("placebo", "all"), ("all", "early"), ("all", "late"), ("all", "all")]
    a = got[("MSC", "early")]
    assert (a.n, a.n_exceeding_sdc) == (3, 2)
    assert a.mean_change == pytest.approx(-0.2) and a.sd_change == pytest.approx(0.1)
    assert a.srm == pytest.approx(-2.0) and a.pct_exceeding_sdc == pytest.approx(200 / 3)
    b = got[("placebo", "late")]
    assert b.n == 1 and b.mean_change == pytest.approx(0.5)
    assert np.isnan(b.sd_change) and np.isnan(b.srm) and np.isnan(b.pct_exceeding_sdc)
    t = got[("all", "all")]
    assert t.n == 4 and t.mean_change == pytest.approx(-0.025)
    assert t.sd_change == pytest.approx(np.std([-0.1, -0.3, -0.2, 0.5], ddof=1))
    assert t.pct_exceeding_sdc == pytest.approx(200 / 3)  # unknown flags are not counted


def test_reports_are_written_and_never_fail_the_batch(tmp_path, monkeypatch):
    import cartiq.report.cohort as cohort_report
    import cartiq.report.scan as report
    from cartiq.batch.cohort import write_reports

    for sid in ("S01", "S02"):
        (tmp_path / sid).mkdir()
    calls = []

    class Result:
        def __init__(self, errors):
            self.errors = errors

    def subject(folder):
        calls.append(folder.name)
        if folder.name == "S02":
            raise RuntimeError("figure exploded")
        return Result([])

    monkeypatch.setattr(report, "write_subject_report", subject)
    monkeypatch.setattr(cohort_report, "write_cohort_report",
                        lambda folder: calls.append("cohort") or Result(["no MOCART data"]))
    errors = write_reports(tmp_path, ["S01", "S02", "S03"])  # S03: no folder, no report
    assert calls == ["S01", "S02", "cohort"]
    assert errors == [f"{tmp_path / 'S02'}: RuntimeError: figure exploded",
                      f"{tmp_path}: no MOCART data"]


def test_pool_reruns_after_a_crash_alone():
    """A task that kills its worker process fails (stage worker) after the retries; the pool
    is restarted each time and every other task completes."""
    from cartiq.batch.executors import LocalPool, WorkerFailure

    pool = LocalPool(2, retries=2)
    try:
        pool.submit(os._exit, 7)  # the worker process exits abruptly
        for _ in range(3):
            pool.submit(time.sleep, 0.3)
        got = list(pool.results())
    finally:
        pool.close()
    failed = [o for t, o in got if t == 7]
    assert len(failed) == 1 and isinstance(failed[0], WorkerFailure)
    assert "died 3 times" in failed[0].error
    assert [o for t, o in got if t != 7] == [None, None, None]


def test_qc_limits_are_part_of_the_fingerprint(monkeypatch):
    """Other QC limits give other QC statuses: a resumed batch must not keep the old ones."""
    from cartiq.batch.manifest import config_hashes
    from cartiq.measurement import qc

    before = config_hashes(None)
    base = qc.load_qc_config()
    stricter = base.model_copy(update={"max_thickness_mm": base.max_thickness_mm - 1.0})
    monkeypatch.setattr(qc, "load_qc_config", lambda path=None: stricter)
    after = config_hashes(None)
    assert before["qc"] != after["qc"]
    assert {k: v for k, v in before.items() if k != "qc"} == \
        {k: v for k, v in after.items() if k != "qc"}


def test_side_override_column_keeps_a_contradicted_side(trial, tmp_path):
    """A right phantom listed as left: the scan fails (anatomy contradicts the side) unless
    the row says side_override, when it is measured as left and the manifest says so."""
    img, seg = "phantom/image.nii.gz", "phantom/seg.nii.gz"
    for override, name in (("", "plain"), ("yes", "kept")):
        csv = tmp_path / f"{name}.csv"
        csv.write_text(f"subject_id,timepoint,image,seg,side,side_override\n"
                       f"S09,baseline,{trial / img},{trial / seg},left,{override}\n")
        out = tmp_path / name
        assert _run_cli(csv, out) == (EXIT_FAILED if not override else 0)
        folder = out / "S09" / "baseline"
        if not override:
            assert not _complete(folder)
            log = (folder / "scan.log").read_text()
            assert "side column says left but the anatomy says right" in log
            assert "side_override column" in log
            continue
        assert _complete(folder)
        m = json.loads((folder / "manifest.json").read_text())
        assert m["side"] == "left"
        assert m["side_check"]["overridden"] is True and m["side_check"]["anatomy"] == "right"
