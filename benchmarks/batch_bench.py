"""Benchmark of ``cartiq batch``: parallel speed-up and per-scan overhead of the machinery.

Not a test.  Builds N phantom scans (one coarse phantom written to N separate files, label
maps given so no model runs; N subjects with one baseline visit each, so no comparisons),
then runs the whole batch (manifest check, scans, cohort tables; HTML reports off) with 1
and with 2 local workers, ``--repeats`` times each on a fresh output folder, and reports
medians:

* speed-up = median wall(1 worker) / median wall(2 workers);
Each run is a separate ``cartiq batch`` process, so both sides pay the imports; the 2-worker
side also pays for starting the local process pool.

* a scan's own time = its stage timings from its ``manifest.json`` (measure + score,
  segment when run); batch overhead per scan = (wall(1 worker) - sum of the scans' own
  times) / N, i.e. everything else the batch does: hashing inputs for resume, logging,
  manifests, cohort tables, scheduling.  Reported as % of the median scan's own time.

Usage::

    python benchmarks/batch_bench.py [--scans 8] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_scans(folder: Path, n: int, spacing: tuple[float, float, float]) -> Path:
    from pipeline.phantom import PhantomSpec, make_phantom, write_phantom

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


def one_run(manifest: Path, out: Path, workers: int) -> dict:
    """One ``cartiq batch`` command in a fresh process, as a user runs it (imports included)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "-q", "batch", str(manifest), "-o", str(out),
           "--workers", str(workers), "--no-progress", "--no-report"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
    own, hashing = [], []
    for m in sorted(out.glob("*/*/manifest.json")):
        st = json.loads(m.read_text())["batch"]["stage_timings_s"]
        own.append(sum(v for k, v in st.items() if k in ("segment", "measure", "score")))
        hashing.append(st.get("hash", 0.0))
    return {"workers": workers, "wall_s": wall, "scan_own_s": own, "hash_s": hashing,
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", default="1.0,1.0,2.0", help="phantom voxel size (mm)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cartiq-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    spacing = tuple(float(x) for x in args.spacing.split(","))
    manifest = make_scans(work / "data", args.scans, spacing)  # type: ignore[arg-type]
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for workers in (1, 2):  # interleaved, so that load changes hit both alike
            r = one_run(manifest, work / f"out_w{workers}", workers)
            runs[workers].append(r)
            print(f"repeat {rep + 1} workers {workers}: wall {r['wall_s']:.1f} s, "
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
    summary = {
        "scans": args.scans, "repeats": args.repeats, "spacing_mm": spacing,
        "cpu_count": os.cpu_count(),
        "median_wall_1_worker_s": round(wall1, 2), "median_wall_2_workers_s": round(wall2, 2),
        "speedup": round(wall1 / wall2, 3),
        "median_parallel_efficiency_2_workers": round(efficiency, 3),
        "median_scan_own_s": round(scan_own, 3),
        "median_sum_scan_own_1_worker_s": round(statistics.median(own_per_run), 2),
        "overhead_per_scan_s": round(overhead, 3),
        "overhead_pct_of_scan": round(100 * overhead / scan_own, 2),
        "median_hash_per_scan_s": round(statistics.median(
            h for r in runs[1] for h in r["hash_s"]), 4),
        "load_average_during_runs": [round(r["load"], 1) for w in (1, 2) for r in runs[w]],
    }
    print(json.dumps(summary, indent=2))
    (work / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
