"""Benchmark of ``cartiq batch``: parallel speed-up and per-scan overhead of the machinery.

Not a test.  Builds N phantom scans (one phantom, default grid 0.45 x 0.45 x 1.0 mm, written
to N separate files; label maps given so no model runs; N subjects with one baseline visit
each, so no comparisons).  Then, ``--repeats`` times and interleaved so that load changes hit
all alike, each in a fresh process on a fresh output folder:

* ``direct``: the same scans without the batch: one Python process that imports the stages
  and calls ``run_measure`` then ``run_score`` for each scan in turn (what a user's own loop
  over the stage functions would do);
* ``cartiq batch`` with 1 local worker and with 2 (manifest check, scans, cohort tables; HTML
  reports off).

Reported (medians):

* speed-up = wall(1 worker) / wall(2 workers); every run pays its interpreter start-up and
  imports, the 2-worker runs also the start of the process pool;
* a scan's own time = its stage timings from its ``manifest.json`` (measure + score);
* overhead of the batch machinery per scan = (wall(batch, 1 worker) - wall(direct)) / N:
  what the batch adds to the same work - manifest validation, input hashing for resume,
  per-scan logs and manifests, the cohort tables and their imports (pandas), scheduling;
  as % of a scan's own time;
* whole-command overhead per scan = (wall(batch, 1 worker) - sum of the scans' own times) / N:
  additionally the interpreter start-up, the stages' imports and the interpreter's exit,
  which any way of running the scans pays once per process.

Usage::

    python benchmarks/batch_bench.py [--scans 8] [--repeats 5] [--spacing 0.45,0.45,1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_scans(folder: Path, n: int, spacing: tuple[float, float, float]) -> Path:
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

    paths = write_phantom(make_phantom(PhantomSpec(seed=7, spacing_mm=spacing)), folder / "ph")
    rows = ["subject_id,timepoint,image,seg,side,arm,kl_grade"]
    for i in range(n):
        d = folder / f"s{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths["image"], d / "image.nii.gz")
        shutil.copy(paths["seg"], d / "seg.nii.gz")
        rows.append(f"B{i:02d},baseline,{d.name}/image.nii.gz,{d.name}/seg.nii.gz,right,"
                    f"{'MSC' if i % 2 else 'placebo'},{1 + i % 4}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def direct(manifest: Path, out: Path) -> None:
    """The scans of ``manifest`` through the stage functions in one loop, no batch."""
    import csv

    from cartiq.measurement.measure import run_measure
    from cartiq.scoring.mocart import run_score

    own = []
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            scan_out = out / row["subject_id"] / row["timepoint"]
            t0 = time.perf_counter()
            run_measure(manifest.parent / row["image"], manifest.parent / row["seg"], scan_out,
                        side=row["side"])
            run_score(scan_out, scan_out / "score")
            own.append(time.perf_counter() - t0)
    (out / "direct_own_s.json").write_text(json.dumps(own))


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; its wall time and the CPU time (user + system) of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def direct_run(manifest: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = _timed([sys.executable, str(Path(__file__).resolve()), "--direct",
                        str(manifest), str(out)])
    own = json.loads((out / "direct_own_s.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "scan_own_s": own, "load": os.getloadavg()[0]}


def one_run(manifest: Path, out: Path, workers: int) -> dict:
    """One ``cartiq batch`` command in a fresh process, as a user runs it (imports included)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cartiq", "-q", "batch", str(manifest), "-o", str(out),
           "--workers", str(workers), "--no-progress", "--no-report"]
    wall, cpu = _timed(cmd)
    own, hashing = [], []
    for m in sorted(out.glob("*/*/manifest.json")):
        st = json.loads(m.read_text())["batch"]["stage_timings_s"]
        own.append(sum(v for k, v in st.items() if k in ("segment", "measure", "score")))
        hashing.append(st.get("hash", 0.0))
    return {"workers": workers, "wall_s": wall, "cpu_s": cpu, "scan_own_s": own, "hash_s": hashing,
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--spacing", default="0.45,0.45,1.0", help="phantom voxel size (mm)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--direct", nargs=2, type=Path, metavar=("MANIFEST", "OUT"),
                    help=argparse.SUPPRESS)  # internal: the no-batch baseline run
    args = ap.parse_args()
    if args.direct:
        direct(*args.direct)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cartiq-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    spacing = tuple(float(x) for x in args.spacing.split(","))
    manifest = make_scans(work / "data", args.scans, spacing)  # type: ignore[arg-type]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    direct_runs: list[dict] = []
    for rep in range(args.repeats):
        d = direct_run(manifest, work / "out_direct")
        direct_runs.append(d)
        print(f"repeat {rep + 1} direct: wall {d['wall_s']:.1f} s, cpu {d['cpu_s']:.1f} s, "
              f"load average {d['load']:.1f}", flush=True)
        for workers in (1, 2):  # interleaved, so that load changes hit both alike
            r = one_run(manifest, work / f"out_w{workers}", workers)
            runs[workers].append(r)
            print(f"repeat {rep + 1} workers {workers}: wall {r['wall_s']:.1f} s, "
                  f"cpu {r['cpu_s']:.1f} s, "
                  f"scan own time median {statistics.median(r['scan_own_s']):.2f} s, "
                  f"load average {r['load']:.1f}", flush=True)
    wall1 = statistics.median(r["wall_s"] for r in runs[1])
    wall2 = statistics.median(r["wall_s"] for r in runs[2])
    own_per_run = [sum(r["scan_own_s"]) for r in runs[1]]
    scan_own = statistics.median(t for r in runs[1] for t in r["scan_own_s"])
    # 2 workers: wall time against an ideal split of the scans' own times over 2 workers;
    # near 1 when the machinery parallelizes well even if the CPUs are contended
    efficiency = statistics.median(sum(r["scan_own_s"]) / 2 / r["wall_s"] for r in runs[2])
    overhead = statistics.median((r["wall_s"] - sum(r["scan_own_s"])) / args.scans
                                 for r in runs[1])
    wall_direct = statistics.median(d["wall_s"] for d in direct_runs)
    # paired by repeat (direct and 1 worker run back to back), median of the differences
    machinery = statistics.median(r["wall_s"] - d["wall_s"]
                                  for r, d in zip(runs[1], direct_runs)) / args.scans
    # the same, with each run's own scan times taken out (they vary from process to process
    # by more than the machinery costs): the difference of the fixed costs outside the stages
    machinery_fixed = statistics.median(
        (r["wall_s"] - sum(r["scan_own_s"])) - (d["wall_s"] - sum(d["scan_own_s"]))
        for r, d in zip(runs[1], direct_runs)) / args.scans
    machinery_cpu = statistics.median(r["cpu_s"] - d["cpu_s"]
                                      for r, d in zip(runs[1], direct_runs)) / args.scans
    summary = {
        "scans": args.scans, "repeats": args.repeats, "spacing_mm": spacing,
        "cpu_count": os.cpu_count(),
        "median_wall_direct_s": round(wall_direct, 2),
        "median_wall_1_worker_s": round(wall1, 2), "median_wall_2_workers_s": round(wall2, 2),
        "speedup": round(wall1 / wall2, 3),
        "median_parallel_efficiency_2_workers": round(efficiency, 3),
        "median_scan_own_s": round(scan_own, 3),
        "median_sum_scan_own_1_worker_s": round(statistics.median(own_per_run), 2),
        "machinery_overhead_per_scan_s": round(machinery, 3),
        "machinery_overhead_pct_of_scan": round(100 * machinery / scan_own, 2),
        "machinery_overhead_outside_stages_per_scan_s": round(machinery_fixed, 3),
        "machinery_overhead_outside_stages_pct_of_scan": round(100 * machinery_fixed / scan_own, 2),
        "median_scan_own_direct_s": round(statistics.median(
            t for d in direct_runs for t in d["scan_own_s"]), 3),
        "machinery_overhead_cpu_per_scan_s": round(machinery_cpu, 3),
        "machinery_overhead_cpu_pct_of_scan": round(100 * machinery_cpu / scan_own, 2),
        "median_cpu_direct_s": round(statistics.median(d["cpu_s"] for d in direct_runs), 2),
        "median_cpu_1_worker_s": round(statistics.median(r["cpu_s"] for r in runs[1]), 2),
        "command_overhead_per_scan_s": round(overhead, 3),
        "command_overhead_pct_of_scan": round(100 * overhead / scan_own, 2),
        "median_hash_per_scan_s": round(statistics.median(
            h for r in runs[1] for h in r["hash_s"]), 4),
        "load_average_during_runs": [round(r["load"], 1) for w in (1, 2) for r in runs[w]]
        + [round(d["load"], 1) for d in direct_runs],
    }
    print(json.dumps(summary, indent=2))
    (work / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
