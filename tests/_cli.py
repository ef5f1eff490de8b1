"""Helpers of the tests that run the ``cartiq`` command in a subprocess."""

from __future__ import annotations

import subprocess
import sys


def run_cartiq(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m cartiq ARGS`` with stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "cartiq", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles) -> None:
    """Exit code 2 and exactly one stderr line, containing every needle."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]
