"""Benchmark ``cartiq segment`` on a 384 x 384 x 160 volume (not a test).

    python benchmarks/segment_bench.py --runs 3 [--mirror ../shared/data] [--model NAME]

The input is a synthetic DESS-like image rendered from the real pymskt label map in that
map's own grid (384 x 384 x 160, 0.365 x 0.365 x 0.7 mm, oblique sagittal), so the model
sees a knee.  Each run is a fresh ``cartiq segment`` process (model loading included);
reported: wall seconds per run and their median, peak resident memory of the process
(``ru_maxrss`` of the segment process itself, measured inside it: the input is made in a
separate process so no inherited high-water mark inflates it), CPU seconds, CPU count and
the load average before each run.  Target (issue 3): <= 60 s
wall on 2 CPU cores, peak memory < 4 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("segment_bench")


def make_input(mirror: Path, out: Path) -> Path:
    import torch

    from cartiq.data.fetch import fetch_sample
    from cartiq.io.volume import read_volume, write_volume
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.segmentation.synth import Renderer, SynthConfig, to_model_classes

    path = fetch_sample("pymskt_dess_labels", mirror=mirror)
    vol = read_volume(path, kind="labels")
    mp = load_mapping("pymskt_dess")
    cart, _ = to_default_scheme(vol.array, mp, vol.geometry.affine, path=path)
    classes = torch.from_numpy(to_model_classes(cart, vol.array == 8))
    cfg = SynthConfig(rotation_deg=0, scale_fraction=0, elastic_mm=0, mirror_probability=0,
                      bml_probability=0, random_contrast_probability=0.0)
    center = (torch.tensor(classes.shape, dtype=torch.float32) - 1) / 2
    img, _ = Renderer(cfg, seed=5).sample(classes, tuple(classes.shape), center=center)
    arr = (img.numpy() * 1000).astype(np.int16)
    return write_volume(out / "bench_384x384x160.nii.gz", arr, vol.geometry)


_WRAPPER = """
import atexit, json, resource, sys, time
t0 = time.perf_counter()
def _report():
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(sys.argv[1], "w") as fh:
        json.dump({"peak_rss_mb": r.ru_maxrss / 1024, "cpu_s": r.ru_utime + r.ru_stime,
                   "wall_s": time.perf_counter() - t0}, fh)
atexit.register(_report)
from cartiq.cli import main
main(sys.argv[2:])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description="benchmark cartiq segment")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--mirror", type=Path, default=Path("../shared/data"))
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--make-input", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.make_input is not None:
        make_input(a.mirror, a.make_input)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, "--make-input", str(tmp), "--mirror",
                        str(a.mirror)], check=True)
        image = tmp / "bench_384x384x160.nii.gz"
        walls, loads, peaks, cpus = [], [], [], []
        for i in range(a.runs):
            loads.append(round(os.getloadavg()[0], 2))
            stats = tmp / f"stats{i}.json"
            cmd = [sys.executable, "-c", _WRAPPER, str(stats), "-q", "segment", str(image),
                   "-o", str(tmp / f"out{i}"), "--device", "cpu"]
            if a.model:
                cmd += ["--model", a.model]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            walls.append(round(time.perf_counter() - t0, 2))
            st = json.loads(stats.read_text())
            peaks.append(round(st["peak_rss_mb"]))
            cpus.append(round(st["cpu_s"], 1))
            log.info("run %d: %.1f s wall, %.1f CPU s, peak %d MB (load average before: "
                     "%.2f)", i + 1, walls[-1], cpus[-1], peaks[-1], loads[-1])
        manifest = json.loads((tmp / "out0" / "manifest.json").read_text())
    result = {"shape": [384, 384, 160], "runs_s": walls, "median_s": statistics.median(walls),
              "cpu_s": cpus, "peak_rss_mb": peaks, "cpus": os.cpu_count(),
              "load_average_before": loads, "torch_threads": "default",
              "model": manifest["model"]["name"], "stage_timings_s": manifest["timings_s"]}
    log.info(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
