"""Benchmark: the registration residual flag on real anatomy (issue 13, item 5).

Target: 0 of the bones of a no-change pair flagged; a pair with a wrong bone correspondence
(a follow-up from another knee) flagged.  Pairs, all at OAI DESS geometry
(0.36 x 0.36 x 0.7 mm, 384 x 384 x 160):

* ``nochange`` - a real right-knee label map and the same map moved by a small rigid motion,
  re-sampled (nearest neighbour) and re-segmented with a one-voxel boundary jitter of the
  bones (:mod:`cartiq.data.resegment`); two motions / seeds for the pymskt DESS map, one for
  the mskt right-knee example;
* ``nochange_nojitter`` - re-sampling only (the quantisation part of the noise);
* ``wrongknee`` - baseline pymskt DESS, follow-up the mskt right-knee example (another
  knee), and the reverse.

Prints one line per pair and bone: residual (mean, RMS, p95), its limit, the flag, Dice,
volume ratio and the residual in units of the voxel extent along the surface normal.  Not a
test: run it by hand (about 9 min on 2 busy cores),

    python benchmarks/registration_flag_bench.py [--mirror ../shared/data]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

BONES = ("femur", "tibia", "patella")


def load(path: Path):
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.io.volume import Volume, read_volume

    vol = read_volume(path, kind="labels")
    lab, _ = to_default_scheme(vol.array, load_mapping("pymskt_dess"), vol.geometry.affine,
                               side="right")
    return Volume(lab.astype(np.uint8), vol.geometry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", type=Path,
                    default=Path(os.environ.get("CARTIQ_DATA_MIRROR", "../shared/data")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from cartiq.data.resegment import resegmented_followup
    from cartiq.io.labels import default_scheme
    from cartiq.longitudinal.register import RegistrationConfig, register_bone

    s = default_scheme()
    bone_values = [s[b] for b in BONES]
    dess = load(args.mirror / "labels" / "pymskt_dess_right_label.nrrd")
    other = load(args.mirror / "labels" / "mskt_right_knee_example_label.nrrd")
    pairs = {
        "nochange pymskt_dess seed 0": (dess, resegmented_followup(dess, values=bone_values, seed=0)[0]),
        "nochange pymskt_dess seed 1": (dess, resegmented_followup(
            dess, rotation_deg=(-1.0, 2.0, -2.0), translation_mm=(-1.5, 1.0, 0.5),
            values=bone_values, seed=1)[0]),
        "nochange mskt_right seed 2": (other, resegmented_followup(
            other, rotation_deg=(1.5, 1.0, -2.5), translation_mm=(0.5, 2.0, -1.0),
            values=bone_values, seed=2)[0]),
        "nochange_nojitter pymskt_dess": (dess, resegmented_followup(dess)[0]),
        "wrongknee pymskt_dess <- mskt_right": (dess, other),
        "wrongknee mskt_right <- pymskt_dess": (other, dess),
    }
    cfg = RegistrationConfig(intensity_refinement=False)
    print("| pair | bone | residual mean / RMS / p95 (mm) | limit (mm) | flag | residual / voxel "
          "along normal | Dice | volume ratio | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (base, follow) in pairs.items():
        for bone in BONES:
            t0 = time.perf_counter()
            r = register_bone(bone, base, follow, config=cfg)
            ext = r.details.get("voxel_extent_along_normal_mm", float("nan"))
            print(f"| {name} | {bone} | {r.residual_mm:.3f} / {r.residual_rms_mm:.3f} / "
                  f"{r.residual_p95_mm:.3f} | {r.residual_limit_mm:.3f} | "
                  f"{'FLAG' if r.residual_flag else 'no'} | {r.residual_mm / ext:.2f} | "
                  f"{r.dice:.4f} | {r.volume_ratio:.3f} | {time.perf_counter() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
