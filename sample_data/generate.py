"""Write the cartiq knee phantom (image, label map, ground truth) into a folder.

Usage::

    python sample_data/generate.py OUTDIR [--seed N]

Writes ``OUTDIR/image.nii.gz``, ``OUTDIR/seg.nii.gz`` and ``OUTDIR/truth.json`` with the
default :class:`cartiq.data.phantom.PhantomSpec` (oblique sagittal, 0.45 x 0.45 x 1.0 mm, right
knee).  ``cartiq phantom`` offers more options (orientation, spacing, side, rigid motion).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cartiq.errors import CartiqError
from cartiq.data.phantom import PhantomSpec, make_phantom, write_phantom

log = logging.getLogger("sample_data.generate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the cartiq knee phantom.")
    parser.add_argument("outdir", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = write_phantom(make_phantom(PhantomSpec(seed=args.seed)), args.outdir)
    except CartiqError as exc:
        log.error("generate.py: error: %s", exc)
        return 2
    for key, path in paths.items():
        log.info("%s: %s", key, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
