"""Commands on one scan or one pair of scans: measure, segment, run, score, compare, qc,
dicom-out, report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cartiq.cli.app import app, log
from cartiq.cli.options import (AmpOpt, BmlSource, DeviceOpt, EchoOpt, ImageArg, LabelsOpt,
                                MeasureConfigOpt, ModelOpt, OutOpt, ScanDirArg, SeriesOpt,
                                SideOpt, SideOverrideOpt, value)

__all__ = ["measure", "segment", "run_cmd", "score", "compare", "report", "qc", "dicom_out"]


@app.command()
def measure(
    image: ImageArg,
    seg: Path = typer.Option(..., "--seg", help="Label map in the image's geometry."),
    out: OutOpt = ...,
    labels: LabelsOpt = None,
    side: SideOpt = None,
    config: MeasureConfigOpt = None,
    series: SeriesOpt = None,
    echo: EchoOpt = None,
    dicom_out: bool = typer.Option(False, "--dicom-out", help="Also write DICOM SEG + SR "
                                   "(TID 1500) referencing the input series (DICOM input)."),
    side_override: SideOverrideOpt = False,
) -> None:
    """Measure thickness, defects and bone-marrow lesions from an image and its label map."""
    from cartiq.measurement.measure import run_measure

    result = run_measure(image, seg, out, labels=labels, side=value(side), config_path=config,
                         series=series, echo=echo, dicom_out=dicom_out,
                         side_override=side_override)
    log.info("results in %s", result.out_dir)
    typer.echo(str(result.out_dir))


@app.command()
def segment(
    image: ImageArg,
    out: OutOpt = ...,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    side: SideOpt = None,
    series: SeriesOpt = None,
    echo: EchoOpt = None,
    side_override: SideOverrideOpt = False,
) -> None:
    """Segment bones, cartilage plates, menisci and BMLs into OUT/segmentation.nii.gz."""
    from cartiq.segmentation.segmenter import segment_file

    path, _ = segment_file(image, out, model=model, device=device, amp=amp, side=value(side),
                           series=series, echo=echo, side_override=side_override)
    typer.echo(str(path))


@app.command("run")
def run_cmd(
    image: ImageArg,
    out: OutOpt = ...,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    side: SideOpt = None,
    bml: BmlSource = typer.Option(BmlSource.model, "--bml", help="BMLs from the model, an "
                                  "intensity detector (fluid-sensitive scans), or both."),
    bml_config: Optional[Path] = typer.Option(None, "--bml-config", help="BML detector YAML."),
    config: MeasureConfigOpt = None,
    series: SeriesOpt = None,
    echo: EchoOpt = None,
    side_override: SideOverrideOpt = False,
) -> None:
    """Segment, then measure: the outputs of `cartiq measure` plus the segmentation."""
    from cartiq.measurement.run import run_file

    result = run_file(image, out, model=model, device=device, amp=amp, side=value(side),
                      side_override=side_override, series=series, echo=echo,
                      bml=value(bml), bml_config=bml_config, measure_config=config)
    typer.echo(str(result.out_dir))


@app.command()
def score(
    scan_dir: ScanDirArg,
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


@app.command()
def compare(
    baseline: Path = typer.Option(..., "--baseline", help="Finished measure/run output folder "
                                  "(or an image, with --baseline-seg)."),
    followup: Path = typer.Option(..., "--followup", help="Finished measure/run output folder "
                                  "(or an image, with --followup-seg)."),
    out: OutOpt = ...,
    baseline_seg: Optional[Path] = typer.Option(None, "--baseline-seg",
                                                help="Label map of the baseline image."),
    followup_seg: Optional[Path] = typer.Option(None, "--followup-seg",
                                                help="Label map of the follow-up image."),
    labels: LabelsOpt = None,
    side: SideOpt = None,
    side_override: SideOverrideOpt = False,
    sdc: Optional[Path] = typer.Option(None, "--sdc", help="Smallest-detectable-change YAML "
                                       "(default configs/sdc.yaml)."),
    allow_mismatch: bool = typer.Option(False, "--allow-mismatch", help="Compare even when "
                                        "the visits do not look like the same knee."),
) -> None:
    """Compare a follow-up scan with its baseline: change.csv, change maps, tracking."""
    from cartiq.longitudinal.compare import compare_inputs, compare_scans, load_compare_config

    if (baseline_seg is None) != (followup_seg is None):
        raise typer.BadParameter("give both --baseline-seg and --followup-seg, or neither",
                                 param_hint="--baseline-seg/--followup-seg")
    if side_override and baseline_seg is None:
        raise typer.BadParameter("applies when measuring images with --baseline-seg/--followup-seg; "
                                 "finished folders keep the side they were measured with",
                                 param_hint="--side-override")
    cfg = load_compare_config(sdc)
    if baseline_seg is not None:
        result = compare_inputs(baseline, baseline_seg, followup, followup_seg, out,
                                labels=labels, side=value(side), config=cfg,
                                allow_mismatch=allow_mismatch, side_override=side_override)
    else:
        result = compare_scans(baseline, followup, out, config=cfg, allow_mismatch=allow_mismatch)
    log.info("compare %s: results in %s", result.status, result.out_dir)
    typer.echo(str(result.out_dir))


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
    scan_dir: ScanDirArg,
    residual: Optional[float] = typer.Option(None, "--registration-residual", help="Also check "
                                             "a longitudinal registration residual (mm)."),
    config: Optional[Path] = typer.Option(None, "--config", help="QC limits YAML (cartiq.measurement.qc.QCConfig)."),
) -> None:
    """QC a finished scan folder again: flags, qc.png, and the status in manifest.json and
    measurements.csv (outlines on three planes, thickness maps)."""
    from cartiq.measurement.qc import recheck_qc

    result = recheck_qc(scan_dir, registration_residual_mm=residual, config=config)
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
