"""Lay out the label-map folders of the default model's stage-2 training.

    python models/cartiq_unet2d_synth/training/prepare_maps.py OUT [--mirror ../shared/data] \
        [--fold mskt_right]

Writes ``OUT/train_labels`` (three real maps, linked from the sample cache, and two cartiq
phantoms) and ``OUT/val_labels`` (the fold's held-out map: ``mskt_right``, the shipped
model's fold, the mskt right-knee map; ``spl``, the SPL Knee Atlas, the only held-out map with
menisci that stage 1 never saw; ``mskt_t2_left``); then

    cartiq train --labels OUT/train_labels --val-labels OUT/val_labels \
        --config configs/train_2d_real4.yaml -o OUT/model --device cpu \
        --init models/cartiq_unet2d_synth          # or --resume, see the model card

The file names matter: ``configs/train_2d_real4.yaml`` picks each map's label mapping
and sampling weight by file-name glob.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MAPS = {"pymskt_dess_labels": "pymskt_dess_right_label.nrrd",
        "spl_knee_atlas_labels": "spl_knee_atlas_labels.nrrd",
        "mskt_t2_left_knee_labels": "mskt_t2_left_knee_label.nrrd",
        "mskt_right_knee_labels": "mskt_right_knee_example_label.nrrd"}
# fold -> held-out sample; stage 1 (0.1.0) saw only the pymskt map, so every fold but
# "pymskt_dess" can start from it (--init) and still never have seen its held-out knee
FOLDS = {"mskt_right": "mskt_right_knee_labels", "spl": "spl_knee_atlas_labels",
         "mskt_t2_left": "mskt_t2_left_knee_labels"}
PHANTOMS = [(1, "right", 2.2), (2, "left", 1.6)]  # seed, side, femoral cartilage mm


def main() -> None:
    from cartiq.data.fetch import fetch_sample
    from cartiq.data.phantom import PhantomSpec, make_phantom
    from cartiq.io.volume import write_volume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mirror", type=Path, default=None)
    ap.add_argument("--fold", choices=sorted(FOLDS), default="mskt_right")
    a = ap.parse_args()
    held = FOLDS[a.fold]
    train = {k: v for k, v in MAPS.items() if k != held}
    for sub, table in (("train_labels", train), ("val_labels", {held: MAPS[held]})):
        folder = a.out / sub
        folder.mkdir(parents=True, exist_ok=True)
        for sample, name in table.items():
            link = folder / name
            if not link.exists():
                link.symlink_to(fetch_sample(sample, mirror=a.mirror).resolve())
    for seed, side, th in PHANTOMS:
        ph = make_phantom(PhantomSpec(seed=seed, side=side, femoral_thickness_mm=th))
        write_volume(a.out / "train_labels" / f"phantom_{seed}_{side}.nii.gz",
                     ph.labels.array.astype(np.uint8), ph.labels.geometry)


if __name__ == "__main__":
    main()
