"""Precision like a scan-rescan study: the same knee rendered twice, measured twice.

Usage (from the repository root)::

    python benchmarks/precision_bench.py --pairs 6 [--method nearest|normal]

Each pair is the same phantom knee (``cartiq phantom``'s model) rendered at two poses inside
the fixed scanner grid - a random rotation (up to ``--max-rotation-deg`` about each axis) and
translation (up to ``--max-translation-mm`` along each) per visit, each visit with its own
noise seed - so the partial-volume sampling of every surface differs between the two
"scans", as after repositioning.  Both label maps are measured: by default the phantom's
labels (the measurement's share of scan-rescan error; noise does not enter), with
``--segment`` the default model's segmentation of each rendered, noisy image (``--model
PACKAGE``: another package's, e.g. a candidate before it ships).

Per pair and value, CV% = SD / mean of the two measurements (SD = |a - b| / sqrt 2);
the root-mean-square CV over pairs is reported per plate and per Wirth-Eckstein subregion
(thickness_mean), with the smallest detectable change SDC = 1.96 sqrt 2 x RMS SD (95%).
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np

PLATES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage")


_SEGMENTER = []


def _measure(spec, method: str, segment: bool, model: str | None = None) -> dict:
    from cartiq.config import MeasureConfig, ThicknessConfig
    from cartiq.data.phantom import make_phantom
    from cartiq.measurement.measure import measure_labels

    ph = make_phantom(spec)
    labels = ph.labels.array
    if segment:  # re-segment the rendered image with the default model
        from cartiq.segmentation.segmenter import Segmenter

        if not _SEGMENTER:
            _SEGMENTER.append(Segmenter(model, device="cpu"))
        labels = _SEGMENTER[0].run(ph.image, side=spec.side, side_override=True).labels
    cfg = MeasureConfig(thickness=ThicknessConfig(thickness_method=method))
    r = measure_labels(labels, ph.labels.geometry, side=spec.side, config=cfg)
    return {(row["structure"], row["region"]): row["value"] for row in r.rows
            if row["metric"] == "thickness_mean" and row["structure"] in PLATES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--method", default="nearest", choices=("nearest", "normal"))
    ap.add_argument("--max-rotation-deg", type=float, default=3.0)
    ap.add_argument("--max-translation-mm", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--segment", action="store_true",
                    help="measure the default model's segmentation of each rendered image")
    ap.add_argument("--model", default=None,
                    help="with --segment: this model package instead of the default model")
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    from cartiq.data.phantom import PhantomSpec

    rng = np.random.default_rng(a.seed)
    sd: dict[tuple[str, str], list[float]] = {}
    cv: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    for k in range(a.pairs):
        visits = []
        for _ in range(2):
            spec = PhantomSpec(
                seed=int(rng.integers(1 << 30)),
                rotation_deg=tuple(rng.uniform(-1, 1, 3) * a.max_rotation_deg),
                translation_mm=tuple(rng.uniform(-1, 1, 3) * a.max_translation_mm))
            visits.append(_measure(spec, a.method, a.segment, a.model))
        for key in visits[0].keys() & visits[1].keys():
            x, y = visits[0][key], visits[1][key]
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            s = abs(x - y) / math.sqrt(2)
            sd.setdefault(key, []).append(s)
            cv.setdefault(key, []).append(100 * s / ((x + y) / 2))
        print(f"pair {k + 1}/{a.pairs} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def rms(v):
        return float(np.sqrt(np.mean(np.square(v))))

    who = f"segmentation by {a.model or 'the default model'}"
    print(f"\nmethod {a.method}, {who if a.segment else 'phantom labels'}, "
          f"{a.pairs} pairs, rotation <= {a.max_rotation_deg} deg, "
          f"translation <= {a.max_translation_mm} mm per axis\n")
    print("| value | RMS CV % | RMS SD mm | SDC (95%) mm |")
    print("|---|---|---|---|")
    for plate in PLATES:
        key = (plate, "all")
        print(f"| {plate} | {rms(cv[key]):.2f} | {rms(sd[key]):.3f} | "
              f"{1.96 * math.sqrt(2) * rms(sd[key]):.3f} |")
    plate_cv = [rms(cv[(p, "all")]) for p in PLATES]
    sub = sorted(k for k in cv if k[1] != "all")
    sub_cv = [rms(cv[k]) for k in sub]
    print(f"| all plates (RMS of plate CVs) | {rms(plate_cv):.2f} | | |")
    print(f"| {len(sub)} subregions (RMS of their CVs) | {rms(sub_cv):.2f} | | |")
    worst = sorted(zip(sub_cv, sub), reverse=True)[:3]
    print("\nworst subregions: " + ", ".join(f"{k[1]} {c:.2f}%" for c, k in worst))


if __name__ == "__main__":
    main()
