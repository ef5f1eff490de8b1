"""Command line interface: ``cartiq`` (also ``python -m pipeline``).

The CLI parses arguments, sets up logging and progress, calls the stages and turns
:class:`cartiq.errors.CartiqError` into one line on stderr with exit code 2.  Heavy
imports happen inside the commands so that ``cartiq --help`` is instant.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from cartiq.errors import CartiqError

__all__ = ["app", "main"]

log = logging.getLogger("cartiq")

app = typer.Typer(
    name="cartiq",
    help="Knee MRI cartilage quantification: thickness, defects, bone-marrow lesions, "
         "MOCART-like scoring and longitudinal change.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_INPUT = 2


def setup_logging(verbose: int = 0, quiet: bool = False, log_file: Path | None = None) -> None:
    """Log to stderr (rich) and optionally to a file; called once by the CLI."""
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    root = logging.getLogger("cartiq")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = RichHandler(console=Console(stderr=True), show_time=False, show_path=False,
                          markup=False, rich_tracebacks=False, level=level)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)
    root.propagate = False


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    setup_logging(verbose, quiet)


@app.command()
def version() -> None:
    """Print the cartiq version."""
    from cartiq._version import __version__

    typer.echo(__version__)


# ----------------------------------------------------------------------------- measure

SideOpt = typer.Option(None, "--side", help="Knee side, left|right (else header or anatomy).")
SideOverrideOpt = typer.Option(False, "--side-override", help="Keep the given side (--side or "
                               "the DICOM header) even when the anatomy says otherwise.")
LabelsOpt = typer.Option(None, "--labels", help="Label convention of --seg: cartiq (default), "
                         "oai_zib, spl_knee_atlas, pymskt_dess, or a mapping YAML file.")


@app.command()
def measure(
    image: Path = typer.Argument(..., help="Knee MRI: NIfTI, NRRD, MHA/MHD or a DICOM folder."),
    seg: Path = typer.Option(..., "--seg", help="Label map in the image's geometry."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    labels: Optional[str] = LabelsOpt,
    side: Optional[str] = SideOpt,
    config: Optional[Path] = typer.Option(None, "--config", help="Measurement config YAML."),
    series: Optional[str] = typer.Option(None, "--series", help="DICOM series number or description."),
    echo: Optional[int] = typer.Option(None, "--echo", help="DICOM echo number (default: first)."),
    dicom_out: bool = typer.Option(False, "--dicom-out", help="Also write DICOM SEG + SR "
                                   "(TID 1500) referencing the input series (DICOM input)."),
    side_override: bool = SideOverrideOpt,
) -> None:
    """Measure thickness, defects and bone-marrow lesions from an image and its label map."""
    from cartiq.measurement.measure import run_measure

    _check_side(side)
    result = run_measure(image, seg, out, labels=labels, side=side, config_path=config,
                         series=series, echo=echo, dicom_out=dicom_out,
                         side_override=side_override)
    log.info("results in %s", result.out_dir)
    typer.echo(str(result.out_dir))


def _check_side(side: str | None) -> None:
    if side is not None and side not in ("left", "right"):
        raise click.BadParameter("must be 'left' or 'right'", param_hint="--side")


# -- commands: segmentation (segment, run, train, models) --

ModelOpt = typer.Option(None, "--model", help="Model name (see `cartiq models list`) or a "
                        "package folder / TorchScript file / nnU-Net folder.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:N.")
AmpOpt = typer.Option(None, "--amp/--no-amp", help="Mixed precision (default: on with CUDA).")


@app.command()
def segment(
    image: Path = typer.Argument(..., help="Knee MRI: NIfTI, NRRD, MHA/MHD or a DICOM folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    amp: Optional[bool] = AmpOpt,
    side: Optional[str] = SideOpt,
    series: Optional[str] = typer.Option(None, "--series", help="DICOM series number or description."),
    echo: Optional[int] = typer.Option(None, "--echo", help="DICOM echo number (default: first)."),
    side_override: bool = SideOverrideOpt,
) -> None:
    """Segment bones, cartilage plates, menisci and BMLs into OUT/segmentation.nii.gz."""
    from cartiq.segmentation.segmenter import segment_file

    _check_side(side)
    path, _ = segment_file(image, out, model=model, device=device, amp=amp, side=side,
                           series=series, echo=echo, side_override=side_override)
    typer.echo(str(path))


@app.command("run")
def run_cmd(
    image: Path = typer.Argument(..., help="Knee MRI: NIfTI, NRRD, MHA/MHD or a DICOM folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    amp: Optional[bool] = AmpOpt,
    side: Optional[str] = SideOpt,
    bml: str = typer.Option("model", "--bml", help="BMLs from the model, an intensity "
                            "detector (fluid-sensitive scans), or both: model|intensity|both."),
    bml_config: Optional[Path] = typer.Option(None, "--bml-config", help="BML detector YAML."),
    config: Optional[Path] = typer.Option(None, "--config", help="Measurement config YAML."),
    series: Optional[str] = typer.Option(None, "--series", help="DICOM series number or description."),
    echo: Optional[int] = typer.Option(None, "--echo", help="DICOM echo number (default: first)."),
    side_override: bool = SideOverrideOpt,
) -> None:
    """Segment, then measure: the outputs of `cartiq measure` plus the segmentation."""
    from cartiq.measurement.run import run_file

    _check_side(side)
    if bml not in ("model", "intensity", "both"):
        raise click.BadParameter("must be model, intensity or both", param_hint="--bml")
    result = run_file(image, out, model=model, device=device, amp=amp, side=side,
                      side_override=side_override,
                      series=series, echo=echo, bml=bml, bml_config=bml_config,
                      measure_config=config)
    typer.echo(str(result.out_dir))


@app.command()
def train(
    labels: Path = typer.Option(..., "--labels", help="Folder of training label maps."),
    out: Path = typer.Option(..., "-o", "--out", help="New model package folder."),
    config: Path = typer.Option(..., "--config", help="Training YAML (configs/train_*.yaml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Real images (same file "
                                          "stems as the label maps): supervised training."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Held-out label maps "
                                              "for validation Dice."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from the weights of this "
                                        "model package (fine-tuning); ignored with --resume."),
    device: str = DeviceOpt,
) -> None:
    """Train a segmentation model (synthetic from label maps, or supervised with --images)."""
    from cartiq.segmentation.segmenter import select_device
    from cartiq.segmentation.train import train as run_train

    summary = run_train(labels, out, config_path=config, images_dir=images,
                        val_labels_dir=val_labels, resume=resume, device=select_device(device),
                        init_weights=init)
    typer.echo(f"{out}: {summary['epochs']} epochs, best mean validation Dice "
               f"{summary['best_mean_dice']:.3f}")


models_app = typer.Typer(help="Segmentation model packages.", no_args_is_help=True)
app.add_typer(models_app, name="models")


ModelsDirOpt = typer.Option(None, "--models-dir", help="Folder of registered model packages "
                            "(default: $CARTIQ_MODELS_DIR, else ~/.local/share/cartiq/models).")


@models_app.command("list")
def models_list(models_dir: Optional[Path] = ModelsDirOpt) -> None:
    """List model packages: shipped ones, then registered ones (`models add`/`fetch`)."""
    from cartiq.segmentation.models import DEFAULT_MODEL, list_models

    for m in list_models(models_dir):
        mark = " (default)" if m.name == DEFAULT_MODEL else ""
        typer.echo(f"{m.name}{mark}\t{m.version}\t{m.format}\t{m.description[:70]}")


@models_app.command("info")
def models_info(name: str = typer.Argument(..., help="Model name or package path."),
                models_dir: Optional[Path] = ModelsDirOpt) -> None:
    """Show a model's metadata (network, expected input, labels, sha256, card)."""
    import json

    from cartiq.segmentation.models import model_info

    info = model_info(name, models_dir)
    info.pop("training", None)
    typer.echo(json.dumps(info, indent=2))


@models_app.command("add")
def models_add(
    path: Path = typer.Argument(..., help="nnU-Net v2 results folder (a dataset's folder, a "
                                "<Trainer>__<Plans>__<configuration> folder, or above)."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the "
                                       "known model's name, else the dataset's)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Label-mapping YAML (or a "
                                         "configs/label_maps name) from dataset.json values "
                                         "to cartiq structures (default: by label name)."),
    configuration: Optional[str] = typer.Option(None, "--configuration", help="e.g. "
                                                "3d_fullres (default: the cascade if trained)."),
    folds: Optional[str] = typer.Option(None, "--folds", help="Comma-separated folds, e.g. "
                                        "0,1 (default: every fold_N, as nnU-Net does)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint file "
                                             "(default: checkpoint_final.pth)."),
    orientation: Optional[str] = typer.Option(None, "--orientation", help="Voxel storage of "
                                              "the training images as an ITK code, e.g. LPS "
                                              "or PIR (default: as stored)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="nnU-Net's test-time "
                                       "mirroring (default: on, as nnU-Net; up to 8x slower)."),
    models_dir: Optional[Path] = ModelsDirOpt,
    force: bool = typer.Option(False, "--force", help="Replace a package of that name."),
) -> None:
    """Register a local nnU-Net v2 model (single configuration or cascade) as a package."""
    from cartiq.segmentation.model_store import add_model

    fold_list = [f.strip() for f in folds.split(",") if f.strip()] if folds else None
    meta, out = add_model(path, name=name, labels=labels, configuration=configuration,
                          folds=fold_list, checkpoint=checkpoint, orientation=orientation,
                          tta=tta, models_dir=models_dir, force=force)
    typer.echo(f"{meta.name}\t{out}")


@models_app.command("fetch")
def models_fetch(
    name: str = typer.Argument(..., help="Known model (configs/known_models.yaml), e.g. "
                               "nnunet_knee."),
    from_dir: Optional[Path] = typer.Option(None, "--from-dir", help="Use files already "
                                            "downloaded (a copy of the hub repository) "
                                            "instead of the hub."),
    models_dir: Optional[Path] = ModelsDirOpt,
    force: bool = typer.Option(False, "--force", help="Fetch again over an installed copy."),
) -> None:
    """Download a known model from the Hugging Face hub and register it."""
    from cartiq.segmentation.model_store import fetch_model

    meta, out = fetch_model(name, models_dir=models_dir, from_dir=from_dir, force=force)
    typer.echo(f"{meta.name}\t{out}")


# -- commands: scoring (score) --


@app.command()
def score(
    scan_dir: Path = typer.Argument(..., help="Finished `cartiq measure`/`run` output folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (mocart.csv, mocart.json)."),
    sites: Optional[Path] = typer.Option(None, "--sites", help="Site mask in the scan's "
                                         "geometry, one integer label per repair site "
                                         "(default: the scan's detected defects)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Scoring config YAML "
                                          "(default configs/mocart2.yaml; configs/mocart1.yaml "
                                          "for the original MOCART)."),
) -> None:
    """MOCART 2.0-like score of every cartilage repair site, each item from a measurement."""
    from cartiq.scoring.mocart import run_score

    run = run_score(scan_dir, out, sites_path=sites, config_path=config)
    log.info("%d site(s) scored; results in %s", len(run.result.sites), run.out_dir)
    typer.echo(str(run.out_dir))

# -- commands: longitudinal (compare) --


@app.command()
def compare(
    baseline: Path = typer.Option(..., "--baseline", help="Finished measure/run output folder "
                                  "(or an image, with --baseline-seg)."),
    followup: Path = typer.Option(..., "--followup", help="Finished measure/run output folder "
                                  "(or an image, with --followup-seg)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
    baseline_seg: Optional[Path] = typer.Option(None, "--baseline-seg",
                                                help="Label map of the baseline image."),
    followup_seg: Optional[Path] = typer.Option(None, "--followup-seg",
                                                help="Label map of the follow-up image."),
    labels: Optional[str] = LabelsOpt,
    side: Optional[str] = SideOpt,
    sdc: Optional[Path] = typer.Option(None, "--sdc", help="Smallest-detectable-change YAML "
                                       "(default configs/sdc.yaml)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Compare even when "
                                        "the visits do not look like the same knee."),
) -> None:
    """Compare a follow-up scan with its baseline: change.csv, change maps, tracking."""
    from cartiq.longitudinal.compare import compare_inputs, compare_scans, load_compare_config

    _check_side(side)
    if (baseline_seg is None) != (followup_seg is None):
        raise click.BadParameter("give both --baseline-seg and --followup-seg, or neither",
                                 param_hint="--baseline-seg/--followup-seg")
    cfg = load_compare_config(sdc)
    if baseline_seg is not None:
        result = compare_inputs(baseline, baseline_seg, followup, followup_seg, out,
                                labels=labels, side=side, config=cfg,
                                allow_mismatch=allow_mismatch)
    else:
        result = compare_scans(baseline, followup, out, config=cfg, allow_mismatch=allow_mismatch)
    log.info("compare %s: results in %s", result.status, result.out_dir)
    typer.echo(str(result.out_dir))

# -- commands: batch (batch) --


class _BatchProgress:
    """Progress bar on stderr for ``cartiq batch``: scans done/failed/skipped and an ETA."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._bar = Progress(TextColumn("[bold]scans"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn())
        self._counts = {"done": 0, "failed": 0, "skipped": 0}
        self._task = None

    def _text(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self._counts.items())

    def start(self, total: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task("scans", total=total, counts=self._text())

    def __call__(self, outcome) -> None:
        self._counts[outcome.status] = self._counts.get(outcome.status, 0) + 1
        self._bar.update(self._task, advance=1, counts=self._text())

    def stop(self) -> None:
        self._bar.stop()


@app.command()
def batch(
    manifest: Path = typer.Argument(..., help="Manifest CSV: subject_id,timepoint,image[,seg,"
                                    "side,arm,kl_grade,visit_order,sites,labels]."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder of the batch."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Local worker processes (default: CPU count)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Existing Dask scheduler, e.g. tcp://host:8786."),
    device: str = typer.Option("auto", "--device", help="Segmentation device: auto|cpu|cuda|cuda:N."),
    model: Optional[str] = typer.Option(None, "--model", help="Segmentation model name or path."),
    config: Optional[Path] = typer.Option(None, "--config", help="Measurement config YAML."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid",
                                      help="Run the valid rows; list the bad ones in failures.csv."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    report: bool = typer.Option(True, "--report/--no-report",
                                help="Write each subject's report.html and OUT/cohort.html."),
    include_qc_fail: bool = typer.Option(False, "--include-qc-fail",
                                         help="Keep scans whose QC status is fail in the "
                                              "cohort tables (default: left out, listed in "
                                              "OUT/qc_excluded.csv)."),
) -> int:
    """Process a trial: every scan, every follow-up against its baseline, cohort tables.

    Exit code 0 when every scan succeeded, 3 when any failed (see OUT/failures.csv),
    2 for a bad manifest.  Re-running skips scans whose outputs are up to date.
    """
    import re

    from cartiq.batch.batch import BatchOptions, run_batch

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise click.BadParameter("must be auto, cpu, cuda or cuda:N", param_hint="--device")
    opts = BatchOptions(out=out, workers=workers, scheduler=scheduler, device=device,
                        model=model, measure_config=config, skip_invalid=skip_invalid,
                        reports=report, include_qc_fail=include_qc_fail)
    result = run_batch(manifest, opts, progress=None if no_progress else _BatchProgress())
    log.info("%d done, %d skipped (up to date), %d failed -> %s", result.count("done"),
             result.count("skipped"), result.count("failed"), out)
    return result.exit_code


# -- commands: reports --


@app.command()
def report(
    folder: Path = typer.Argument(..., help="Batch output folder (cohort.html + every subject's "
                                  "report.html), a subject folder, a compare output or a scan folder."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="HTML file (default: "
                                       "FOLDER/report.html, or FOLDER/cohort.html for a batch)."),
) -> None:
    """Self-contained HTML report(s): subject report.html and, for a batch, cohort.html."""
    from cartiq.errors import InputError
    from cartiq.report.cohort import write_cohort_report
    from cartiq.report.scan import write_subject_report

    if not folder.is_dir():
        raise InputError("not a folder", folder)
    if (folder / "cohort_summary.csv").is_file():  # a batch output folder
        for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
            if any((k / "manifest.json").is_file() for k in sub.iterdir() if k.is_dir()):
                write_subject_report(sub)
        result = write_cohort_report(folder, out=out)
    else:
        result = write_subject_report(folder, out=out)
    for e in result.errors:
        log.warning("report: %s", e)
    typer.echo(str(result.path))


@app.command()
def qc(
    scan_dir: Path = typer.Argument(..., help="Finished `cartiq measure`/`run` output folder."),
    residual: Optional[float] = typer.Option(None, "--registration-residual", help="Also check "
                                             "a longitudinal registration residual (mm)."),
    config: Optional[Path] = typer.Option(None, "--config", help="QC limits YAML (cartiq.measurement.qc.QCConfig)."),
) -> None:
    """QC flags of a scan folder and its qc.png (outlines on three planes, thickness maps)."""
    from cartiq.measurement.qc import write_qc

    result = write_qc(scan_dir, registration_residual_mm=residual, config=config)
    for f in result.flags:
        typer.echo(f"{f.severity}\t{f.code}\t{f.message}")
    for e in result.errors:
        log.warning("qc figure: %s", e)
    typer.echo(f"{result.status}\t{scan_dir / 'qc.png' if result.figure else 'no figure'}")


@app.command("dicom-out")
def dicom_out(
    scan_dir: Path = typer.Argument(..., help="Finished `cartiq measure`/`run` output folder "
                                    "whose input was a DICOM series."),
    source: Optional[Path] = typer.Option(None, "--source", help="Source DICOM folder "
                                          "(default: the input recorded in manifest.json)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default SCAN_DIR/dicom)."),
) -> None:
    """DICOM SEG of the segmentation and DICOM SR (TID 1500) of the measurements."""
    from cartiq.measurement.dicom_out import write_dicom_outputs

    result = write_dicom_outputs(scan_dir, source=source, out_dir=out)
    typer.echo(str(result.seg))
    typer.echo(str(result.sr))

# -- commands: sample data (phantom, fetch) --

@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Output folder (image.nii.gz, seg.nii.gz, truth.json)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (noise and bias field)."),
    orientation: str = typer.Option("oblique_sagittal", "--orientation",
                                    help="oblique_sagittal, sagittal, coronal or axial."),
    spacing: Optional[str] = typer.Option(None, "--spacing",
                                          help="Voxel size 'I,J,K' in mm (K = slice axis); "
                                               "default 0.45,0.45,1.0."),
    side: str = typer.Option("right", "--side", help="Knee side, left|right."),
    rotation: Optional[str] = typer.Option(None, "--rotation",
                                           help="Rigid motion of the knee: Euler x,y,z in deg."),
    translation: Optional[str] = typer.Option(None, "--translation",
                                              help="Rigid motion of the knee: x,y,z in mm."),
) -> None:
    """Write a synthetic knee phantom with analytic ground truth."""
    from cartiq.data.phantom import spec_from_options, make_phantom, write_phantom

    spec = spec_from_options(seed=seed, orientation=orientation, spacing=spacing, side=side,
                             rotation=rotation, translation=translation)
    paths = write_phantom(make_phantom(spec), out)
    log.info("phantom written to %s", out)
    typer.echo(str(paths["image"].parent))


@app.command()
def fetch(
    names: Optional[list[str]] = typer.Argument(
        None, help="Samples to fetch ('all' for every one); none: list the samples."),
    mirror: Optional[Path] = typer.Option(
        None, "--mirror", envvar="CARTIQ_DATA_MIRROR",
        help="Local folder laid out like shared/data to copy from instead of downloading "
             "(default: $CARTIQ_DATA_MIRROR)."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", envvar="CARTIQ_DATA_DIR",
        help="Sample cache folder (default: $CARTIQ_DATA_DIR, else pooch's OS cache, "
             "e.g. ~/.cache/cartiq/samples)."),
    progress: bool = typer.Option(True, "--progress/--no-progress",
                                  help="Show download progress bars."),
) -> None:
    """List the public knee-MRI samples, or fetch them and print their local paths."""
    from cartiq.data.fetch import fetch_sample, list_samples, sample_info

    if not names:
        for name in list_samples():
            s = sample_info(name)
            typer.echo(f"{name}\t{s.kind}, {len(s.files)} file(s)\t{s.license}")
        return
    wanted = list_samples() if "all" in names else names
    for name in wanted:
        sample_info(name)  # unknown names fail before anything is fetched
    for name in wanted:
        typer.echo(str(fetch_sample(name, mirror=mirror, cache_dir=cache, progress=progress)))


# -- commands: simulated trial and sample size (demo trial, power) --

demo_app = typer.Typer(help="Demonstrations on simulated data.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


class _DemoProgress:
    """Progress on stderr for ``cartiq demo trial``: phantoms written, then the batch's scans."""

    def __init__(self, scans: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]phantoms"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self._task = self._bar.add_task("phantoms", total=scans)
        self.batch = _BatchProgress()

    def phantom(self) -> None:
        if not self._bar.live.is_started:
            self._bar.start()
        self._bar.update(self._task, advance=1)
        if self._bar.tasks[0].finished:
            self._bar.stop()


@demo_app.command("trial")
def demo_trial(
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (phantoms, manifest.csv, "
                             "truth.csv, the batch's outputs, planted_vs_recovered.csv)."),
    subjects_per_group: int = typer.Option(8, "--subjects-per-group",
                                           help="Knees per arm x stage group (at least 2)."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the whole trial."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Batch worker processes (default: CPU count)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> int:
    """Simulated MSC trial (MSC vs placebo x early/late KL x baseline/12 months) through
    `cartiq batch`: planted vs recovered change, sample sizes, cohort.html."""
    from cartiq.demo import design_trial, run_demo_trial

    design_trial(subjects_per_group, seed)  # bad sizes: one line before anything starts
    progress = None if no_progress else _DemoProgress(8 * subjects_per_group)
    result = run_demo_trial(out, subjects_per_group, seed, workers=workers, progress=progress)
    typer.echo(str(result.table))
    return result.exit_code


@app.command()
def power(
    effect: Optional[float] = typer.Option(None, "--effect", help="Difference between the arms' "
                                           "mean changes to detect (default: the outcome's "
                                           "published effect)."),
    sd: float = typer.Option(..., "--sd", help="SD of the change between knees (same unit)."),
    outcome: Optional[str] = typer.Option(None, "--outcome", help="thickness, denuded_area, "
                                          "bml_volume, bml_area or mocart_total."),
    alpha: float = typer.Option(0.05, "--alpha", help="Two-sided significance level."),
    powers: list[float] = typer.Option([0.8, 0.9], "--power", help="Power(s) wanted."),
) -> None:
    """Knees per arm to detect an effect (two-sided two-sample t test, equal arms)."""
    from cartiq.errors import InputError
    from cartiq.power import check_outcome, power_rows

    unit = ""
    if outcome is not None:
        published = check_outcome(outcome)
        if effect is None:
            if published.unit == "%":
                raise InputError(f"the published {outcome} effect is relative "
                                 f"({published.value:g}% of baseline); give --effect in your unit")
            effect, unit = published.value, published.unit
    if effect is None:
        raise InputError("give --effect (or --outcome with a published effect)")
    for row in power_rows([(outcome or "effect", effect, sd, unit)], alpha, tuple(powers)):
        typer.echo("\t".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in row.items()))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 on success, 2 on bad input, 1 on an internal error.

    A write that fails (full disk, permission denied, file-size limit) is one line naming
    the file and exit 2, never a traceback: SIGXFSZ is ignored so that a write past
    ``ulimit -f`` fails with EFBIG instead of killing the process, and SIGTERM unwinds like
    Ctrl-C (temporary files removed, a batch's workers ended).
    """
    previous = _install_signal_handlers()
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False  # no traceback
    try:  # from a log file on a full disk
        _main(argv)
    finally:
        _restore_signal_handlers(previous)
        logging.raiseExceptions = raise_exceptions


def _main(argv: list[str] | None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False)
    except CartiqError as exc:
        logging.getLogger("cartiq").debug("error detail", exc_info=True)
        sys.stderr.write(f"cartiq: error: {exc}\n")
        sys.exit(EXIT_INPUT)
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        logging.getLogger("cartiq").debug("error detail", exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"cartiq: error: {where}cannot write ({exc.strerror or exc})\n")
        sys.exit(EXIT_INPUT)
    except (click.exceptions.Abort, typer.Abort):
        sys.stderr.write("cartiq: aborted\n")
        sys.exit(130)
    except (click.ClickException, typer.TyperException) as exc:
        show = getattr(exc, "show", None)
        if show is None:
            sys.stderr.write(f"cartiq: error: {exc}\n")
        else:
            show()
        sys.exit(EXIT_INPUT)
    sys.exit(rv if isinstance(rv, int) else 0)


def _write_errnos() -> frozenset[int]:
    import errno

    names = ("ENOSPC", "EDQUOT", "EFBIG", "EACCES", "EPERM", "EROFS")
    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))


_WRITE_ERRNOS = _write_errnos()


def _install_signal_handlers() -> dict[int, object]:
    """Ignore SIGXFSZ, turn SIGTERM into SystemExit; returns the handlers replaced."""
    import signal

    def terminated(signum, frame) -> None:
        raise SystemExit(128 + signum)

    wanted = {signal.SIGTERM: terminated}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {}
    for signum, handler in wanted.items():
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread (main() called from a thread)
            pass
    return previous


def _restore_signal_handlers(previous: dict[int, object]) -> None:
    import signal

    for signum, handler in previous.items():
        if handler is not None:
            signal.signal(signum, handler)
