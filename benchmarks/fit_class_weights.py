"""Fit a model's ``class_weights`` (a prior correction of its cartilage classes) on renderings
of its *training* maps (not a test; run by hand, about 1 min per rendering on one core).

    python benchmarks/fit_class_weights.py --model cartiq_unet2d_synth \
        --maps pymskt_dess spl mskt_t2_left --mirror ../shared/data -o /tmp/fitw [--write]

Why: the volume ratios of ``segment_eval.py`` show the 2D U-Net drawing every cartilage plate
too thick, on held-out *and* on training maps (segmented / true volume 1.1-1.4).  Part of it is
the decision threshold: scaling a class's probability by ``w < 1`` before the arg-max trades
its false-positive rim against its true voxels.

How: each map (``segment_eval.FOLDS``; the maps' named tissues rendered, as in training) is
rendered like ``segment_eval`` (every contrast family, 1 and 3 mm slices, no deformation,
seeds from 300, so not the evaluation's renderings) and run through the model once; the
class probabilities are resampled onto the rendering's grid as the segmenter does.  For each
cartilage class and each ``w`` of the grid, the class's voxels are those where ``w * p``
beats every other class (the others at 1), and Dice and the volume ratio against the map are
recorded.  The chosen ``w`` is the one whose *median* volume ratio over all renderings is
nearest 1: an unbiased typical volume (and so thickness) is what a measurement needs, the
median keeps one map's odd labelling from pulling it (the pymskt map's patellar cartilage
is drawn 1.8x at w = 1 where the other maps give about 1), and the Dice curve is flat there
(for 0.4.0 the chosen factors lose at most 0.003 of the best mean Dice).  ``--write`` stores
them with their numbers in the package's ``metadata.json`` (``class_weights``,
``class_weights_fit``).  Check the result on the held-out fold with ``segment_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from segment_eval import FOLDS, renderings

log = logging.getLogger("fit_class_weights")

GRID = (1.0, 0.85, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)
# model class -> the cartiq structures it stands for (tibial cartilage is split afterwards)
FIT_CLASSES = {"femoral_cartilage": ("femoral_cartilage",),
               "tibial_cartilage": ("medial_tibial_cartilage", "lateral_tibial_cartilage"),
               "patellar_cartilage": ("patellar_cartilage",)}


def _scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    n_t, n_p = int(truth.sum()), int(pred.sum())
    if n_t + n_p == 0:
        return None, None
    return 2 * int((pred & truth).sum()) / (n_t + n_p), (n_p / n_t if n_t else None)


def fit(model: str | None, maps: list[str], mirror: Path, contrasts: list[str],
        slices_mm: list[float], seed0: int = 300) -> dict:
    from cartiq.io.labels import default_scheme, load_mapping
    from cartiq.segmentation.segmenter import Segmenter

    s = default_scheme()
    seg = Segmenter(model, device="cpu")
    meta = seg.model.metadata
    channel = {name: v for v, name in meta.labels.items()}
    classes = [c for c in FIT_CLASSES if c in channel]
    runs = []
    for fold in maps:
        tissues = bool(load_mapping(FOLDS[fold][1]).tissues)
        for info, image, truth in renderings(fold, mirror, contrasts, slices_mm, 1, seed0,
                                             tissues):
            t0 = time.monotonic()
            p = seg.probabilities(image).astype(np.float32)
            rec = {"map": fold, **info, "by_weight": {}}
            for c in classes:
                true_c = np.isin(truth, [s[n] for n in FIT_CLASSES[c]])
                others = np.delete(p, channel[c], axis=0).max(axis=0)
                rec["by_weight"][c] = {w: _scores(w * p[channel[c]] > others, true_c)
                                       for w in GRID}
            runs.append(rec)
            log.info("%s %s %.1f mm: %s (%.0f s)", fold, info["contrast"], info["slice_mm"],
                     {c: round(v[1.0][0], 3) for c, v in rec["by_weight"].items()
                      if v[1.0][0] is not None}, time.monotonic() - t0)
    table, chosen = {}, {}
    for c in classes:
        table[c] = {}
        for w in GRID:
            d = [r["by_weight"][c][w][0] for r in runs if r["by_weight"][c][w][0] is not None]
            v = [r["by_weight"][c][w][1] for r in runs if r["by_weight"][c][w][1] is not None]
            table[c][w] = {"dice_mean": round(float(np.mean(d)), 4),
                           "volume_ratio_mean": round(float(np.mean(v)), 3),
                           "volume_ratio_median": round(float(np.median(v)), 3), "n": len(d)}
        chosen[c] = min(GRID, key=lambda w: abs(table[c][w]["volume_ratio_median"] - 1))
    return {"model": {"name": meta.name, "version": meta.version,
                      "weights_sha256": seg.model.weights_sha256},
            "maps": maps, "contrasts": contrasts, "slices_mm": slices_mm, "seed0": seed0,
            "renderings": len(runs), "grid": list(GRID), "class_weights": chosen,
            "table": {c: {str(w): v for w, v in t.items()} for c, t in table.items()},
            "runs": [{**{k: v for k, v in r.items() if k != "by_weight"},
                      "dice_ratio_by_weight": {c: {str(w): v for w, v in t.items()}
                                               for c, t in r["by_weight"].items()}}
                     for r in runs]}


def write(package: Path, result: dict) -> None:
    """Store the fitted weights and how they were fitted in the package's metadata.json."""
    path = package / "metadata.json"
    meta = json.loads(path.read_text())
    if meta.get("weights_sha256") != result["model"]["weights_sha256"]:
        raise SystemExit(f"{path}: weights differ from the fitted model's")
    meta["class_weights"] = {c: w for c, w in result["class_weights"].items() if w != 1.0}
    meta["class_weights_fit"] = {
        "method": "benchmarks/fit_class_weights.py: per class, the factor of the grid whose "
                  "median volume ratio (segmented / true) over renderings of the training "
                  "maps is nearest 1",
        **{k: result[k] for k in ("maps", "contrasts", "slices_mm", "seed0", "renderings",
                                  "grid")},
        "table": {c: {w: result["table"][c][str(w)] for w in ("1.0", str(float(
            result["class_weights"][c])))} for c in result["class_weights"]}}
    path.write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    from cartiq.segmentation.models import resolve_model
    from cartiq.segmentation.synth import CONTRAST_FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name or package folder")
    ap.add_argument("--maps", nargs="+", required=True, choices=sorted(FOLDS),
                    help="the model's training maps (never its held-out fold)")
    ap.add_argument("--contrasts", nargs="*", default=list(CONTRAST_FAMILIES),
                    choices=list(CONTRAST_FAMILIES))
    ap.add_argument("--slice-mm", nargs="*", type=float, default=[1.0, 3.0])
    ap.add_argument("--mirror", type=Path, default=Path("../shared/data"))
    ap.add_argument("--write", action="store_true",
                    help="store the weights in the package's metadata.json")
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    result = fit(a.model, a.maps, a.mirror, a.contrasts, a.slice_mm)
    (a.out / "fit.json").write_text(json.dumps(result, indent=1))
    for c, t in result["table"].items():
        log.info("%s (w:Dice/median volume ratio): %s", c, " ".join(
            f"{w}:{v['dice_mean']:.3f}/{v['volume_ratio_median']:.2f}" for w, v in t.items()))
    log.info("chosen: %s", result["class_weights"])
    if a.write:
        write(resolve_model(a.model), result)
        log.info("written to %s", resolve_model(a.model) / "metadata.json")


if __name__ == "__main__":
    main()
