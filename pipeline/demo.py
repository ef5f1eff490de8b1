"""``cartiq demo trial``: a seeded, simulated MSC trial run end to end through ``cartiq batch``.

Design: two arms (``MSC``, ``placebo``) x two stage groups (early = KL I-II, late = KL
III-IV) x two visits (``baseline``, ``m12``), ``n`` knees per arm x group.  Every knee is a
:mod:`cartiq.data.phantom` knee with its own size, plate thicknesses, side, voxel grid,
noise and pose (a new pose at follow-up: repositioning), and planted changes between the
visits drawn around published magnitudes (:data:`EFFECTS`):

* cartilage thickness of the femorotibial plates (placebo loses, late MSC knees thicken),
* the femoral full-thickness defect area (denuded area; MSC shrinks it),
* the femoral bone-marrow lesion (BML area -27% and volume under MSC),
* a cartilage repair site on the patella (MOCART): its fill (25% steps) and the repair
  tissue's signal (severe / minor abnormal / normal).

Every planted value goes into ``OUT/truth.csv`` (one row per knee, visit and outcome); the
batch runs on ``OUT/manifest.csv`` with the phantoms' own label maps as segmentation (no
model), and :mod:`cartiq.demo_recovery` compares what came out of the cohort tables with
what was planted (``OUT/planted_vs_recovered.csv``, a section in ``OUT/cohort.html``).  The
batch writes into ``OUT`` itself (subject folders, cohort tables, ``cohort.html``); the
phantoms are under ``OUT/scans``.

The planted MOCART total of a visit is the points of the planted fill and signal under the
scoring config's categories plus the maximum of the five items the demo keeps constant
(integration, surface, structure, bony defect, subchondral: 65 points).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError

__all__ = ["EFFECTS", "GRIDS", "MOCART_STEPS", "OUTCOMES", "Knee", "Visit", "DemoResult",
           "design_trial", "knee_spec", "plant_repair_site", "write_knee", "write_trial",
           "planted_values", "planted_mocart_points", "truth_rows", "run_demo_trial",
           "REPAIR_CONSTANT_POINTS"]

log = logging.getLogger(__name__)

ARMS = ("MSC", "placebo")
GROUPS = ("early", "late")
VISITS = ("baseline", "m12")
# voxel grids of the simulated sites' protocols (i, j in-plane; k = slice), mm
GRIDS = ((0.7, 0.7, 1.2), (0.75, 0.75, 1.3), (0.8, 0.8, 1.5))
REPAIR_CONSTANT_POINTS = 65.0  # integration 15 + surface 10 + structure 10 + bony 10 + subchondral 20
# repair tissue: fill levels (% of the native thickness: 75-99% and complete / minor
# hypertrophy, 100-150%) and signal ratios (repair / native intensity) of the three signal categories
FILL_LEVELS_PCT = (87.5, 110.0)
SIGNAL_RATIO = {"severe": 0.3, "minor": 0.65, "normal": 1.0}

# Planted 12-month changes (mean, between-knee SD) per arm x stage group, around:
#   MOCART  52.9 -> 62.1 (early, +9.2) and 46.5 -> 57.1 (late, +10.6) a year after one MSC
#           injection; placebo about unchanged.
#   BML area 123.5 -> 90.3 mm2 (-27%) under MSC; placebo about unchanged.
#   full-thickness defect size -5.9% (five years) under MSC; placebo defects grow.
#   femorotibial thickness: placebo loses up to 0.17-0.18 mm over two years in progressor
#   (late) cohorts, much less in others; some thickening under MSC in late stage.
EFFECTS: dict[str, dict[tuple[str, str], tuple[float, float]]] = {
    "thickness_mm": {("MSC", "early"): (0.0, 0.03), ("MSC", "late"): (0.06, 0.03),
                     ("placebo", "early"): (-0.03, 0.03), ("placebo", "late"): (-0.09, 0.03)},
    "defect_area_rel": {("MSC", "early"): (-0.06, 0.03), ("MSC", "late"): (-0.06, 0.03),
                        ("placebo", "early"): (0.05, 0.03), ("placebo", "late"): (0.08, 0.03)},
    "bml_area_rel": {("MSC", "early"): (-0.27, 0.06), ("MSC", "late"): (-0.27, 0.06),
                     ("placebo", "early"): (0.0, 0.06), ("placebo", "late"): (0.03, 0.06)},
}
# MOCART: every repair site starts at 87.5% fill with severely abnormal signal; per knee the
# fill rises to 110% (complete, minor hypertrophy) with probability p_fill, and a site whose
# fill rose matures to minor abnormal signal with probability p_minor or to normal with
# p_normal (placebo: the signal stays).  Means: MSC early +9.1, late +10.8, placebo +0.5.
# (Lower fills read as irregular surface or inhomogeneous on the coarser grids now and then.)
MOCART_STEPS = {("MSC", "early"): (0.85, 0.4, 0.25), ("MSC", "late"): (1.0, 0.4, 0.25),
                ("placebo", "early"): (0.1, 0.0, 0.0), ("placebo", "late"): (0.1, 0.0, 0.0)}


@dataclass(frozen=True)
class Visit:
    """What a visit's phantom plants (lengths mm)."""

    femoral_mm: float
    medial_tibial_mm: float
    lateral_tibial_mm: float
    defect_radius_mm: float
    bml_radii_mm: tuple[float, float, float]
    fill_pct: float
    signal: str
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    seed: int


@dataclass(frozen=True)
class Knee:
    """One simulated subject: fixed anatomy and protocol, and its two visits."""

    subject_id: str
    arm: str
    group: str
    kl_grade: int
    side: str
    spacing_mm: tuple[float, float, float]
    femur_radius_mm: float
    patellar_mm: float
    noise_sigma: float
    site_radius_mm: float
    visits: dict[str, Visit] = field(default_factory=dict)


def _clip(x: float, lo: float, hi: float) -> float:
    return float(min(hi, max(lo, x)))


def design_trial(n_per_group: int, seed: int = 0,
                 grids: tuple[tuple[float, float, float], ...] = GRIDS) -> list[Knee]:
    """Draw the trial's knees (seeded): ``n_per_group`` per arm x stage group."""
    if int(n_per_group) < 2:
        raise InputError(f"--subjects-per-group must be at least 2 (an SD needs two knees), "
                         f"got {n_per_group}")
    if int(seed) < 0:
        raise InputError(f"--seed must be 0 or more, got {seed}")
    rng = np.random.default_rng(seed)
    knees = []
    for arm in ARMS:
        for group in GROUPS:
            for i in range(int(n_per_group)):
                knees.append(_draw_knee(rng, arm, group, i, len(knees), grids))
    return knees


def _pose(rng: np.random.Generator) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    rot = tuple(float(v) for v in np.round(rng.normal(0.0, 2.5, 3), 2))
    tr = tuple(float(v) for v in np.round(rng.normal(0.0, 2.0, 3), 2))
    return rot, tr  # type: ignore[return-value]


def _draw_knee(rng: np.random.Generator, arm: str, group: str, i: int, k: int,
               grids: tuple[tuple[float, float, float], ...]) -> Knee:
    late = group == "late"
    kl = int(rng.choice([3, 4] if late else [1, 2]))
    size = float(rng.uniform(0.92, 1.08))
    thin = 0.88 if late else 1.0
    t_f, t_mt, t_lt = (_clip(base * thin * rng.normal(1.0, 0.07), 1.4, 3.2)
                       for base in (2.2, 2.0, 2.6))
    r_def = float(rng.uniform(4.0, 5.0) if late else rng.uniform(2.8, 3.8))
    bml = np.array([5.0, 4.0, 3.5]) * (1.2 if late else 1.0) * rng.uniform(0.9, 1.1)
    d_t = rng.normal(*EFFECTS["thickness_mm"][(arm, group)])
    d_a = rng.normal(*EFFECTS["defect_area_rel"][(arm, group)])
    d_b = rng.normal(*EFFECTS["bml_area_rel"][(arm, group)])
    p_fill, p_minor, p_normal = MOCART_STEPS[(arm, group)]
    f0, s0 = 0, "severe"
    f1, s1 = f0, s0
    if rng.random() < p_fill:
        u = rng.random()
        f1, s1 = f0 + 1, "minor" if u < p_minor else "normal" if u < p_minor + p_normal else s0
    visits = {}
    for v, (ft, scale_a, scale_b, fill, sig) in zip(VISITS, (
            (0.0, 1.0, 1.0, FILL_LEVELS_PCT[f0], s0),
            (d_t, 1.0 + d_a, 1.0 + d_b, FILL_LEVELS_PCT[f1], s1))):
        rot, tr = _pose(rng)
        # an ellipsoid's sagittal section scales with the square of a common radius factor
        radii = tuple(float(r) for r in np.round(bml * math.sqrt(max(scale_b, 0.2)), 4))
        visits[v] = Visit(femoral_mm=round(t_f + ft, 4), medial_tibial_mm=round(t_mt + ft, 4),
                          lateral_tibial_mm=round(t_lt + ft, 4),
                          defect_radius_mm=round(r_def * math.sqrt(max(scale_a, 0.2)), 4),
                          bml_radii_mm=radii,  # type: ignore[arg-type]
                          fill_pct=fill, signal=sig, rotation_deg=rot, translation_mm=tr,
                          seed=int(rng.integers(0, 2**31 - 1)))
    return Knee(subject_id=f"{arm[:3].lower()}-{group}-{i + 1:02d}", arm=arm, group=group,
                kl_grade=kl, side=str(rng.choice(["right", "left"])),
                spacing_mm=tuple(grids[int(rng.integers(0, len(grids)))]),  # type: ignore[arg-type]
                femur_radius_mm=round(20.0 * size, 3),
                patellar_mm=_clip(2.8 * thin * rng.normal(1.0, 0.05), 2.2, 3.4),
                noise_sigma=float(rng.uniform(0.03, 0.05)),
                site_radius_mm=float(rng.uniform(4.5, 5.5)), visits=visits)


# ----------------------------------------------------------------------------- phantoms

def knee_spec(knee: Knee, visit: Visit) -> Any:
    """The :class:`cartiq.data.phantom.PhantomSpec` of one knee at one visit."""
    from cartiq.data.phantom import PhantomSpec

    return PhantomSpec(seed=visit.seed, side=knee.side, spacing_mm=knee.spacing_mm,
                       rotation_deg=visit.rotation_deg, translation_mm=visit.translation_mm,
                       femur_radius_mm=knee.femur_radius_mm, femoral_thickness_mm=visit.femoral_mm,
                       medial_tibial_thickness_mm=visit.medial_tibial_mm,
                       lateral_tibial_thickness_mm=visit.lateral_tibial_mm,
                       patellar_thickness_mm=knee.patellar_mm,
                       full_defect_radius_mm=visit.defect_radius_mm,
                       femur_bml_radii_mm=visit.bml_radii_mm, noise_sigma=knee.noise_sigma)


# repair site on the patella's cartilage: a disk in the knee frame's x-z plane (mm from the
# patella's centre); the site's cartilage is repair tissue from the bone up to fill x T_p,
# joint fluid above it
SITE_CENTRE_MM = (-5.0, 1.0)
_CARTILAGE_INTENSITY, _FLUID_INTENSITY = 430.0, 620.0


def plant_repair_site(ph: Any, spec: Any, radius_mm: float, fill_pct: float,
                      signal_ratio: float) -> np.ndarray:
    """Turn a patellar cartilage disk of ``ph`` (in place) into a repair site; its mask."""
    from cartiq.data.phantom import knee_model, model_to_world, world_to_model
    from cartiq.io.labels import default_scheme

    m = knee_model(spec)
    geo = ph.labels.geometry
    sx, sz = SITE_CENTRE_MM[0], m.patella_z + SITE_CENTRE_MM[1]
    yp, tp = m.patella_y, m.T_p
    centre = model_to_world(spec, [[sx, yp - tp / 2, sz]])[0]
    half = radius_mm + 4.0
    corners = np.array([[a, b, c] for a in (-half, half) for b in (-half, half)
                        for c in (-half, half)]) + centre
    ijk = geo.world_to_index(corners)
    lo = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, np.asarray(geo.shape))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    p = world_to_model(spec, geo.index_to_world(grid.reshape(-1, 3))).reshape(grid.shape)
    disk = (p[..., 0] - sx) ** 2 + (p[..., 2] - sz) ** 2 < radius_mm ** 2
    y = p[..., 1]
    top = yp - tp + fill_pct / 100.0 * tp
    cart = disk & (y > yp - tp) & (y <= yp)
    repair = cart & (y <= top)
    empty = cart & ~repair
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    labels, image = ph.labels.array[box], ph.image.array[box]
    scheme = default_scheme()
    pc = scheme["patellar_cartilage"]
    native = image[(labels == pc) & ~disk]
    gain = float(np.median(native)) / _CARTILAGE_INTENSITY if native.size else 1.0  # bias field
    labels[empty & (labels == pc)] = 0
    img = image.astype(np.float32)
    img[repair] *= signal_ratio
    img[empty] *= _FLUID_INTENSITY / _CARTILAGE_INTENSITY
    over = disk & (y > yp) & (y <= top) & (labels == 0)  # hypertrophic repair (fill > 100%)
    if over.any():
        labels[over] = pc
        noise = np.random.default_rng(spec.seed + 1).normal(
            0.0, spec.noise_sigma * _CARTILAGE_INTENSITY, int(over.sum()))
        img[over] = signal_ratio * gain * _CARTILAGE_INTENSITY + noise
    image[...] = np.clip(np.round(img), 0, 32767).astype(image.dtype)
    sites = np.zeros(geo.shape, np.uint8)
    sites[box][disk & (y > yp - tp - 0.5) & (y <= yp)] = 1
    return sites


def write_knee(knee: Knee, visit_name: str, folder: Path) -> dict[str, Path]:
    """Write one visit's ``image``, ``seg``, ``sites`` (.nii.gz) and ``truth.json``."""
    import json

    from cartiq.data.phantom import make_phantom, write_phantom
    from cartiq.io.volume import atomic_write_text, write_volume

    visit = knee.visits[visit_name]
    spec = knee_spec(knee, visit)
    ph = make_phantom(spec)
    sites = plant_repair_site(ph, spec, knee.site_radius_mm, visit.fill_pct,
                              SIGNAL_RATIO[visit.signal])
    paths = write_phantom(ph, folder)
    paths["sites"] = write_volume(folder / "sites.nii.gz", sites, ph.labels.geometry)
    truth = dict(ph.truth)
    truth["repair_site"] = {"plate": "patellar_cartilage", "radius_mm": knee.site_radius_mm,
                            "area_mm2": math.pi * knee.site_radius_mm ** 2,
                            "fill_pct": visit.fill_pct, "signal": visit.signal,
                            "signal_ratio": SIGNAL_RATIO[visit.signal]}
    atomic_write_text(paths["truth"], json.dumps(truth, indent=2) + "\n")
    return paths


# ----------------------------------------------------------------------------- truth

OUTCOMES = (  # (outcome, structure, unit): the demo's planted outcomes, in table order
    ("thickness", "femoral_cartilage", "mm"),
    ("thickness", "medial_tibial_cartilage", "mm"),
    ("thickness", "lateral_tibial_cartilage", "mm"),
    ("denuded_area", "femoral_cartilage", "mm2"),
    ("bml_volume", "bone_marrow_lesion", "mm3"),
    ("bml_area", "femur", "mm2"),
    ("mocart_total", "repair_sites", "points"),
)
TRUTH_COLUMNS = ["subject_id", "arm", "stage_group", "kl_grade", "side", "outcome", "structure",
                 "unit", "planted_baseline", "planted_followup", "planted_change"]


def planted_mocart_points(fill_pct: float, signal_ratio: float,
                          config: dict[str, Any] | None = None) -> float:
    """MOCART total of a planted repair site: the categories of the planted fill and signal
    in the scoring config (first category whose conditions hold) + the constant items."""
    if config is None:
        import yaml

        from cartiq._resources import CONFIGS, resource_dir

        config = yaml.safe_load((resource_dir(CONFIGS) / "mocart2.yaml").read_text(encoding="utf-8"))
    planted = {"fill_pct": fill_pct, "fill_level_pct": fill_pct, "signal_ratio": signal_ratio}
    total = REPAIR_CONSTANT_POINTS
    for item in ("volume_fill", "signal"):
        for cat in config["items"][item]["categories"]:
            if all(_holds(c, planted) for c in cat.get("when") or []):
                total += float(cat["points"])
                break
    return total


def _holds(cond: dict[str, Any], values: dict[str, float]) -> bool:
    x = values[cond["measure"]]
    return ((cond.get("gt") is None or x > cond["gt"]) and (cond.get("ge") is None or x >= cond["ge"])
            and (cond.get("lt") is None or x < cond["lt"]) and (cond.get("le") is None or x <= cond["le"]))


def planted_values(truth: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(outcome, structure) -> planted value of one visit, from its phantom's truth.json."""
    out = {("thickness", p): float(truth["plates"][p]["thickness_mean_mm"])
           for p in ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage")}
    out[("denuded_area", "femoral_cartilage")] = float(
        truth["plates"]["femoral_cartilage"]["denuded_area_mm2"])
    out[("bml_volume", "bone_marrow_lesion")] = float(sum(x["volume_mm3"] for x in truth["lesions"]))
    femur = next(x for x in truth["lesions"] if x["bone"] == "femur")
    _, ry, rz = femur["semi_axes_mm"]  # central sagittal section of the ellipsoid
    out[("bml_area", "femur")] = math.pi * ry * rz
    site = truth["repair_site"]
    out[("mocart_total", "repair_sites")] = planted_mocart_points(site["fill_pct"],
                                                                  site["signal_ratio"])
    return out


def truth_rows(knee: Knee, truths: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``truth.csv`` rows of one knee (one per outcome)."""
    b, f = (planted_values(truths[v]) for v in VISITS)
    return [{"subject_id": knee.subject_id, "arm": knee.arm, "stage_group": knee.group,
             "kl_grade": knee.kl_grade, "side": knee.side, "outcome": o, "structure": s,
             "unit": u, "planted_baseline": round(b[(o, s)], 6),
             "planted_followup": round(f[(o, s)], 6),
             "planted_change": round(f[(o, s)] - b[(o, s)], 6)} for o, s, u in OUTCOMES]


# ----------------------------------------------------------------------------- the trial

def _write_visit(job: tuple[Knee, str, Path]) -> dict[str, Any]:
    import json

    knee, v, folder = job
    paths = write_knee(knee, v, folder)
    return json.loads(paths["truth"].read_text(encoding="utf-8"))


def write_trial(knees: list[Knee], out: Path, progress: Any = None,
                workers: int | None = None) -> tuple[Path, Path]:
    """Phantoms under ``out/scans`` (``workers`` processes), ``out/manifest.csv``,
    ``out/truth.csv``."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from cartiq.io.volume import atomic_path

    jobs = [(k, v, out / "scans" / k.subject_id / v) for k in knees for v in VISITS]
    n = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    truths: dict[tuple[str, str], dict[str, Any]] = {}
    if n == 1:
        results: Any = map(_write_visit, jobs)
    else:
        pool = ProcessPoolExecutor(n)
        results = pool.map(_write_visit, jobs)
    try:
        for (k, v, _), truth in zip(jobs, results):
            truths[(k.subject_id, v)] = truth
            if progress is not None:
                progress()
    finally:
        if n > 1:
            pool.shutdown(cancel_futures=True)
    rows, truth_table = [], []
    for knee in knees:
        for v in VISITS:
            folder = Path("scans") / knee.subject_id / v
            rows.append({"subject_id": knee.subject_id, "timepoint": v,
                         "image": (folder / "image.nii.gz").as_posix(),
                         "seg": (folder / "seg.nii.gz").as_posix(),
                         "sites": (folder / "sites.nii.gz").as_posix(),
                         "side": knee.side, "arm": knee.arm, "kl_grade": knee.kl_grade})
        truth_table += truth_rows(knee, {v: truths[(knee.subject_id, v)] for v in VISITS})
    manifest, truth_csv = out / "manifest.csv", out / "truth.csv"
    for path, data, cols in ((manifest, rows, list(rows[0])),
                             (truth_csv, truth_table, TRUTH_COLUMNS)):
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            w.writerows(data)
    return manifest, truth_csv


@dataclass
class DemoResult:
    out: Path
    manifest: Path
    truth: Path
    batch_out: Path
    table: Path
    exit_code: int
    timings_s: dict[str, float]


def run_demo_trial(out: Path, n_per_group: int = 8, seed: int = 0, *, workers: int | None = None,
                   grids: tuple[tuple[float, float, float], ...] = GRIDS,
                   progress: Any = None) -> DemoResult:
    """Generate, run and evaluate a simulated trial in ``out`` (see the module docstring).

    ``progress``: optional object with ``phantom()`` (one scan written) and ``batch`` (the
    :func:`cartiq.batch.batch.run_batch` progress callable).
    """
    import time

    from cartiq.batch.batch import BatchOptions, run_batch
    from cartiq.demo_recovery import write_recovery
    from cartiq.io.outputs import check_writable
    from cartiq.report.cohort import write_cohort_report

    knees = design_trial(n_per_group, seed, grids)  # bad sizes fail before anything is written
    out = Path(out)
    check_writable(out)
    if out.exists() and any(out.iterdir()) and not (out / "truth.csv").is_file():
        raise InputError("output folder exists and is not a demo trial folder; choose a new one",
                         out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("demo trial: %d knees x 2 visits (%d per arm x stage group, seed %d) -> %s",
             len(knees), n_per_group, seed, out)
    manifest, truth = write_trial(knees, out, getattr(progress, "phantom", None), workers)
    t1 = time.perf_counter()
    result = run_batch(manifest, BatchOptions(out=out, workers=workers, device="cpu",
                                              reports=False),
                       progress=getattr(progress, "batch", None))
    t2 = time.perf_counter()
    table = write_recovery(out, out)
    for err in write_cohort_report(out).errors:
        log.warning("report: %s", err)
    t3 = time.perf_counter()
    timings = {"phantoms": round(t1 - t0, 1), "batch": round(t2 - t1, 1),
               "recovery_and_report": round(t3 - t2, 1), "total": round(t3 - t0, 1)}
    log.info("demo trial finished in %.0f s (phantoms %.0f s, batch %.0f s)", t3 - t0,
             t1 - t0, t2 - t1)
    return DemoResult(out=out, manifest=manifest, truth=truth, batch_out=out,
                      table=table, exit_code=result.exit_code, timings_s=timings)
