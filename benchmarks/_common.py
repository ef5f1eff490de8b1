"""Pieces shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np


def median_cpu_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of ``fn()`` (CPU, not wall: the machine may be shared)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


class TimedRun(NamedTuple):
    rc: int
    output: str  # stdout and stderr together
    wall_s: float
    peak_rss_mib: float


def timed_run(cmd: list[str]) -> TimedRun:
    """Run a command in a fresh process: exit code, output, wall time and peak RSS (from
    ``os.wait4``, so the child's own peak, not this process's)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return TimedRun(os.waitstatus_to_exitcode(status), output, time.monotonic() - t0,
                    usage.ru_maxrss / 1024.0)  # KiB -> MiB on Linux


def pymskt_case(mirror: Path):
    """The real pymskt DESS label map (fetched from ``mirror``) and a synthetic float32 image
    on its grid (per-label intensity + noise, seeded) written to a fresh temporary folder.

    Returns (label map path, its Volume, image path, work folder)."""
    from cartiq.data.fetch import fetch_sample
    from cartiq.io.volume import read_volume, write_volume

    seg = fetch_sample("pymskt_dess_labels", mirror=mirror)
    work = Path(tempfile.mkdtemp(prefix="cartiq-bench-"))
    vol = read_volume(seg, kind="labels")
    rng = np.random.default_rng(0)
    tissue = rng.uniform(50, 250, size=int(vol.array.max()) + 1)
    image = work / "image.nii.gz"
    write_volume(image, (tissue[vol.array] + rng.normal(0, 10, vol.array.shape))
                 .astype(np.float32), vol.geometry)
    return seg, vol, image, work
