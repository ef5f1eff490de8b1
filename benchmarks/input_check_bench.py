"""Benchmark: what proving the inputs complete costs `cartiq measure` (issue 14).

Target: input validation adds at most 10% to `cartiq measure` on the pymskt DESS label map
(384 x 384 x 160, gzip NRRD) with a synthetic float32 image of its geometry (.nii.gz).

Two measurements:

1. in-process, median CPU time of ``--repeats`` calls: :func:`cartiq.io.integrity.check_complete` on
   the label map and on the image (read to the end, gzip CRC, byte count, sha256), and the
   anatomical side evidence (:func:`cartiq.io.side.anatomy_evidence`) on the mapped labels;
2. the real command in a subprocess, ``--runs`` times each, alternating: as shipped, and
   with ``check_complete`` replaced by a no-op (the manifest then hashes the files
   separately, as before the check existed).  Median CPU time (user + system, from
   ``os.wait4``) and wall time of each, and the difference, are printed; CPU time is the
   figure to trust on a shared machine.

Not a test: run it by hand,

    python benchmarks/input_check_bench.py [--runs 3] [--repeats 5] [--mirror ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import median_cpu_seconds, pymskt_case

NO_CHECK = ("import sys, cartiq.io.integrity as m; m.check_complete = lambda path, **kw: None; "
            "from cartiq.cli import main; sys.argv[0] = 'cartiq'; main()")


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s = user + system of the child) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed: {err[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mirror", type=Path,
                    default=Path(os.environ.get("CARTIQ_DATA_MIRROR", "../shared/data")))
    args = ap.parse_args()

    from cartiq.io.integrity import check_complete
    from cartiq.io.labels import default_scheme, load_mapping
    from cartiq.io.side import anatomy_evidence
    seg, vol, image, work = pymskt_case(args.mirror)

    scheme = default_scheme()
    lut = np.zeros(int(vol.array.max()) + 1, np.uint8)
    for value, name in load_mapping("pymskt_dess").map.items():
        lut[value] = scheme.labels.get(name, 0)
    labels = lut[vol.array]
    fibula = vol.array == 8
    t_seg = median_cpu_seconds(lambda: check_complete(seg), args.repeats)
    t_img = median_cpu_seconds(lambda: check_complete(image), args.repeats)
    t_side = median_cpu_seconds(lambda: anatomy_evidence(labels, vol.geometry.affine, scheme.labels,
                                                   fibula=fibula), args.repeats)
    print(f"label map {seg.name}: {seg.stat().st_size / 1e6:.2f} MB on disk, "
          f"{vol.array.size / 1e6:.1f} M voxels")
    print(f"image {image.name}: {image.stat().st_size / 1e6:.1f} MB on disk (float32)")
    print(f"check_complete label map: median {t_seg:.3f} CPU s ({args.repeats} repeats)")
    print(f"check_complete image:     median {t_img:.3f} CPU s")
    print(f"side evidence (fibula + plates): median {t_side:.3f} CPU s")

    base = ["-q", "measure", str(image), "--seg", str(seg), "--labels", "pymskt_dess"]
    with_check, without = [], []
    for i in range(args.runs):  # alternating, so that load drifts hit both alike
        with_check.append(_run([sys.executable, "-m", "cartiq", *base, "-o",
                                str(work / f"a{i}")]))
        without.append(_run([sys.executable, "-c", NO_CHECK, *base, "-o",
                             str(work / f"b{i}")]))
    print(f"cartiq measure, {args.runs} runs each, cpu cores {os.cpu_count()}:")
    for k, what in ((1, "CPU s (user+sys)"), (0, "wall s")):
        a = statistics.median(r[k] for r in with_check)
        b = statistics.median(r[k] for r in without)
        print(f"  {what}: with input checks median {a:.2f} "
              f"[{', '.join(f'{r[k]:.2f}' for r in with_check)}]; checks as no-op median "
              f"{b:.2f} [{', '.join(f'{r[k]:.2f}' for r in without)}]; added "
              f"{a - b:+.2f} = {100 * (a - b) / b:+.1f}%")


if __name__ == "__main__":
    main()
