"""Trial batch runner: manifest in, per-scan folders, comparisons and cohort tables out.

Layout of ``OUT``::

    OUT/<subject_id>/<timepoint>/                 one scan: measurement contract, score/,
                                                  scan.log, manifest.json (written last)
    OUT/<subject_id>/compare_<baseline>_<followup>/   baseline vs follow-up (longitudinal)
    OUT/measurements.csv, change.csv, mocart.csv, failures.csv, cohort_summary.csv (+ .parquet)
    OUT/batch.log

Per scan (a task on a worker): segment (unless the row gives ``seg``) -> measure -> score.
A scan counts as done only when its ``manifest.json`` exists and carries the batch
``fingerprint`` (sha256 of the inputs, model and config); re-running skips such scans and
recomputes the others.  Any exception inside a scan is recorded (stage + one line) and the
rest of the batch goes on.  Execution: in-process for one worker, a Dask ``LocalCluster`` for
several, or an existing Dask cluster (``scheduler="tcp://host:8786"``); workers lost
mid-scan are replaced by Dask (the scan reruns elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import InputError
from pipeline.manifest import Manifest, ScanRow, read_manifest_csv

__all__ = ["BatchOptions", "ScanTask", "CompareTask", "Outcome", "BatchResult", "run_batch",
           "process_scan", "process_compare", "RichProgress", "EXIT_FAILED"]

log = logging.getLogger(__name__)

EXIT_FAILED = 3
FINGERPRINT_VERSION = 1
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
    seconds: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class BatchResult:
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


# ----------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, Exception) or type(exc).__module__ != "pipeline.errors":
        text = f"{type(exc).__name__}: {text}"
    return text[:400]


def _sha(path: Path | None) -> str | None:
    from pipeline.io import sha256_file

    return None if path is None else sha256_file(path)


def _file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


@contextmanager
def _log_to(path: Path, level: int = logging.DEBUG) -> Iterator[None]:
    """Copy the ``pipeline`` logger's records to ``path`` while the block runs."""
    root = logging.getLogger("pipeline")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def _resolve_device(device: str) -> str:
    """``auto`` -> CUDA when present; on a multi-GPU host a local worker takes GPU name % n."""
    if device not in ("auto", "cuda"):
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "cpu"
    idx = 0
    try:
        from distributed import get_worker

        name = get_worker().name
        idx = int(name) % n if str(name).isdigit() else 0
    except (ImportError, ValueError):
        idx = 0
    return f"cuda:{idx}"


def _segmenter(model: str | None, device: str) -> Any:
    """The worker's segmenter for ``(model, device)``, loaded on first use only."""
    key = (str(model or "default"), device)
    if key not in _SEGMENTERS:
        from pipeline.segment import Segmenter

        _SEGMENTERS[key] = Segmenter(model, device=device)
    return _SEGMENTERS[key]


def model_identity(model: str | None) -> dict[str, Any]:
    """Model name and weights sha256 (as recorded in its metadata), for fingerprints."""
    from pipeline.models import model_info

    info = model_info(model) if model else model_info(_default_model())
    return {"name": info.get("name"), "version": info.get("version"),
            "weights_sha256": info.get("sha256") or info.get("weights_sha256")}


def _default_model() -> str:
    from pipeline.models import DEFAULT_MODEL

    return DEFAULT_MODEL


# ----------------------------------------------------------------------------- one scan


def _fingerprint(task: ScanTask, inputs: dict[str, str | None], model: dict[str, Any] | None) -> str:
    r = task.row
    data = {"v": FINGERPRINT_VERSION, "inputs": inputs, "model": model,
            "configs": {k: v for k, v in task.config_hashes.items() if k != "compare"},
            "side": r.side, "labels": r.labels}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def scan_is_current(out_dir: Path, fingerprint: str) -> bool:
    """A finished batch scan folder whose recorded fingerprint matches."""
    try:
        m = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (m.get("batch") or {}).get("fingerprint") == fingerprint


def process_scan(task: ScanTask) -> Outcome:
    """Run one scan's stages on this worker; never raises for a bad scan."""
    from pipeline.outputs import begin_folder

    r, out = task.row, task.out_dir
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    stage = "hash"
    out.mkdir(parents=True, exist_ok=True)
    with _log_to(out / "scan.log"):
        try:
            inputs = {"image": _sha(r.image), "seg": _sha(r.seg), "sites": _sha(r.sites)}
            device = _resolve_device(task.device) if r.seg is None else "cpu"
            model = model_identity(task.model) if r.seg is None else None
            fp = _fingerprint(task, inputs, model)
            timings["hash"] = round(time.perf_counter() - t0, 3)
            if scan_is_current(out, fp):
                log.info("%s/%s: up to date, skipped", r.subject_id, r.timepoint)
                return Outcome(r.subject_id, r.timepoint, "skipped",
                               seconds=time.perf_counter() - t0)
            log.info("%s/%s: processing (image %s)", r.subject_id, r.timepoint, r.image)
            begin_folder(out)  # removes an old manifest: incomplete until the end
            (out / "score" / "manifest.json").unlink(missing_ok=True)
            seg, labels = r.seg, r.labels
            if seg is None:
                stage = "segment"
                t = time.perf_counter()
                seg = _run_segment(r, out, task.model, device)
                labels = None
                timings["segment"] = round(time.perf_counter() - t, 3)
            stage = "measure"
            t = time.perf_counter()
            from pipeline.measure import run_measure

            run = run_measure(r.image, seg, out, labels=labels, side=r.side,
                              config_path=task.measure_config)
            timings["measure"] = round(time.perf_counter() - t, 3)
            stage = "score"
            t = time.perf_counter()
            note = _run_score(r, out)
            if note:
                notes.append(note)
            timings["score"] = round(time.perf_counter() - t, 3)
            stage = "manifest"
            _finish_scan(task, out, run.manifest, inputs, model, device, fp, timings, notes)
        except Exception as exc:  # fault isolation: record and go on
            log.error("%s/%s failed in %s: %s", r.subject_id, r.timepoint, stage, _one_line(exc))
            log.debug("traceback:\n%s", traceback.format_exc())
            (out / "manifest.json").unlink(missing_ok=True)
            return Outcome(r.subject_id, r.timepoint, "failed", stage=stage,
                           error=_one_line(exc), seconds=time.perf_counter() - t0,
                           timings_s=timings)
    return Outcome(r.subject_id, r.timepoint, "done", seconds=time.perf_counter() - t0,
                   timings_s=timings, notes=notes)


def _run_segment(r: ScanRow, out: Path, model: str | None, device: str) -> Path:
    """Segment with the worker's cached model; the label map goes to ``out/segment/``."""
    from pipeline.io import write_volume

    seg_dir = out / "segment"
    seg_dir.mkdir(parents=True, exist_ok=True)
    segmenter = _segmenter(model, device)
    result = segmenter.segment_file(r.image, side=r.side) if hasattr(
        segmenter, "segment_file") else segmenter(r.image)
    labels = getattr(result, "labels", result)
    array = getattr(labels, "array", labels)
    geometry = getattr(labels, "geometry", None) or getattr(result, "geometry")
    return write_volume(seg_dir / "segmentation.nii.gz", array, geometry)


def _run_score(r: ScanRow, out: Path) -> str | None:
    """MOCART-like scoring into ``out/score/``; a note when the stage is unavailable."""
    try:
        from pipeline.scoring import run_score
    except ImportError:
        return "score: stage not available in this build (pipeline.scoring.run_score); skipped"
    run_score(out, out / "score", sites_path=r.sites)
    return None


def _finish_scan(task: ScanTask, out: Path, measure_manifest: dict[str, Any],
                 inputs: dict[str, str | None], model: dict[str, Any] | None, device: str,
                 fp: str, timings: dict[str, float], notes: list[str]) -> None:
    from pipeline.outputs import write_manifest

    r = task.row
    manifest = dict(measure_manifest)
    manifest["stage"] = "batch_scan"
    manifest["timings_s"] = {**manifest.get("timings_s", {}),
                             **{f"stage_{k}": v for k, v in timings.items()}}
    manifest["batch"] = {
        "subject_id": r.subject_id, "timepoint": r.timepoint, "arm": r.arm,
        "kl_grade": r.kl_grade, "manifest_line": r.line,
        "inputs_sha256": inputs,
        "paths": {k: str(v) for k, v in (("image", r.image), ("seg", r.seg),
                                          ("sites", r.sites)) if v is not None},
        "segmentation": "given" if r.seg is not None else "model",
        "model": model, "device": device, "config_hashes": task.config_hashes,
        "stage_timings_s": timings, "notes": notes, "fingerprint": fp,
    }
    write_manifest(out, manifest)


# ----------------------------------------------------------------------------- compare


def compare_is_current(task: CompareTask) -> bool:
    """Finished with the same config, and newer than both scans' manifests."""
    m = task.out_dir / "manifest.json"
    try:
        t = m.stat().st_mtime
        same = json.loads(m.read_text(encoding="utf-8")).get("config_hash") == task.config_hash
        return same and t >= (task.baseline_dir / "manifest.json").stat().st_mtime and \
            t >= (task.followup_dir / "manifest.json").stat().st_mtime
    except (OSError, ValueError):
        return False


def process_compare(task: CompareTask) -> Outcome:
    """Compare a follow-up with its baseline (``pipeline.longitudinal.compare_scans``)."""
    t0 = time.perf_counter()
    if not task.force and compare_is_current(task):
        return Outcome(task.subject_id, task.followup, "skipped")
    task.out_dir.mkdir(parents=True, exist_ok=True)
    with _log_to(task.out_dir / "compare.log"):
        try:
            from pipeline.longitudinal import compare_scans
        except ImportError:
            note = "compare: stage not available in this build (pipeline.longitudinal); skipped"
            log.warning(note)
            return Outcome(task.subject_id, task.followup, "skipped", stage="compare",
                           notes=[note])
        try:
            (task.out_dir / "manifest.json").unlink(missing_ok=True)
            compare_scans(task.baseline_dir, task.followup_dir, task.out_dir)
        except Exception as exc:
            log.error("%s compare %s->%s failed: %s", task.subject_id, task.baseline,
                      task.followup, _one_line(exc))
            log.debug("traceback:\n%s", traceback.format_exc())
            (task.out_dir / "manifest.json").unlink(missing_ok=True)
            return Outcome(task.subject_id, task.followup, "failed", stage="compare",
                           error=_one_line(exc), seconds=time.perf_counter() - t0)
    return Outcome(task.subject_id, task.followup, "done", seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- driver


class RichProgress:
    """Progress bar on stderr: scans done/failed/skipped with an ETA (used by the CLI)."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                           MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                           transient=False)
        self._task = None
        self._counts = {"done": 0, "failed": 0, "skipped": 0}

    def start(self, total: int) -> None:
        self._p.start()
        self._task = self._p.add_task("scans", total=total, counts=self._text())

    def _text(self) -> str:
        c = self._counts
        return f"done {c['done']} failed {c['failed']} skipped {c['skipped']}"

    def __call__(self, outcome: Outcome) -> None:
        self._counts[outcome.status] = self._counts.get(outcome.status, 0) + 1
        self._p.update(self._task, advance=1, counts=self._text())

    def stop(self) -> None:
        self._p.stop()


def _config_hashes(measure_config: Path | None) -> dict[str, str]:
    """Hashes of every config that shapes a scan's results (resolved where typed)."""
    from pipeline.config import MeasureConfig, config_hash, load_config
    from pipeline.labels import CONFIG_DIR

    out = {"measure": config_hash(load_config(measure_config, MeasureConfig,
                                              default_name="measure.yaml"))}
    try:
        from pipeline.scoring import load_scoring_config

        out["score"] = config_hash(load_scoring_config(None))
    except ImportError:
        pass
    try:
        from pipeline.longitudinal import load_compare_config

        out["compare"] = config_hash(load_compare_config())
    except ImportError:
        pass
    h = _file_hash(CONFIG_DIR / "labels.yaml")
    if h:
        out["labels"] = h
    return out


class _Serial:
    """In-process execution (one worker): no pool overhead."""

    def __init__(self) -> None:
        self._queue: list[tuple[Callable, Any]] = []

    def submit(self, fn: Callable, task: Any) -> None:
        self._queue.append((fn, task))

    def results(self) -> Iterator[tuple[Any, Outcome]]:
        while self._queue:
            fn, task = self._queue.pop(0)
            yield task, fn(task)

    def close(self) -> None:
        pass


class _Dask:
    """A Dask client on a LocalCluster (``workers``) or an existing ``scheduler``."""

    def __init__(self, workers: int, scheduler: str | None, retries: int, gpu: bool) -> None:
        import dask
        from distributed import Client, LocalCluster, as_completed

        self._cluster = None
        if scheduler:
            try:
                self._client = Client(scheduler, timeout="20s")
            except OSError as exc:
                raise InputError(f"cannot reach the Dask scheduler ({exc})", scheduler) from None
        else:
            with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
                self._cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                             processes=True, dashboard_address=None,
                                             silence_logs=logging.ERROR)
            self._client = Client(self._cluster)
        info = self._client.scheduler_info().get("workers", {})
        self._gpu_resource = gpu and any("GPU" in (w.get("resources") or {}) for w in info.values())
        log.info("dask: %d worker(s) at %s%s", len(info), self._client.scheduler.address,
                 " (GPU resources)" if self._gpu_resource else "")
        self._retries = retries
        self._ac = as_completed()
        self._tasks: dict[str, Any] = {}
        self._n = 0

    def submit(self, fn: Callable, task: Any) -> None:
        needs_gpu = self._gpu_resource and isinstance(task, ScanTask) and task.row.seg is None
        self._n += 1
        fut = self._client.submit(fn, task, key=f"cartiq-{fn.__name__}-{self._n}-{time.time_ns()}",
                                  pure=False, retries=self._retries,
                                  resources={"GPU": 1} if needs_gpu else None)
        self._tasks[fut.key] = task
        self._ac.add(fut)

    def results(self) -> Iterator[tuple[Any, Outcome]]:
        for fut in self._ac:
            task = self._tasks.pop(fut.key)
            try:
                outcome = fut.result()
            except Exception as exc:  # KilledWorker, lost connection...
                sid, tp = _task_ids(task)
                outcome = Outcome(sid, tp, "failed", stage="worker", error=_one_line(exc))
            fut.release()
            yield task, outcome

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def _task_ids(task: Any) -> tuple[str, str]:
    if isinstance(task, ScanTask):
        return task.row.subject_id, task.row.timepoint
    return task.subject_id, task.followup


def _verify(task: ScanTask, outcome: Outcome) -> Outcome:
    """A scan counts as done only when its manifest exists where the client can see it."""
    if outcome.status == "done" and not (task.out_dir / "manifest.json").is_file():
        return Outcome(outcome.subject_id, outcome.timepoint, "failed", stage="manifest",
                       error=f"worker reported success but {task.out_dir}/manifest.json is "
                             "missing (is OUT on a shared file system?)")
    return outcome


def run_batch(manifest_csv: Path, opts: BatchOptions,
              progress: RichProgress | Callable[[Outcome], None] | None = None) -> BatchResult:
    """Run a trial batch; see the module docstring.  Returns counts and failures."""
    from pipeline.cohort import write_cohort_tables
    from pipeline.outputs import check_writable

    t0 = time.perf_counter()
    manifest = read_manifest_csv(manifest_csv, skip_invalid=opts.skip_invalid)
    out = Path(opts.out)
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    with _log_to(out / "batch.log"):
        for bad in manifest.invalid:
            log.warning("skipped invalid manifest row: %s", bad)
        if manifest.unknown_columns:
            log.warning("ignored unknown manifest column(s): %s", ", ".join(manifest.unknown_columns))
        result = _run(manifest, opts, out, progress, t0)
        write_cohort_tables(out, manifest, result.scans, result.compares, result.failures)
        result.wall_s = time.perf_counter() - t0
        log.info("batch finished in %.1f s: %d done, %d skipped (up to date), %d failed; "
                 "%d comparison(s) done, %d skipped", result.wall_s, result.count("done"),
                 result.count("skipped"), result.count("failed"),
                 sum(o.status == "done" for o in result.compares),
                 sum(o.status == "skipped" for o in result.compares))
    return result


def _run(manifest: Manifest, opts: BatchOptions, out: Path, progress: Any,
         t0: float) -> BatchResult:
    hashes = _config_hashes(opts.measure_config)
    rows = manifest.rows
    tasks = [ScanTask(row=r, out_dir=out / r.subject_id / r.timepoint,
                      measure_config=opts.measure_config, config_hashes=hashes,
                      model=opts.model, device=opts.device) for r in rows]
    needs_model = any(r.seg is None for r in rows)
    workers = opts.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks))) if not opts.scheduler else workers
    log.info("batch: %d scan(s) of %d subject(s) from %s -> %s (%s)", len(tasks),
             len(manifest.subjects()), manifest.path, out,
             f"scheduler {opts.scheduler}" if opts.scheduler else f"{workers} local worker(s)")
    pairs = {(b.subject_id, f.timepoint): (b, f) for b, f in manifest.pairs()}
    executor = (_Serial() if workers == 1 and not opts.scheduler
                else _Dask(workers, opts.scheduler, opts.retries, gpu=needs_model))
    scans: dict[tuple[str, str], Outcome] = {}
    compares: list[Outcome] = []
    if isinstance(progress, RichProgress):
        progress.start(len(tasks))
    try:
        for t in tasks:
            executor.submit(process_scan, t)
        for task, outcome in executor.results():
            if isinstance(task, ScanTask):
                outcome = _verify(task, outcome)
                scans[task.row.key] = outcome
                if progress is not None:
                    progress(outcome)
                for ct in _ready_compares(task.row, scans, pairs, out, hashes.get("compare")):
                    executor.submit(process_compare, ct)
            else:
                compares.append(outcome)
    finally:
        if isinstance(progress, RichProgress):
            progress.stop()
        executor.close()
    order = {r.key: i for i, r in enumerate(rows)}
    scan_list = sorted(scans.values(), key=lambda o: order[(o.subject_id, o.timepoint)])
    failures = [{"subject_id": b.subject_id, "timepoint": b.timepoint, "stage": "manifest",
                 "error": str(b)} for b in manifest.invalid]
    failures += [{"subject_id": o.subject_id, "timepoint": o.timepoint, "stage": o.stage,
                  "error": o.error} for o in scan_list + compares if o.status == "failed"]
    for o in scan_list + compares:
        for n in o.notes:
            log.warning("%s/%s: %s", o.subject_id, o.timepoint, n)
    return BatchResult(out=out, scans=scan_list, compares=compares, failures=failures,
                       wall_s=time.perf_counter() - t0)


def _ready_compares(row: ScanRow, scans: dict[tuple[str, str], Outcome],
                    pairs: dict[tuple[str, str], tuple[ScanRow, ScanRow]],
                    out: Path, config_hash: str | None) -> list[CompareTask]:
    """Comparisons whose two scans have both just become available."""
    ready = []
    for (sid, fu), (b, f) in pairs.items():
        if sid != row.subject_id or row.timepoint not in (b.timepoint, f.timepoint):
            continue
        ob, of = scans.get(b.key), scans.get(f.key)
        if ob is None or of is None or "failed" in (ob.status, of.status):
            continue
        ready.append(CompareTask(
            subject_id=sid, baseline=b.timepoint, followup=f.timepoint,
            baseline_dir=out / sid / b.timepoint, followup_dir=out / sid / f.timepoint,
            out_dir=out / sid / f"compare_{b.timepoint}_{f.timepoint}",
            force="done" in (ob.status, of.status), config_hash=config_hash))
    return ready
