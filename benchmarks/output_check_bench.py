"""Benchmark: what verifying the outputs costs (issue 14, output side).

Every output is flushed (fsync), read back and checked before it is renamed
(:func:`cartiq.io.verify.verify_written`), and ``manifest.json`` hashes every file of the
folder.  On a 384 x 384 x 160 grid (the pymskt DESS label map's) this script writes the two
volumes ``cartiq measure`` writes - a float32 thickness map (cartilage voxels only non-zero,
here a 2% shell) and a uint8 label map - and reports median CPU seconds of:

* the plain write (``SimpleITK.WriteImage``, zlib level 1, as ``write_volume`` does);
* the fsync + verification of each file (gzip read to its end, NIfTI extent);
* writing ``manifest.json`` (size + sha256 of every file of the folder).

Not a test: run it by hand,

    python benchmarks/output_check_bench.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from _common import median_cpu_seconds


def main() -> None:
    import SimpleITK as sitk

    from cartiq.io.outputs import write_manifest
    from cartiq.io.verify import verify_written

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    shape = (384, 384, 160)
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:shape[2], :shape[1], :shape[0]]
    r = np.sqrt(((x - 192) / 150.0) ** 2 + ((y - 192) / 150.0) ** 2 + ((z - 80) / 70.0) ** 2)
    shell = (r > 0.9) & (r < 0.93)
    thickness = np.where(shell, rng.uniform(0.5, 3.5, shell.shape), 0).astype(np.float32)
    labels = np.where(r < 0.9, 1, np.where(shell, 2, 0)).astype(np.uint8)
    print(f"grid {shape}, shell voxels {int(shell.sum())} ({shell.mean():.1%})")

    with tempfile.TemporaryDirectory(prefix="cartiq-outbench-") as tmp:
        folder = Path(tmp)
        rows = []
        for name, arr in (("thickness.nii.gz", thickness), ("segmentation.nii.gz", labels)):
            image = sitk.GetImageFromArray(arr)
            path = folder / name
            write = median_cpu_seconds(lambda: sitk.WriteImage(image, str(path), True, 1), args.repeats)

            def check() -> None:
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                verify_written(path, path)

            rows.append((name, path.stat().st_size, write, median_cpu_seconds(check, args.repeats)))
        write_manifest(folder, {})  # first call: provenance (git) cached
        listing = median_cpu_seconds(lambda: write_manifest(folder, {}), args.repeats)

    print(f"{'file':22s} {'bytes':>10s} {'write CPU s':>12s} {'verify CPU s':>13s} {'ratio':>7s}")
    for name, size, write, check in rows:
        print(f"{name:22s} {size:10d} {write:12.3f} {check:13.3f} {check / write:7.1%}")
    print(f"manifest.json (size + sha256 of both, written verified): {listing:.3f} CPU s")
    total = sum(r[3] for r in rows) + listing
    print(f"verification + listing in all: {total:.3f} CPU s")


if __name__ == "__main__":
    main()
