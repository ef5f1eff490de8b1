"""Commands on trials: batch, the simulated trial demo, and sample sizes (power)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cartiq.cli.app import app, log
from cartiq.cli.options import DeviceOpt, MeasureConfigOpt, ModelOpt, NoProgressOpt, WorkersOpt

__all__ = ["batch", "demo_app", "power", "BatchProgress"]


class BatchProgress:
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
    workers: WorkersOpt = None,
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Existing Dask scheduler, e.g. tcp://host:8786."),
    device: DeviceOpt = "auto",
    model: ModelOpt = None,
    config: MeasureConfigOpt = None,
    skip_invalid: bool = typer.Option(False, "--skip-invalid",
                                      help="Run the valid rows; list the bad ones in failures.csv."),
    no_progress: NoProgressOpt = False,
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
    from cartiq.batch.batch import BatchOptions, run_batch

    opts = BatchOptions(out=out, workers=workers, scheduler=scheduler, device=device,
                        model=model, measure_config=config, skip_invalid=skip_invalid,
                        reports=report, include_qc_fail=include_qc_fail)
    result = run_batch(manifest, opts, progress=None if no_progress else BatchProgress())
    log.info("%d done, %d skipped (up to date), %d failed -> %s", result.count("done"),
             result.count("skipped"), result.count("failed"), out)
    return result.exit_code


demo_app = typer.Typer(help="Demonstrations on simulated data.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


class _DemoProgress:
    """Progress on stderr for ``cartiq demo trial``: phantoms written, then the batch's scans."""

    def __init__(self, scans: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]phantoms"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self._task = self._bar.add_task("phantoms", total=scans)
        self.batch = BatchProgress()

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
    workers: WorkersOpt = None,
    no_progress: NoProgressOpt = False,
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
