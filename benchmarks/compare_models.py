"""Compare segmentation models evaluated by ``segment_eval.py`` on the same renderings.

    python benchmarks/compare_models.py BASE/eval.json ARM/eval.json [ARM2/eval.json ...] \
        [--fold mskt_right] [--markdown OUT.md] [--by-contrast]

The first file is the baseline.  For each model: the mean Dice of each plate and of the four
plates over the fold's renderings, the plates' volume ratios and their mean abs(log ratio),
the lowest plate Dice in any rendering, the side-found count; and, against the baseline, the
plates' mean difference **paired over the renderings both were run on** (same contrast, slice
thickness and seed) with its standard error, which says how well the renderings measure a
difference (not how much training noise there is: two checkpoints of one recipe can differ
by more); with ``--by-contrast``, the same for each contrast family's renderings on their
own.  Where the files hold the real qDESS: its femoral cartilage volume, QC status, Dice
against pyKNEEr's cartilage and the cartiq-only cartilage beyond 2 mm of it.  Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

PLATES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage")


def _fold(data: dict, fold: str | None) -> dict:
    folds = data["lomo"]
    if fold is None:
        return folds[0]
    for f in folds:
        if f["fold"] == fold:
            return f
    raise SystemExit(f"no fold {fold!r} in the evaluation (have {[f['fold'] for f in folds]})")


def _key(run: dict) -> tuple:
    return run["contrast"], float(run["slice_mm"]), int(run["seed"])


def plate_means(runs: list[dict]) -> dict[tuple, float]:
    """Mean Dice of the four plates per rendering, keyed by (contrast, slice mm, seed)."""
    return {_key(r): sum(r["dice"][p] for p in PLATES) / len(PLATES) for r in runs}


def paired_difference(arm: dict[tuple, float], base: dict[tuple, float]) -> dict:
    """Mean and standard error of ``arm - base`` over the renderings both have."""
    shared = sorted(set(arm) & set(base))
    if len(shared) < 2:
        raise SystemExit("fewer than two renderings in common: not comparable")
    d = [arm[k] - base[k] for k in shared]
    return {"n": len(d), "mean": statistics.fmean(d),
            "se": statistics.stdev(d) / math.sqrt(len(d))}


def _summarize_runs(runs: list[dict], side: str) -> dict:
    per_plate = {p: statistics.fmean(r["dice"][p] for r in runs) for p in PLATES}
    ratios = {p: statistics.fmean(r["volume_ratio"][p] for r in runs) for p in PLATES}
    return {"renderings": len(runs), "plates": per_plate,
            "plates_mean": statistics.fmean(per_plate.values()), "volume_ratio": ratios,
            "mean_abs_log_ratio": statistics.fmean(abs(math.log(v)) for v in ratios.values()),
            "lowest_plate": min(r["dice"][p] for r in runs for p in PLATES),
            "side_found": sum(r["side_found"] == side for r in runs),
            "per_rendering": plate_means(runs)}


def by_contrast(data: dict, fold: str | None = None) -> dict[str, dict]:
    """The summary of each contrast family's renderings on their own."""
    f = _fold(data, fold)
    contrasts = sorted({r["contrast"] for r in f["runs"]})
    return {c: _summarize_runs([r for r in f["runs"] if r["contrast"] == c], f["side"])
            for c in contrasts}


def summarize(data: dict, fold: str | None = None) -> dict:
    f = _fold(data, fold)
    out = {"fold": f["fold"], **_summarize_runs(f["runs"], f["side"])}
    q = data.get("real", {}).get("qdess")
    if q:
        ref = q.get("pykneer_reference") or {}
        far = (ref.get("disagreement") or {}).get("cartiq_only_mm3", {}).get("beyond_2mm")
        out["qdess"] = {"femoral_mm3": q["plates"]["femoral_cartilage"]["volume_mm3"],
                        "qc_status": q["qc_status"], "dice_vs_pykneer": ref.get("dice_vs_band"),
                        "cartiq_only_beyond_2mm_mm3": far}
    return out


def _or_na(value) -> str:
    return "n/a" if value is None else str(value)


def table(names: list[str], summaries: list[dict]) -> str:
    base = summaries[0]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([label, *cells]) + " |")

    row("renderings / side found", [f"{s['renderings']} / {s['side_found']}" for s in summaries])
    row("plates (fem / med tib / lat tib / pat)",
        [" / ".join(f"{s['plates'][p]:.3f}" for p in PLATES) for s in summaries])
    row("mean of the plates", [f"{s['plates_mean']:.4f}" for s in summaries])
    diffs = ["baseline"]
    for s in summaries[1:]:
        if len(set(s["per_rendering"]) & set(base["per_rendering"])) < 2:
            diffs.append("n/a (fewer than two renderings in common)")
            continue
        d = paired_difference(s["per_rendering"], base["per_rendering"])
        diffs.append(f"{d['mean']:+.4f} (SE {d['se']:.4f}, n {d['n']})")
    row("paired difference from the baseline", diffs)
    row("volume ratios", [" / ".join(f"{s['volume_ratio'][p]:.2f}" for p in PLATES)
                          for s in summaries])
    row("mean abs(log volume ratio)", [f"{s['mean_abs_log_ratio']:.3f}" for s in summaries])
    row("lowest plate in any rendering", [f"{s['lowest_plate']:.3f}" for s in summaries])
    if any("qdess" in s for s in summaries):
        def cell(s: dict, text) -> str:
            return text(s["qdess"]) if "qdess" in s else "not run"
        row("qDESS femoral mm3 / QC", [cell(s, lambda q: f"{q['femoral_mm3']:,.0f} / "
                                        f"{q['qc_status']}") for s in summaries])
        row("qDESS Dice vs pyKNEEr / cartiq-only > 2 mm (mm3)",
            [cell(s, lambda q: f"{_or_na(q['dice_vs_pykneer'])} / "
                               f"{_or_na(q['cartiq_only_beyond_2mm_mm3'])}")
             for s in summaries])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("evals", type=Path, nargs="+", help="eval.json files; the first is the baseline")
    ap.add_argument("--fold", default=None, help="fold name (default: each file's first)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--by-contrast", action="store_true",
                    help="also a table for each contrast family's renderings on their own")
    a = ap.parse_args()
    if len(a.evals) < 2:
        ap.error("give a baseline and at least one model to compare")
    data = [json.loads(p.read_text()) for p in a.evals]
    summaries = [summarize(d, a.fold) for d in data]
    folds = {s["fold"] for s in summaries}
    if len(folds) > 1:  # renderings of different knees share keys but are not comparable
        raise SystemExit(f"the files evaluate different folds ({sorted(folds)}): give --fold "
                         "or files of one fold")
    names = [p.parent.name or str(p) for p in a.evals]
    text = table(names, summaries)
    if a.by_contrast:
        parts = [by_contrast(d, a.fold) for d in data]
        for c in parts[0]:
            if all(c in part for part in parts):
                text += f"\n{c} renderings only:\n\n" + table(names, [part[c] for part in parts])
    print(text)
    if a.markdown:
        a.markdown.write_text(text)


if __name__ == "__main__":
    main()
