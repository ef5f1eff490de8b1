"""Model-card numbers for a segmentation model (not a test; run by hand, 15-40 min on 2 cores).

    python benchmarks/segment_eval.py --model cartiq_unet2d_synth --fold mskt_right \
        --renderings 2 --mirror ../shared/data -o /tmp/segeval

1. Leave-one-map-out renderings: the fold's held-out real label map (never seen in training)
   is rendered in each MR-like contrast family (DESS, PD fat-sat, T1, T2 FSE; see
   :data:`cartiq.segmentation.synth.CONTRAST_FAMILIES`) at each slice thickness, without
   deformation (so the map itself is the truth), random noise, bias field and gamma, on a
   sagittal acquisition grid (0.35 x 0.35 mm in-plane); the image is drawn from the map
   resampled onto an isotropic grid of ``--render-mm`` (default 0.35 mm, the acquisition's
   in-plane spacing: coarser, the image lacks detail the truth has - at 0.5 mm, the protocol
   of sessions 1-13, the labels the image is drawn from already score 0.92-0.94 Dice on the
   cartilage against the truth; at 0.35 mm, 0.97-0.99); it is segmented end to end by
   :class:`cartiq.segmentation.segmenter.Segmenter` without a side (the side is found from the
   anatomy; when that fails the true side is given and the failure recorded) and each cartiq
   structure's Dice against the label map on that grid is recorded, with its volume ratio
   (segmented / true voxels: above 1 is over-segmentation).  ``--tissues`` renders the
   unmeasured tissues the map names (the SPL atlas: ligaments, fat pad, muscles, vessels;
   ``tissues:`` in its label mapping) as themselves instead of random background.
2. The real scans (`cartiq run` in a fresh process, as a user runs it, peak RSS from
   ``os.wait4``): the qDESS (echo 1, a right knee) and the multi-echo spin echo (echo 1):
   side found, plate volumes and mean thicknesses next to the plausible ranges of
   ``configs/qc.yaml``, BML volume, QC status and flags, wall time; the QC figure
   (overlays on three planes per plate) is copied to ``OUT/<scan>_qc.png``.
3. On the qDESS, where the sample ``pykneer_qdess_fc_reference`` can be fetched (it is not in
   ``../shared/data``; see docs/data.md): the femoral cartilage against pyKNEEr's own result
   for that scan (``pykneer_reference.py``).

Writes ``OUT/eval.json`` and ``OUT/eval.md`` (the model-card tables).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from _common import timed_run
from pykneer_reference import compare as pykneer_compare

log = logging.getLogger("segment_eval")

NAMES = ("femur", "tibia", "patella", "femoral_cartilage", "medial_tibial_cartilage",
         "lateral_tibial_cartilage", "patellar_cartilage", "medial_meniscus",
         "lateral_meniscus")
PLATES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage")
# the acquisition grid's in-plane spacing; the map is rendered from a grid this fine
RENDER_MM = 0.35
# fold name -> (sample name, label mapping, knee side)
FOLDS = {
    "mskt_right": ("mskt_right_knee_labels", "pymskt_dess", "right"),
    "pymskt_dess": ("pymskt_dess_labels", "pymskt_dess", "right"),
    "spl": ("spl_knee_atlas_labels", "spl_knee_atlas", "left"),
    "mskt_t2_left": ("mskt_t2_left_knee_labels", "pymskt_dess", "left"),
}
# real scan -> (sample, sub-folder, known knee side or None); the qDESS is a right knee
# (SOURCES.md), the MESE's side is not documented
REAL = {"qdess": ("pykneer_qdess", "echo1", "right"), "mese": ("pymskt_mese_t2", "", None)}


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum() + b.sum())
    return None if s == 0 else round(2 * int((a & b).sum()) / s, 4)


def volume_ratio(seg: np.ndarray, truth: np.ndarray) -> float | None:
    """Segmented / true voxels (None when the truth is empty on this grid)."""
    n = int(truth.sum())
    return None if n == 0 else round(int(seg.sum()) / n, 3)


def sagittal_grid(src, spacing):
    """Sagittal acquisition grid like the qDESS (i = A->P, j = S->I, k = R->L) over ``src``."""
    from cartiq.io.volume import Geometry
    from cartiq.segmentation.segmenter import canonical_geometry

    c = canonical_geometry(src, (1.0, 1.0, 1.0))
    lo = np.asarray(c.origin) - 0.5
    ext = np.asarray(c.shape) * 1.0
    m = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)
    shape = (int(ext[1] / spacing[0]), int(ext[2] / spacing[1]), int(ext[0] / spacing[2]))
    origin = (lo[0] + spacing[2] / 2, lo[1] + spacing[0] / 2, lo[2] + ext[2] - spacing[1] / 2)
    return Geometry(shape, spacing, origin, tuple(m.ravel()))


def renderings(fold: str, mirror: Path, contrasts: list[str], slices_mm: list[float], n: int,
               seed0: int = 100, tissues: bool = False, render_mm: float = RENDER_MM,
               fluid_probability: float | None = None,
               cartilage_fluid_ratio: dict[str, tuple[float, float]] | None = None):
    """Renderings of the fold's real label map (see the module docstring): yields
    ``(info, image, truth)`` with ``info`` = contrast, slice_mm, seed; ``image`` a
    :class:`~cartiq.io.volume.Volume` on a sagittal acquisition grid, drawn from the map
    resampled onto a ``render_mm`` grid, and ``truth`` the map in the cartiq scheme on the
    acquisition grid (the same grid for every ``render_mm``).  ``fluid_probability``: the
    chance of the joint-fluid film around cartilage and menisci per rendering (None: the
    renderer's default; 0: no film, as in the session-16 analysis in the model card);
    ``cartilage_fluid_ratio``: per contrast family, the range of the cartilage mean as a
    fraction of the fluid mean (None: the families' own ranges)."""
    import torch

    from cartiq.data.fetch import fetch_sample
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.io.volume import Volume, read_volume
    from cartiq.segmentation.segmenter import canonical_geometry, resample_array
    from cartiq.segmentation.synth import Renderer, SynthConfig, add_tissues, to_model_classes

    sample, mapping, side = FOLDS[fold]
    path = fetch_sample(sample, mirror=mirror)
    vol = read_volume(path, kind="labels")
    mp = load_mapping(mapping)
    cart, _ = to_default_scheme(vol.array, mp, vol.geometry.affine, side=side, path=path)
    fib = np.isin(vol.array, [v for v, t in mp.map.items() if t == "fibula"])
    canon = canonical_geometry(vol.geometry, (render_mm,) * 3)
    frame = canonical_geometry(vol.geometry, (0.5, 0.5, 0.5))  # the acquisition grid's extent
    classes = to_model_classes(cart, fib)
    if tissues:
        classes = add_tissues(classes, vol.array, mp.tissues)
    classes = resample_array(classes, vol.geometry, canon, nearest=True)
    lab_t = torch.from_numpy(np.ascontiguousarray(classes))
    center = (torch.tensor(lab_t.shape, dtype=torch.float32) - 1) / 2
    overrides = {} if fluid_probability is None else {"fluid_probability": fluid_probability}
    if cartilage_fluid_ratio:
        overrides["cartilage_fluid_ratio"] = cartilage_fluid_ratio
    for thick in slices_mm:
        target = sagittal_grid(frame, (0.35, 0.35, thick))
        truth = resample_array(cart, vol.geometry, target, nearest=True)
        for contrast in contrasts:
            cfg = SynthConfig(spacing_mm=render_mm, rotation_deg=0, scale_fraction=0,
                              elastic_mm=0,
                              mirror_probability=0, bml_probability=0,
                              random_contrast_probability=0, contrast_families=(contrast,),
                              slice_thickness_mm=(thick, thick),
                              inplane_resolution_mm=(0.35, 0.35), **overrides)
            for i in range(n):
                img, _ = Renderer(cfg, seed=seed0 + i).sample(lab_t, tuple(lab_t.shape),
                                                              center=center)
                image = Volume(np.ascontiguousarray(resample_array(img.numpy(), canon, target)),
                               target)
                yield {"contrast": contrast, "slice_mm": thick, "seed": seed0 + i}, image, truth


def lomo(model: str, fold: str, mirror: Path, contrasts: list[str], slices_mm: list[float],
         n: int, seed0: int = 100, tissues: bool = False,
         render_mm: float = RENDER_MM, fluid_probability: float | None = None,
         cartilage_fluid_ratio: dict[str, tuple[float, float]] | None = None) -> dict:
    """Dice per structure on renderings of the fold's held-out map (see module docstring)."""
    from cartiq.errors import InputError
    from cartiq.io.labels import default_scheme
    from cartiq.segmentation.segmenter import Segmenter

    sample, _, side = FOLDS[fold]
    s = default_scheme()
    seg = Segmenter(model, device="cpu")
    runs = []
    in_map = None
    for info, image, truth in renderings(fold, mirror, contrasts, slices_mm, n, seed0, tissues,
                                         render_mm, fluid_probability, cartilage_fluid_ratio):
        if in_map is None:  # no Dice for labels absent from the map
            in_map = {s.name_of(int(v)) for v in np.unique(truth) if v}
        t0 = time.monotonic()
        try:
            res = seg.run(image)
            side_found = res.info.get("side")
        except InputError as exc:
            side_found = f"error: {exc}"[:160]
            res = seg.run(image, side=side)
        d = {k: dice(res.labels == s[k], truth == s[k]) if k in in_map else None
             for k in NAMES}
        ratio = {k: volume_ratio(res.labels == s[k], truth == s[k]) if k in in_map
                 else None for k in NAMES}
        runs.append({**info, "dice": d, "volume_ratio": ratio,
                     "side_found": side_found, "side_source": res.info.get("side_source"),
                     "seconds": round(time.monotonic() - t0, 1)})
        log.info("%s %s %.1f mm seed %d: %s (side %s)", fold, info["contrast"],
                 info["slice_mm"], info["seed"], d, side_found)
    return {"fold": fold, "held_out": sample, "side": side, "tissues_rendered": tissues,
            "render_mm": render_mm, "fluid_probability": fluid_probability,
            "cartilage_fluid_ratio": cartilage_fluid_ratio, "runs": runs,
            "summary": summarise(runs)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for k in NAMES:
        vals = [r["dice"][k] for r in runs if r["dice"][k] is not None]
        if not vals:
            out[k] = None
            continue
        worst = min(runs, key=lambda r: r["dice"][k] if r["dice"][k] is not None else 2)
        ratios = [r["volume_ratio"][k] for r in runs if r.get("volume_ratio", {}).get(k)]
        out[k] = {"mean": round(float(np.mean(vals)), 3), "sd": round(float(np.std(vals)), 3),
                  "worst": round(float(min(vals)), 3),
                  "worst_at": f"{worst['contrast']} {worst['slice_mm']} mm",
                  "volume_ratio_mean": round(float(np.mean(ratios)), 3) if ratios else None}
    return out


def real_scan(name: str, model: str | None, mirror: Path, out: Path) -> dict:
    """`cartiq run` on a real scan in a fresh process; numbers next to configs/qc.yaml."""
    from cartiq._resources import resource_dir
    from cartiq.data.fetch import fetch_sample

    sample, sub, known_side = REAL[name]
    path = fetch_sample(sample, mirror=mirror)
    path = path / sub if sub else path
    dest = out / f"run_{name}"
    cmd = [sys.executable, "-m", "cartiq", "run", str(path), "-o", str(dest), "--device", "cpu"]
    if model:
        cmd += ["--model", model]
    run = timed_run(cmd)
    side_error = None
    if run.rc == 2 and "cannot tell the knee side" in run.output and known_side:
        side_error = run.output.strip().splitlines()[-1]
        run = timed_run(cmd + ["--side", known_side])
    if run.rc != 0:
        return {"rc": run.rc, "output": run.output[-2000:], "side_error": side_error}
    qc_ranges = yaml.safe_load((resource_dir("configs") / "qc.yaml").read_text())["plausible"]
    rows = list(csv.DictReader(open(dest / "measurements.csv")))

    def value(structure: str, metric: str) -> float | None:
        for r in rows:
            if r["structure"] == structure and r["region"] == "all" and r["metric"] == metric:
                return round(float(r["value"]), 2)
        return None

    man = json.loads((dest / "manifest.json").read_text())
    shutil.copy(dest / "qc.png", out / f"{name}_qc.png")
    return {
        "rc": run.rc, "wall_s": round(run.wall_s, 1), "peak_rss_mib": round(run.peak_rss_mib),
        "side": man.get("side"), "side_source": man.get("side_source"),
        "side_not_found": side_error,
        "qc_status": man["qc"]["status"], "qc_flags": [f["message"] for f in man["qc"]["flags"]],
        "plates": {p: {"volume_mm3": value(p, "volume"),
                       "volume_range_mm3": qc_ranges["plate_volume_mm3"][p],
                       "mean_thickness_mm": value(p, "thickness_mean"),
                       "thickness_range_mm": qc_ranges["mean_thickness_mm"][p]}
                   for p in PLATES},
        "bml_volume_mm3": value("bone_marrow_lesion", "volume") or 0.0,
        "timings_s": man.get("timings_s"),
        **({"pykneer_reference": _pykneer(dest, mirror)} if name == "qdess" else {}),
    }


def _pykneer(run_dir: Path, mirror: Path) -> dict:
    """pyKNEEr's femoral cartilage for the qDESS against cartiq's, or why it is missing."""
    from cartiq.data.fetch import fetch_sample
    from cartiq.errors import InputError

    try:
        ref = fetch_sample("pykneer_qdess_fc_reference", mirror=mirror)
    except InputError as exc:
        return {"not_available": str(exc)[:300]}
    return pykneer_compare(run_dir / "segmentation.nii.gz", ref)


def markdown(report: dict) -> str:
    lines = []
    for fold in report.get("lomo", []):
        tissues = ", its tissues rendered" if fold.get("tissues_rendered") else ""
        grid = fold.get("render_mm", 0.5)  # reports before session 14: 0.5 mm
        if fold.get("fluid_probability") is not None:
            tissues += f", fluid film probability {fold['fluid_probability']}"
        for fam, (lo, hi) in (fold.get("cartilage_fluid_ratio") or {}).items():
            tissues += f", {fam} cartilage at {lo}-{hi} of fluid"
        lines += [f"### Leave-one-map-out fold `{fold['fold']}` (held out: "
                  f"{fold['held_out']}{tissues}; rendered from a {grid} mm grid)", "",
                  "| structure | Dice mean | SD | worst (where) | volume ratio |",
                  "|---|---|---|---|---|"]
        for k, v in fold["summary"].items():
            lines.append(f"| {k} | n/a (not in the map) | | | |" if v is None else
                         f"| {k} | {v['mean']:.3f} | {v['sd']:.3f} | {v['worst']:.3f} "
                         f"({v['worst_at']}) | {v.get('volume_ratio_mean')} |")
        cells: dict[tuple, list] = {}
        for r in fold["runs"]:
            cells.setdefault((r["contrast"], r["slice_mm"]), []).append(r)
        lines += ["", "| contrast | slice mm | " + " | ".join(NAMES[:7]) + " | side found |",
                  "|---" * 10 + "|"]
        for (c, t), rs in cells.items():
            means = []
            for k in NAMES[:7]:
                vals = [r["dice"][k] for r in rs if r["dice"][k] is not None]
                means.append(f"{np.mean(vals):.3f}" if vals else "n/a")
            sides = ",".join(str(r["side_found"])[:12] for r in rs)
            lines.append(f"| {c} | {t} | " + " | ".join(means) + f" | {sides} |")
        lines.append("")
    for name, r in report.get("real", {}).items():
        if r.get("rc") != 0:
            lines += [f"### {name}: `cartiq run` failed (rc {r.get('rc')})", ""]
            continue
        lines += [f"### Real scan `{name}`: side {r['side']} ({r['side_source']}), QC "
                  f"**{r['qc_status']}**, {r['wall_s']} s, {r['peak_rss_mib']} MiB", "",
                  *([f"Side not found from the anatomy (`{r['side_not_found']}`); run again "
                     "with the known side.", ""] if r.get("side_not_found") else []),
                  "| plate | volume mm3 | plausible | mean thickness mm | plausible |",
                  "|---|---|---|---|---|"]
        for p, v in r["plates"].items():
            lines.append(f"| {p} | {v['volume_mm3']} | {v['volume_range_mm3']} | "
                         f"{v['mean_thickness_mm']} | {v['thickness_range_mm']} |")
        lines += ["", f"BML volume {r['bml_volume_mm3']} mm3. QC flags: "
                  + ("; ".join(r["qc_flags"]) or "none"), ""]
        ref = r.get("pykneer_reference")
        if ref and "not_available" not in ref:
            v, dist = ref["volume_mm3"], ref["pykneer_surface_to_cartiq_boundary_mm"]
            lines += [f"Femoral cartilage against pyKNEEr's own result for this scan: volume "
                      f"{v['cartiq']} vs {v['pykneer_reported']} mm3 (its contours rebuilt: "
                      f"{v['pykneer_rebuilt_band']}), Dice {ref['dice_vs_band']} against the "
                      f"rebuilt band; pyKNEEr's surface points lie {dist['median']} mm (median; "
                      f"95th percentile {dist['p95']}) from cartiq's boundary; "
                      f"{ref['cartiq_farther_than_2mm_from_pykneer']:.1%} of cartiq's cartilage "
                      f"and {ref['pykneer_farther_than_2mm_from_cartiq']:.1%} of pyKNEEr's are "
                      f"more than 2 mm from the other; slices {ref['slices']['cartiq']} vs "
                      f"{ref['slices']['pykneer']}; mean thickness "
                      f"{ref['mean_thickness_mm'].get('cartiq')} vs "
                      f"{ref['mean_thickness_mm']['pykneer']} mm."]
            dis = ref.get("disagreement")
            if dis:
                o = dis["cartiq_only_mm3"]
                lines += [f"Where they differ: cartiq-only {o['within_1mm']} / {o['1_to_2mm']} / "
                          f"{o['beyond_2mm']} mm3 within 1 mm / 1-2 mm / beyond 2 mm of pyKNEEr's "
                          f"cartilage; pyKNEEr-only {dis['pykneer_only_mm3']} mm3, of which "
                          f"{dis['pykneer_only_in_cartiq_femur_mm3']} mm3 is cartiq's femur."]
            lines += [""]
    return "\n".join(lines)


def main() -> None:
    from cartiq.segmentation.synth import CONTRAST_FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name or package folder")
    ap.add_argument("--fold", nargs="*", default=["mskt_right"], choices=sorted(FOLDS),
                    help="held-out maps to render (the model must not have seen them; "
                    "none: real scans only)")
    ap.add_argument("--contrasts", nargs="*", default=list(CONTRAST_FAMILIES),
                    choices=list(CONTRAST_FAMILIES))
    ap.add_argument("--slice-mm", nargs="*", type=float, default=[1.0, 3.0])
    ap.add_argument("--renderings", type=int, default=2, help="per contrast and thickness")
    real = ap.add_mutually_exclusive_group()
    real.add_argument("--real", nargs="+", default=sorted(REAL), choices=sorted(REAL),
                      help="the real scans to run (default: all)")
    real.add_argument("--no-real", dest="real", action="store_const", const=[],
                      help="renderings only")
    ap.add_argument("--tissues", action="store_true",
                    help="render the held-out map's named unmeasured tissues as themselves")
    ap.add_argument("--render-mm", type=float, default=RENDER_MM,
                    help="grid the held-out map is rendered from (mm; 0.5: the protocol of "
                    "sessions 1-13)")
    ap.add_argument("--fluid-probability", type=float, default=None,
                    help="chance of the joint-fluid film on cartilage and menisci per rendering "
                    "(default: the renderer's; 0: renderings without it)")
    ap.add_argument("--cartilage-fluid-ratio", nargs=3, action="append", default=[],
                    metavar=("FAMILY", "LOW", "HIGH"),
                    help="in that contrast family's renderings, draw the cartilage mean as "
                    "LOW-HIGH times the fluid mean (repeatable; default: the family's own ranges)")
    ap.add_argument("--mirror", type=Path, default=Path("../shared/data"))
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args()
    ratio = {}
    for fam, lo, hi in a.cartilage_fluid_ratio:
        if fam not in CONTRAST_FAMILIES:
            ap.error(f"--cartilage-fluid-ratio: unknown contrast family {fam!r}")
        ratio[fam] = (float(lo), float(hi))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"model": a.model, "lomo": [], "real": {}}
    for name in a.real:
        report["real"][name] = real_scan(name, a.model, a.mirror, a.out)
        log.info("%s: %s", name, report["real"][name])
    for fold in a.fold:
        report["lomo"].append(lomo(a.model, fold, a.mirror, a.contrasts, a.slice_mm,
                                   a.renderings, tissues=a.tissues, render_mm=a.render_mm,
                                   fluid_probability=a.fluid_probability,
                                   cartilage_fluid_ratio=ratio or None))
    (a.out / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    (a.out / "eval.md").write_text(markdown(report))
    log.info("wrote %s and eval.md", a.out / "eval.json")


if __name__ == "__main__":
    main()
