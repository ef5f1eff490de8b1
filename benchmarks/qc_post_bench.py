"""Benchmark: what the anatomical clean-up and the QC checks cost (issue 11).

Times, on one label map in the cartiq scheme (default: the real pymskt DESS map, 384 x 384 x
160; or any segmentation, e.g. a ``cartiq run`` output's ``segmentation.nii.gz``):

1. :func:`cartiq.segmentation.post.clean_prediction` on the map turned into model outputs
   (tibial cartilage and menisci without medial/lateral) - the clean-up after the network;
2. :func:`cartiq.segmentation.post.check_medial_lateral`;
3. :func:`cartiq.measurement.qc.qc_checks` (flags only, no figure, no thickness).

Not a test: run it by hand,

    python benchmarks/qc_post_bench.py [--seg FILE --side right] [--repeats 3] [--mirror ../shared/data]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seg", type=Path, help="label map in the cartiq scheme")
    ap.add_argument("--side", default="right")
    ap.add_argument("--mirror", type=Path, default=Path(__file__).resolve().parents[1].parent
                    / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from cartiq.io.labels import default_scheme, load_mapping, to_default_scheme
    from cartiq.io.volume import read_volume
    from cartiq.measurement.qc import qc_checks
    from cartiq.segmentation.post import check_medial_lateral, clean_prediction
    from cartiq.segmentation.synth import MODEL_CLASSES

    s = default_scheme()
    if a.seg is None:
        vol = read_volume(a.mirror / "labels" / "pymskt_dess_right_label.nrrd", kind="labels")
        lab, _ = to_default_scheme(vol.array, load_mapping("pymskt_dess"), vol.geometry.affine,
                                   side=a.side)
    else:
        vol = read_volume(a.seg, kind="labels")
        lab = vol.array
    g = vol.geometry
    model = {n: i for i, n in enumerate(MODEL_CLASSES)}
    labels = {i: n for i, n in enumerate(MODEL_CLASSES) if n != "background"}
    raw = np.zeros(lab.shape, np.uint8)
    for name, value in model.items():
        if name in s.labels and name != "background":
            raw[lab == s[name]] = value
    raw[np.isin(lab, [s["medial_tibial_cartilage"], s["lateral_tibial_cartilage"]])] = \
        model["tibial_cartilage"]
    raw[np.isin(lab, [s["medial_meniscus"], s["lateral_meniscus"]])] = model["meniscus"]

    def timed(fn) -> float:
        runs = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    print(f"label map {lab.shape}, spacing {np.round(g.spacing, 4).tolist()} mm")
    print(f"clean_prediction     {timed(lambda: clean_prediction(raw, g, labels, 20.0)):.2f} s")
    print(f"check_medial_lateral {timed(lambda: check_medial_lateral(lab.copy(), g, a.side)):.2f} s")
    print(f"qc_checks            {timed(lambda: qc_checks(lab, g, side=a.side)):.2f} s")


if __name__ == "__main__":
    main()
