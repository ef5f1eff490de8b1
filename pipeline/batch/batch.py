"""Trial batch runner: manifest in, per-scan folders, comparisons and cohort tables out.

Per scan (one task on a worker): segment (unless the row gives ``seg``) -> measure -> score
into ``OUT/<subject_id>/<timepoint>/``; per subject, each follow-up against its baseline into
``OUT/<subject_id>/compare_<baseline>_<followup>/``; then the cohort tables
(:mod:`cartiq.batch.cohort`).  A scan is done only when its ``manifest.json`` (written last)
carries the batch ``fingerprint`` (sha256 of inputs, model and configs): re-runs skip such
scans.  A failing scan is recorded (stage + one line) and the batch goes on.  Runs
in-process (one worker), in a local process pool, or on an existing Dask cluster; scans
of lost workers rerun elsewhere.  User guide: ``docs/batch.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cartiq.errors import InputError, one_line
from cartiq.batch.executors import (DaskCluster, LocalPool, Serial, WorkerFailure, torch_threads,
                                    worker_index)
from cartiq.batch.manifest import (Manifest, ScanRow, compare_is_current, config_hashes, fingerprint,
                               input_hashes, model_identity, read_manifest_csv, scan_outdated)

__all__ = ["BatchOptions", "ScanTask", "CompareTask", "Outcome", "BatchResult", "run_batch",
           "process_scan", "process_compare", "EXIT_FAILED"]

log = logging.getLogger(__name__)

EXIT_FAILED = 3
_SEGMENTERS: dict[tuple[str, str], Any] = {}  # per-worker model cache (loaded once)


@dataclass(frozen=True)
class BatchOptions:
    """How to run a batch (see :func:`run_batch`)."""

    out: Path
    workers: int | None = None
    scheduler: str | None = None
    device: str = "auto"
    model: str | None = None
    measure_config: Path | None = None
    skip_invalid: bool = False
    retries: int = 3
    reports: bool = True
    include_qc_fail: bool = False  # cohort tables keep scans whose QC status is fail
    include_qc_fail: bool = False  # cohort tables keep scans whose QC status is fail


@dataclass(frozen=True)
class ScanTask:
    """Everything a worker needs for one scan (picklable)."""

    row: ScanRow
    out_dir: Path
    measure_config: Path | None
    config_hashes: dict[str, str]
    model: str | None
    device: str


@dataclass(frozen=True)
class CompareTask:
    """One follow-up against its baseline (``force``: a scan of the pair was recomputed)."""

    subject_id: str
    baseline: str
    followup: str
    baseline_dir: Path
    followup_dir: Path
    out_dir: Path
    force: bool = False
    config_hash: str | None = None


@dataclass
class Outcome:
    """Result of one task: ``status`` is done, skipped or failed."""

    subject_id: str
    timepoint: str
    status: str
    stage: str = ""
    error: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
    """Outcomes of a batch; ``exit_code`` 3 when anything failed."""

    out: Path
    scans: list[Outcome]
    compares: list[Outcome]
    failures: list[dict[str, str]]
    wall_s: float

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failures else 0

    def count(self, status: str) -> int:
        return sum(1 for o in self.scans if o.status == status)


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copy the ``cartiq`` logger's records to ``path`` while the block runs (appended: a
    scan's log is the history of its runs, kept when its folder is emptied)."""
    root, old_level = logging.getLogger("cartiq"), logging.getLogger("cartiq").level
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _resolve_device(device: str) -> str:
    """On a multi-GPU host, local worker *i* takes GPU *i* mod n for ``auto``/``cuda``."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device not in ("auto", "cuda") or n <= 1:
        return device  # the segmenter resolves auto / reports a missing GPU
    try:
        from distributed import get_worker

        name = str(get_worker().name if worker_index() is None else worker_index())
    except ValueError:  # neither a pool nor a Dask worker
        name = ""
    return f"cuda:{int(name) % n if name.isdigit() else 0}"


def _segmenter(model: str | None, device: str) -> Any:
    """The worker's segmenter for ``(model, device)``, loaded on first use only."""
    key = (str(model or "default"), device)
    if key not in _SEGMENTERS:
        from cartiq.segmentation.segmenter import Segmenter

        _SEGMENTERS[key] = Segmenter(model, device=device)
        if torch_threads() is not None:  # a pool worker: its share of the CPU threads
            import torch

            torch.set_num_threads(torch_threads())
    return _SEGMENTERS[key]


def process_scan(task: ScanTask) -> Outcome:
    """Run one scan's stages on this worker; never raises for a bad scan.

    An up-to-date scan (same fingerprint, every file its manifest lists unchanged) is
    skipped; any other is recomputed from an emptied folder, and the log says why.
    """
    from cartiq.io.outputs import begin_folder

    r, out = task.row, task.out_dir
    t0, stage, timings, notes = time.perf_counter(), "hash", {}, []
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _log_to(out / "scan.log"):
            inputs = input_hashes(r)
            device = _resolve_device(task.device) if r.seg is None else "cpu"
            model = model_identity(task.model) if r.seg is None else None
            fp = fingerprint(r, inputs, model, task.config_hashes)
            timings["hash"] = round(time.perf_counter() - t0, 3)
            reason = scan_outdated(out, fp)
            if reason is None:
                log.info("%s/%s: up to date, skipped", r.subject_id, r.timepoint)
                return Outcome(*r.key, "skipped")
        stage = "output"
        # an emptied folder: no file of an earlier run survives (the log goes on)
        begin_folder(out, owned=True, inputs=(r.image, r.seg, r.sites))
    except Exception as exc:  # unreadable input, unwritable output...
        return _failed(r, out, stage, exc)
    if reason != "not computed yet":
        notes.append(f"recomputed: {reason}")
    with _log_to(out / "scan.log"):
        try:
            for n in notes:
                log.warning("%s/%s: %s", r.subject_id, r.timepoint, n)
            log.info("%s/%s: processing (image %s)", r.subject_id, r.timepoint, r.image)
            from cartiq.measurement.measure import run_measure

            seg, labels = r.seg, r.labels
            if seg is None:
                stage, t = "segment", time.perf_counter()
                (seg, device), labels = _run_segment(r, out, task.model, device), None
                timings["segment"] = round(time.perf_counter() - t, 3)
            stage, t = "measure", time.perf_counter()
            run = run_measure(r.image, seg, out, labels=labels, side=r.side,
                              config_path=task.measure_config, fresh=False,
                              side_source="manifest",
                              side_override=r.side_override)
            timings["measure"] = round(time.perf_counter() - t, 3)
            if not any(p.present for p in run.result.plates.values()):
                raise InputError("segmentation has no cartilage plate (empty?)", seg)
            stage, t = "score", time.perf_counter()
            notes += [n for n in [_run_score(r, out)] if n]
            timings["score"] = round(time.perf_counter() - t, 3)
            stage = "manifest"
            _finish_scan(task, out, run.manifest, inputs, model, device, fp, timings, notes)
        except Exception as exc:  # fault isolation: record and go on
            return _failed(r, out, stage, exc)
    return Outcome(*r.key, "done", notes=notes)


def _failed(r: ScanRow, out: Path, stage: str, exc: Exception) -> Outcome:
    """Log a scan's failure (where a log can be written) and leave its folder incomplete."""
    log.error("%s/%s failed in %s: %s", r.subject_id, r.timepoint, stage, one_line(exc))
    log.debug("traceback:\n%s", traceback.format_exc())
    try:
        (out / "manifest.json").unlink(missing_ok=True)
    except OSError:  # the folder cannot be written: it holds no manifest of this run
        pass
    return Outcome(*r.key, "failed", stage=stage, error=one_line(exc))


def _run_segment(r: ScanRow, out: Path, model: str | None, device: str) -> tuple[Path, str]:
    """Segment with the worker's cached model into ``out/segment/`` (its own manifest)."""
    from cartiq.segmentation.segmenter import segment_file

    path, manifest = segment_file(r.image, out / "segment", side=r.side,
                                  side_override=r.side_override, side_source="manifest",
                                  segmenter=_segmenter(model, device))
    return path, str(manifest.get("device", device))


def _run_score(r: ScanRow, out: Path) -> str | None:
    """MOCART-like scoring into ``out/score/``; a note when the stage is unavailable."""
    try:
        from cartiq.scoring.mocart import run_score
    except ImportError:
        return "score: stage not available in this build (cartiq.scoring.mocart.run_score); skipped"
    run_score(out, out / "score", sites_path=r.sites)
    return None


def _finish_scan(task: ScanTask, out: Path, measure_manifest: dict[str, Any],
                 inputs: dict[str, str | None], model: dict[str, Any] | None, device: str,
                 fp: str, timings: dict[str, float], notes: list[str]) -> None:
    from cartiq.io.outputs import write_manifest

    r = task.row
    manifest = {**measure_manifest, "timings_s": {**measure_manifest.get("timings_s", {}),
                                                  **{f"stage_{k}": v for k, v in timings.items()}}}
    manifest["batch"] = {
        "subject_id": r.subject_id, "timepoint": r.timepoint, "arm": r.arm,
        "kl_grade": r.kl_grade, "manifest_line": r.line, "inputs_sha256": inputs,
        "paths": {k: str(getattr(r, k)) for k in ("image", "seg", "sites") if getattr(r, k)},
        "segmentation": "given" if r.seg is not None else "model",
        "model": model, "device": device, "config_hashes": task.config_hashes,
        "stage_timings_s": timings, "notes": notes, "fingerprint": fp,
    }
    write_manifest(out, manifest)


def process_compare(task: CompareTask) -> Outcome:
    """Compare a follow-up with its baseline (``cartiq.longitudinal.compare.compare_scans``)."""
    if not task.force and compare_is_current(task.out_dir, task.baseline_dir, task.followup_dir,
                                             task.config_hash):
        return Outcome(task.subject_id, task.followup, "skipped")
    from cartiq.io.outputs import begin_folder

    try:  # incomplete (and emptied) until compare_scans writes its manifest
        begin_folder(task.out_dir, owned=True, inputs=(task.baseline_dir, task.followup_dir))
    except Exception as exc:
        return Outcome(task.subject_id, task.followup, "failed", stage="compare",
                       error=one_line(exc))
    with _log_to(task.out_dir / "compare.log"):
        try:
            from cartiq.longitudinal.compare import compare_scans
        except ImportError:
            return Outcome(task.subject_id, task.followup, "skipped", stage="compare", notes=[
                "compare: stage not available in this build (cartiq.longitudinal.compare); skipped"])
        try:
            compare_scans(task.baseline_dir, task.followup_dir, task.out_dir)
        except Exception as exc:
            log.error("%s: comparison failed: %s", task.out_dir, one_line(exc))
            log.debug("traceback:\n%s", traceback.format_exc())
            (task.out_dir / "manifest.json").unlink(missing_ok=True)
            return Outcome(task.subject_id, task.followup, "failed", stage="compare",
                           error=one_line(exc))
    return Outcome(task.subject_id, task.followup, "done")


def _outcome(task: ScanTask | CompareTask, result: Outcome | WorkerFailure) -> Outcome:
    """The task's outcome; a task its worker could not finish fails in stage ``worker``."""
    if isinstance(result, Outcome):
        return result
    key = task.row.key if isinstance(task, ScanTask) else (task.subject_id, task.followup)
    return Outcome(*key, "failed", stage="worker", error=result.error)


def run_batch(manifest_csv: Path, opts: BatchOptions, progress: Any = None) -> BatchResult:
    """Run a trial batch (see the module docstring); returns outcomes and failures.

    ``progress``: optional callable, called with each scan's :class:`Outcome`; its
    ``start(total)`` and ``stop()`` methods are called too when it has them.
    """
    from cartiq.io.outputs import check_writable

    t0 = time.perf_counter()
    manifest = read_manifest_csv(manifest_csv, skip_invalid=opts.skip_invalid)
    # absolute before anything reaches a worker: a Dask worker has its own working folder
    out = Path(os.path.abspath(opts.out))
    if opts.measure_config is not None:
        opts = dataclasses.replace(opts, measure_config=Path(os.path.abspath(opts.measure_config)))
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    with _log_to(out / "batch.log"):
        for bad in manifest.invalid:
            log.warning("skipped invalid manifest row: %s", bad)
        if manifest.unknown_columns:
            log.warning("ignored unknown column(s): %s", ", ".join(manifest.unknown_columns))
        result = _run(manifest, opts, out, progress)
        from cartiq.batch.cohort import write_cohort_tables, write_reports

        write_cohort_tables(out, manifest, result.scans, result.compares, result.failures,
                            include_qc_fail=opts.include_qc_fail)
        for err in write_reports(out, manifest.subjects()) if opts.reports else []:
            log.warning("report: %s", err)
        result.wall_s = time.perf_counter() - t0
        log.info("batch finished in %.1f s: %d done, %d skipped (up to date), %d failed; "
                 "%d comparison(s) done, %d skipped", result.wall_s, result.count("done"),
                 result.count("skipped"), result.count("failed"),
                 sum(o.status == "done" for o in result.compares),
                 sum(o.status == "skipped" for o in result.compares))
    return result


def _stage_modules(needs_model: bool, has_pairs: bool) -> tuple[str, ...]:
    """The stage modules a worker will use (imported once, before the workers fork)."""
    return ("cartiq.batch.batch", "cartiq.measurement.measure", "cartiq.measurement.outputs", "cartiq.measurement.qc",
            "cartiq.scoring.mocart",
            *(("cartiq.segmentation.segmenter",) if needs_model else ()),
            *(("cartiq.longitudinal.compare",) if has_pairs else ()))


def _run(manifest: Manifest, opts: BatchOptions, out: Path, progress: Any) -> BatchResult:
    needs_model = any(r.seg is None for r in manifest.rows)
    pairs = manifest.pairs()
    workers = opts.workers or _default_workers(opts.device if needs_model else "cpu")
    workers = max(1, min(workers, len(manifest.rows))) if not opts.scheduler else workers
    # a local pool's server starts first and imports the stages while this process hashes
    # the configs and loads the cohort code (pandas); its workers fork from it on first submit
    executor = (DaskCluster(opts.scheduler, opts.retries) if opts.scheduler
                else LocalPool(workers, opts.retries, _stage_modules(needs_model, bool(pairs)))
                if workers > 1 else Serial())
    scans, compares = {}, []  # type: dict[tuple[str, str], Outcome], list[Outcome]
    try:
        hashes = config_hashes(opts.measure_config, compare=bool(pairs))
        tasks = [ScanTask(r, out / r.subject_id / r.timepoint, opts.measure_config, hashes,
                          opts.model, opts.device) for r in manifest.rows]
        log.info("batch: %d scan(s) of %d subject(s) from %s -> %s (%s)", len(tasks),
                 len(manifest.subjects()), manifest.path, out, f"scheduler {opts.scheduler}"
                 if opts.scheduler else f"{workers} local worker(s)")
        if not isinstance(executor, Serial):
            importlib.import_module("cartiq.batch.cohort")  # pandas: loads while workers start

        getattr(progress, "start", lambda n: None)(len(tasks))
        for t in tasks:
            executor.submit(process_scan, t, gpu=t.row.seg is None)
        for task, result in executor.results():
            outcome = _outcome(task, result)
            if isinstance(task, ScanTask):
                if outcome.status == "done" and not (task.out_dir / "manifest.json").is_file():
                    outcome = Outcome(*task.row.key, "failed", stage="manifest", error=(
                        f"worker reported success but {task.out_dir}/manifest.json is missing "
                        "(is OUT on a file system shared with the workers?)"))
                scans[task.row.key] = outcome
                if progress is not None:
                    progress(outcome)
                for ct in _ready_compares(task.row, scans, pairs, out, hashes.get("compare")):
                    executor.submit(process_compare, ct)
            else:
                compares.append(outcome)
    except BaseException:  # SIGTERM (SystemExit), Ctrl-C, an error: no worker outlives us
        getattr(progress, "stop", lambda: None)()
        executor.close(abort=True)
        raise
    getattr(progress, "stop", lambda: None)()
    executor.close()
    from cartiq.batch.cohort import failure_rows  # after the scans: in-process scans run lean

    order = {r.key: i for i, r in enumerate(manifest.rows)}
    scan_list = sorted(scans.values(), key=lambda o: order[(o.subject_id, o.timepoint)])
    for o in scan_list + compares:
        for n in o.notes:
            log.warning("%s/%s: %s", o.subject_id, o.timepoint, n)
    return BatchResult(out=out, scans=scan_list, compares=compares, wall_s=0.0,
                       failures=failure_rows(manifest.invalid, scan_list + compares))


def _default_workers(device: str) -> int:
    """One worker per CPU core; when segmenting on GPUs, one worker (one model) per GPU."""
    if device.startswith("cuda") or device == "auto":
        import torch

        if torch.cuda.is_available():
            return 1 if ":" in device else torch.cuda.device_count()
    return os.cpu_count() or 1


def _ready_compares(row: ScanRow, scans: dict[tuple[str, str], Outcome],
                    pairs: list[tuple[ScanRow, ScanRow]], out: Path,
                    config_hash: str | None) -> list[CompareTask]:
    """Comparisons involving ``row`` whose two scans are now both finished."""
    ready = []
    for b, f in pairs:
        ob, of = scans.get(b.key), scans.get(f.key)
        if row.key in (b.key, f.key) and ob and of and "failed" not in (ob.status, of.status):
            d = out / b.subject_id
            ready.append(CompareTask(b.subject_id, b.timepoint, f.timepoint, d / b.timepoint,
                                     d / f.timepoint, d / f"compare_{b.timepoint}_{f.timepoint}",
                                     force="done" in (ob.status, of.status),
                                     config_hash=config_hash))
    return ready
