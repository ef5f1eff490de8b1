"""The Typer application, its logging set-up and the global options."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

__all__ = ["app", "setup_logging", "log"]

log = logging.getLogger("cartiq")

app = typer.Typer(
    name="cartiq",
    help="Knee MRI cartilage quantification: thickness, defects, bone-marrow lesions, "
         "MOCART-like scoring and longitudinal change.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
