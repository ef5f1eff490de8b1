"""`cartiq run` on the real qDESS (issue 11 target: <= 60 s wall, <= 3 GB on 2 CPU cores).

    python benchmarks/run_bench.py --runs 3 --mirror ../shared/data [--model NAME_OR_FOLDER]

Runs the real command in a fresh process each time (no `--side`: the side is found from
the anatomy, as a user without header laterality would run it), reads each run's peak RSS
from ``os.wait4`` and the stage split from its ``manifest.json``; prints JSON with the
median and range of the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _common import timed_run


def main() -> None:
    from cartiq.data.fetch import fetch_sample

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mirror", type=Path, default=Path("../shared/data"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    scan = fetch_sample("pykneer_qdess", mirror=a.mirror) / "echo1"
    work = Path(tempfile.mkdtemp(prefix="cartiq-run-bench-"))
    runs = []
    try:
        for i in range(a.runs):
            out = work / f"run{i}"
            cmd = [sys.executable, "-m", "cartiq", "run", str(scan), "-o", str(out),
                   "--device", a.device] + (["--model", a.model] if a.model else [])
            run = timed_run(cmd)
            if run.rc != 0:
                raise SystemExit(f"cartiq run failed (rc {run.rc}): {run.output.strip()[-500:]}")
            man = json.loads((out / "manifest.json").read_text())
            runs.append({"wall_s": round(run.wall_s, 1), "peak_rss_mib": round(run.peak_rss_mib),
                         "segment_timings_s": (man.get("segmentation") or {}).get("timings_s"),
                         "measure_timings_s": man.get("timings_s"), "side": man.get("side"),
                         "side_source": man.get("side_source"), "qc": man["qc"]["status"]})
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    walls = [r["wall_s"] for r in runs]
    print(json.dumps({"scan": "pykneer_qdess echo1 (512x512x80)", "runs": runs,
                      "median_wall_s": statistics.median(walls),
                      "range_wall_s": [min(walls), max(walls)],
                      "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                      "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
