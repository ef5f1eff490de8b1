"""Benchmark: a batch with follow-ups measures each scan once (issue: measure once).

Not a test.  Builds ``--subjects`` phantom knees with two visits each (baseline and a
follow-up whose femoral cartilage is thinner; label maps given, so no model runs) and,
``--repeats`` times, interleaved, each in a fresh process:

* ``cartiq measure`` of one scan (a single command: interpreter start-up, imports, the
  measurement, its outputs);
* ``cartiq batch --workers 1`` over the baselines only (measure + MOCART score of every
  scan, cohort tables; HTML reports off): the batch's cost per scan against one command;
* ``cartiq batch --workers 1`` over all visits (the same plus one comparison per subject).

Reported (medians): the batch's wall time per scan against one ``cartiq measure``, and the
stage timings the batch recorded (measure, score, compare), with the number of times the
comparison stage measured a visit again (from the comparisons' ``timings_s.measure``; with
the saved surfaces it is ~0 s).

Usage::

    python benchmarks/measure_once_bench.py [--subjects 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_trial(folder: Path, subjects: int, spacing: tuple[float, float, float]) -> Path:
    from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom
    from cartiq.io.labels import default_scheme
    from cartiq.io.volume import write_volume

    ph = make_phantom(PhantomSpec(seed=5, spacing_mm=spacing))
    paths = write_phantom(ph, folder / "ph")
    s = default_scheme()
    thin = ph.labels.array.copy()
    fc = thin == s["femoral_cartilage"]
    thin[fc & (np.cumsum(fc, axis=2) <= 1)] = s["femur"]
    write_volume(folder / "fu_seg.nii.gz", thin, ph.labels.geometry)
    rows = ["subject_id,timepoint,image,seg,side,arm,kl_grade"]
    for i in range(subjects):
        arm = "MSC" if i % 2 else "placebo"
        rows.append(f"S{i:02d},baseline,{paths['image']},{paths['seg']},right,{arm},2")
        rows.append(f"S{i:02d},m12,{paths['image']},{folder / 'fu_seg.nii.gz'},right,{arm},2")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    (folder / "baselines.csv").write_text("\n".join(r for r in rows if ",m12," not in r) + "\n")
    return manifest


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", default="0.45,0.45,1.0")
    args = ap.parse_args()
    spacing = tuple(float(x) for x in args.spacing.split(","))
    cq = [sys.executable, "-m", "cartiq", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_trial(tmp, args.subjects, spacing)
        n = 2 * args.subjects
        single, batch, base_only, stages = [], [], [], {"measure": [], "score": [], "compare": [],
                                        "compare_measure": []}
        for r in range(args.repeats):
            out = tmp / f"m{r}"
            single.append(timed(cq + ["measure", str(tmp / "ph" / "image.nii.gz"), "--seg",
                                      str(tmp / "ph" / "seg.nii.gz"), "-o", str(out),
                                      "--side", "right"]))
            shutil.rmtree(out)
            out = tmp / f"o{r}"
            base_only.append(timed(cq + ["batch", str(tmp / "baselines.csv"), "-o", str(out),
                                         "--workers", "1", "--no-report", "--no-progress"]))
            shutil.rmtree(out)
            out = tmp / f"b{r}"
            batch.append(timed(cq + ["batch", str(manifest), "-o", str(out), "--workers", "1",
                                     "--no-report", "--no-progress"]))
            for m in out.glob("S*/*/manifest.json"):
                t = json.loads(m.read_text()).get("timings_s", {})
                if m.parent.name.startswith("compare"):
                    stages["compare"].append(sum(v for v in t.values() if isinstance(v, float)))
                    stages["compare_measure"].append(t.get("measure", float("nan")))
                else:
                    stages["measure"].append(t.get("measure", float("nan")))
            for m in out.glob("S*/*/score/manifest.json"):
                t = json.loads(m.read_text()).get("timings_s", {})
                if t:
                    stages["score"].append(sum(t.values()))
            shutil.rmtree(out)
        med = statistics.median
        per_scan = med(batch) / n
        print(f"{n} scans ({args.subjects} subjects x 2 visits), grid {args.spacing} mm, "
              f"{args.repeats} repeats (medians)")
        print(f"cartiq measure, one scan:        {med(single):.2f} s")
        per_base = med(base_only) / args.subjects
        print(f"cartiq batch, baselines only:    {med(base_only):.2f} s = {per_base:.2f} s per scan "
              f"({100 * (per_base / med(single) - 1):+.1f}% vs one cartiq measure; measure + score)")
        print(f"cartiq batch with follow-ups:    {med(batch):.2f} s = {per_scan:.2f} s per scan "
              f"({100 * (per_scan / med(single) - 1):+.1f}% vs one cartiq measure; + one "
              "comparison per subject)")
        for k, v in stages.items():
            if v:
                print(f"  stage {k:16s} median {med(v):.3f} s over {len(v)} records")


if __name__ == "__main__":
    main()
