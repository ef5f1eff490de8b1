"""Print a phantom's measured numbers next to its analytic truth.

    python sample_data/check_truth.py TRUTH.json RESULT_DIR [RESULT_DIR ...]

RESULT_DIR is a `cartiq measure` or `cartiq run` output folder of the phantom's image.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    truth = json.loads(Path(argv[0]).read_text())
    results = []
    for folder in argv[1:]:
        with open(Path(folder) / "measurements.csv", newline="") as fh:
            results.append({(r["structure"], r["region"], r["metric"]): r["value"]
                            for r in csv.DictReader(fh)})
    names = [Path(f).name for f in argv[1:]]
    print(f"{'plate / metric':44s} {'truth':>9s} " + " ".join(f"{n:>12s}" for n in names))
    for plate, t in truth["plates"].items():
        for metric, key in (("thickness_mean", "thickness_mean_mm"), ("volume", "label_volume_mm3"),
                            ("denuded_area", "denuded_area_mm2")):
            vals = " ".join(f"{r.get((plate, 'all', metric), '') or 'n/a':>12.12s}" for r in results)
            print(f"{plate + ' ' + metric:44s} {t[key]:9.2f} {vals}")
    total = sum(l["volume_mm3"] for l in truth.get("lesions", []))
    vals = " ".join(f"{r.get(('bone_marrow_lesion', 'all', 'volume'), '') or 'n/a':>12.12s}" for r in results)
    print(f"{'bone_marrow_lesion volume':44s} {total:9.2f} {vals}")


if __name__ == "__main__":
    main(sys.argv[1:])
