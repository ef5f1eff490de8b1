"""Command line interface: ``cartiq`` (also ``python -m cartiq``).

The CLI parses arguments, sets up logging and progress, calls the stages and turns
:class:`cartiq.errors.CartiqError` into one line on stderr with exit code 2.  Heavy
imports happen inside the commands so that ``cartiq --help`` is instant.  Commands live in
``scan`` (one scan or pair), ``model`` (training, model packages), ``trial`` (batch, demo,
power) and ``data`` (version, phantom, fetch); shared option types in ``options``.
"""

from __future__ import annotations

import logging
import sys

import click
import typer

# each command module adds its commands to the app, in this order in `cartiq --help`
from cartiq.cli import scan  # noqa: F401,I001
from cartiq.cli import model  # noqa: F401
from cartiq.cli import trial  # noqa: F401
from cartiq.cli import data  # noqa: F401
from cartiq.cli.app import app, setup_logging
from cartiq.errors import CartiqError

__all__ = ["app", "main", "setup_logging"]

EXIT_INPUT = 2


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
