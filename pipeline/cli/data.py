"""Commands on data: the version, knee phantoms and the public real samples."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cartiq.cli.app import app, log
from cartiq.cli.options import Orientation, Side, value

__all__ = ["version", "phantom", "fetch"]


@app.command()
def version() -> None:
    """Print the cartiq version."""
    from cartiq._version import __version__

    typer.echo(__version__)


@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Output folder (image.nii.gz, seg.nii.gz, truth.json)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (noise and bias field)."),
    orientation: Orientation = typer.Option(Orientation.oblique_sagittal, "--orientation",
                                            help="Storage orientation of the volumes."),
    spacing: Optional[str] = typer.Option(None, "--spacing",
                                          help="Voxel size 'I,J,K' in mm (K = slice axis); "
                                               "default 0.45,0.45,1.0."),
    side: Side = typer.Option(Side.right, "--side", help="Knee side."),
    rotation: Optional[str] = typer.Option(None, "--rotation",
                                           help="Rigid motion of the knee: Euler x,y,z in deg."),
    translation: Optional[str] = typer.Option(None, "--translation",
                                              help="Rigid motion of the knee: x,y,z in mm."),
) -> None:
    """Write a synthetic knee phantom with analytic ground truth."""
    from cartiq.data.phantom import spec_from_options, make_phantom, write_phantom

    spec = spec_from_options(seed=seed, orientation=value(orientation), spacing=spacing,
                             side=value(side),
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
