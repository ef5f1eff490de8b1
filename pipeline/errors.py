"""Exception tree of cartiq.

Every error a user can cause derives from :class:`CartiqError`; the CLI turns it into one
line on stderr and exit code 2.  Messages name the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CartiqError", "InputError", "ConfigError", "ModelError", "OutputError", "one_line"]


class CartiqError(Exception):
    """Base class of the errors a user can act on."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class InputError(CartiqError):
    """An input file or folder is missing, unreadable, or not what the stage needs."""


class ConfigError(CartiqError):
    """A configuration or label-mapping file is invalid."""


class ModelError(CartiqError):
    """A segmentation model is missing, corrupt, or incompatible with the input."""


class OutputError(CartiqError):
    """The output location cannot be written."""


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``exc`` as one line for a table or log: cartiq errors as they are, others prefixed
    with their type (``ValueError: ...``), whitespace collapsed, at most ``limit`` characters."""
    prefix = "" if isinstance(exc, CartiqError) else f"{type(exc).__name__}: "
    return (prefix + (" ".join(str(exc).split()) or type(exc).__name__))[:limit]
