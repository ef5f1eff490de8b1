"""Benchmark: `cartiq measure` on the pymskt DESS label map (384 x 384 x 160).

Target (issue 13): at most 6 s wall on 2 CPU cores (median of 5 runs), peak memory under
1 GB.  Runs the real command in a subprocess N times and reports the median wall time, the
peak resident memory of each run (from os.wait4) and the median of the manifests' time
split (``timings_s``: read, measure and write overlap in threads, see README).  Not a test:
run it by hand,

    python benchmarks/measure_bench.py [--runs 5] [--mirror ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from _common import pymskt_case, timed_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mirror", type=Path, default=Path(os.environ.get("CARTIQ_DATA_MIRROR", "../shared/data")))
    ap.add_argument("--no-qc-note", action="store_true")
    args = ap.parse_args()

    seg, vol, _, work = pymskt_case(args.mirror)

    walls, peaks, splits = [], [], []
    for i in range(args.runs):
        out = work / f"out{i}"
        run = timed_run([sys.executable, "-m", "cartiq", "-q", "measure",
                         str(work / "image.nii.gz"), "--seg", str(seg),
                         "--labels", "pymskt_dess", "-o", str(out)])
        walls.append(run.wall_s)
        peaks.append(run.peak_rss_mib)
        if run.rc != 0:
            raise SystemExit(f"run {i} failed with exit code {run.rc}: {run.output[-500:]}")
        splits.append(json.loads((out / "manifest.json").read_text())["timings_s"])
    print(f"runs: {args.runs}; cpu cores: {os.cpu_count()}")
    print(f"wall s: median {statistics.median(walls):.2f} (min {min(walls):.2f}, max {max(walls):.2f})")
    print(f"peak RSS MiB: median {statistics.median(peaks):.0f} (max {max(peaks):.0f})")
    print("manifest timings_s, median: " + ", ".join(
        f"{k} {statistics.median(t[k] for t in splits):.2f}" for k in splits[0]))


if __name__ == "__main__":
    main()
