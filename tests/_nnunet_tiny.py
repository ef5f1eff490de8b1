"""Build a tiny but real nnU-Net v2 cascade results folder for the tests (no real weights).

Run as a script in its own process (nnU-Net's training API reads ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment, so they are set only in
that child process)::

    python tests/_nnunet_tiny.py --out RESULTS [--iters 2]

Produces, through nnU-Net's own fingerprint extractor, ResEnc-M planner, preprocessor and the
stock ``nnUNetTrainer`` (attributes changed on the instance, so its name stays the standard
one), the layout of the public ``nnunet_knee`` model::

    RESULTS/Dataset999_TinyKnee/nnUNetTrainer__nnUNetResEncUNetMPlans__3d_lowres/
        dataset.json plans.json dataset_fingerprint.json fold_0/checkpoint_{final,best}.pth
    RESULTS/Dataset999_TinyKnee/nnUNetTrainer__nnUNetResEncUNetMPlans__3d_cascade_fullres/...

The planner never adds a low-res stage for images this small, so the plans are shrunk and a
``3d_lowres`` -> ``3d_cascade_fullres`` pair is written by hand, as nnU-Net's planner would.
After one nnU-Net training iteration per stage, each network is fitted for a few dozen plain
full-image steps (no augmentation) so that it really finds the phantom's femur and tibia,
and saved with nnU-Net's own checkpointing.  Labels are those of ``nnunet_knee`` (0
background, 1 patellar cartilage ... 9 patella).  The tests use the committed copy in
``tests/data/nnunet_tiny`` (building takes from about a minute to ten on a busy 2-core
machine).  ``phantom()`` is also imported by the tests: the same synthetic knee, any seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

DATASET_ID = 999
DATASET = f"Dataset{DATASET_ID:03d}_TinyKnee"
LABELS = {"background": 0, "patellar cartilage": 1, "femoral cartilage": 2,
          "medial tibial cartilage": 3, "lateral tibial cartilage": 4, "medial meniscus": 5,
          "lateral meniscus": 6, "femur": 7, "tibia": 8, "patella": 9}
SHAPE = (32, 48, 48)          # index axes i, j, k (cartiq / SimpleITK size order)
SPACING = (1.6, 1.0, 1.0)     # i is the coarse axis (like sagittal DESS slices)
ORIENTATION = "LPS"           # training images: identity direction (i -> L, j -> P, k -> S)
_INTENSITY = {0: 0.1, 1: 1.0, 2: 1.0, 3: 0.9, 4: 0.9, 5: 0.25, 6: 0.25, 7: 0.5, 8: 0.55, 9: 0.45}


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels uint8), index order (i, j, k), identity direction (LPS).

    A right knee: lateral compartment toward patient right (low i), patella anterior (low
    j), femur superior (high k).
    """
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8)
    kc = SHAPE[2] // 2 + int(rng.integers(-2, 3))
    dj = int(rng.integers(-2, 3))
    j0, j1 = 12 + dj, 40 + dj
    lab[2:30, j0:j1, : kc - 4] = 8                       # tibia
    lab[17:29, j0 + 2:j1 - 2, kc - 4:kc - 1] = 3         # medial tibial cartilage
    lab[3:15, j0 + 2:j1 - 2, kc - 4:kc - 1] = 4          # lateral tibial cartilage
    lab[17:29, j1 - 8:j1 - 2, kc - 1:kc + 1] = 5         # medial meniscus (posterior)
    lab[3:15, j1 - 8:j1 - 2, kc - 1:kc + 1] = 6          # lateral meniscus
    lab[2:30, j0:j1, kc + 1:kc + 4] = 2                  # femoral cartilage
    lab[2:30, j0:j1, kc + 4:] = 7                        # femur
    lab[8:24, j0 - 4:j0 - 2, kc + 8:kc + 16] = 1         # patellar cartilage
    lab[8:24, max(0, j0 - 9):j0 - 4, kc + 8:kc + 16] = 9  # patella
    img = np.vectorize(_INTENSITY.get, otypes=[np.float32])(lab)
    img += rng.normal(0, 0.05, SHAPE).astype(np.float32)
    return (img * 1000).astype(np.float32), lab


def _write_raw(root: str, n_cases: int) -> None:
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import save_json

    ds = os.path.join(root, DATASET)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(ds, sub), exist_ok=True)
    for case in range(n_cases):
        img, lab = phantom(case)
        for arr, rel in ((img, f"imagesTr/knee_{case:03d}_0000.nii.gz"),
                         (lab, f"labelsTr/knee_{case:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr.transpose(2, 1, 0))   # SimpleITK arrays are (k, j, i)
            im.SetSpacing(SPACING)
            sitk.WriteImage(im, os.path.join(ds, rel))
    save_json({"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": n_cases,
               "file_ending": ".nii.gz", "name": "TinyKnee",
               "description": "synthetic knee phantom for cartiq's tests"},
              os.path.join(ds, "dataset.json"), sort_keys=False)


def _shrink_plans(path: str) -> None:
    """Tiny 3d_fullres network; a hand-made 3d_lowres -> 3d_cascade_fullres pair."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    plans = load_json(path)
    cfgs = plans["configurations"]
    full = cfgs["3d_fullres"]
    ak = full["architecture"]["arch_kwargs"]
    ak.update(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage_decoder=[1, 1])
    for key in ("n_blocks_per_stage", "n_conv_per_stage"):
        if key in ak:
            ak[key] = [1, 1, 1]
    full.update(patch_size=[32, 32, 32], batch_size=2, batch_dice=True)
    cfgs["3d_lowres"] = {
        "inherits_from": "3d_fullres",
        "data_identifier": plans["plans_name"] + "_3d_lowres",
        "spacing": [s * 2 for s in full["spacing"]],
        "median_image_size_in_voxels": [round(m / 2) for m in full["median_image_size_in_voxels"]],
        "patch_size": [16, 24, 24], "batch_dice": False, "next_stage": "3d_cascade_fullres"}
    cfgs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    cfgs.pop("2d", None)
    save_json(plans, path, sort_keys=False)


def _fit(t, steps: int) -> None:
    """Fit the trainer's network on the whole preprocessed cases (no augmentation) so the
    tiny model really segments the phantom, then save it with nnU-Net's own checkpointing.
    A cascade stage sees the true labels one-hot as its previous stage (as nnU-Net feeds it)."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    torch.manual_seed(0)
    ds, _ = t.get_tr_and_val_datasets()
    xs, ys = [], []
    for key in sorted(ds.identifiers):
        data, seg = (np.asarray(a) for a in ds.load_case(key)[:2])
        x = torch.from_numpy(data.astype(np.float32))
        if t.is_cascaded:
            onehot = convert_labelmap_to_one_hot(np.clip(seg[0], 0, None),
                                                 t.label_manager.foreground_labels, np.float32)
            x = torch.cat([x, torch.as_tensor(onehot)])
        xs.append(x)
        ys.append(torch.from_numpy(seg[0].astype(np.int64)))
    shape = np.max([x.shape[1:] for x in xs], axis=0)
    shape = [int(-(-s // 4) * 4) for s in shape]  # two stride-2 stages

    def pad(a: torch.Tensor, value: float) -> torch.Tensor:
        d = [s - n for s, n in zip(shape, a.shape[-3:])]
        return F.pad(a, (0, d[2], 0, d[1], 0, d[0]), value=value)

    x = torch.stack([pad(a, 0.0) for a in xs])
    y = torch.stack([pad(a, -1) for a in ys])
    net = t.network
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        out = net(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = F.cross_entropy(out, y, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    sys.stdout.write(f"{t.configuration_name}: fitted {steps} steps, loss {float(loss):.3f}\n")
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        t.save_checkpoint(os.path.join(t.output_folder, name))


def _train(config: str, plans_id: str, iters: int, validate: bool, fit_steps: int) -> None:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(DATASET, config, 0, "nnUNetTrainer", plans_id,
                              device=torch.device("cpu"))
    t.num_epochs = 1
    t.num_iterations_per_epoch = iters
    t.num_val_iterations_per_epoch = 1
    t.run_training()
    if fit_steps:
        _fit(t, fit_steps)
    if validate:  # writes predicted_next_stage/, the cascade stage's training input
        t.perform_actual_validation(False)


def _prune(results: str) -> None:
    """Keep what inference needs (plans, dataset.json, checkpoints)."""
    ds = os.path.join(results, DATASET)
    for model in os.listdir(ds):
        mdir = os.path.join(ds, model)
        for entry in os.listdir(mdir):
            p = os.path.join(mdir, entry)
            if entry.startswith("fold_") and os.path.isdir(p):
                for f in os.listdir(p):
                    if not f.startswith("checkpoint_"):
                        fp = os.path.join(p, f)
                        shutil.rmtree(fp) if os.path.isdir(fp) else os.remove(fp)
            elif entry not in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def build(out: str, iters: int = 1, n_cases: int = 4, fit_steps: int = 80) -> str:
    """Build the cascade under ``out`` (this process's environment is changed: run it alone)."""
    out = os.path.abspath(out)
    work = tempfile.mkdtemp(prefix="tiny_nnunet_")
    os.environ.update(nnUNet_raw=os.path.join(work, "raw"),
                      nnUNet_preprocessed=os.path.join(work, "pre"), nnUNet_results=out,
                      nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="false")
    import torch

    torch.set_num_threads(2)
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor)
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (  # noqa: E501
        nnUNetPlannerResEncM)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)

    class _FewSamples(DatasetFingerprintExtractor):  # stock 10e7 samples: seconds and 1.5 GB
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.num_foreground_voxels_for_intensitystats = 1e5

    _write_raw(os.environ["nnUNet_raw"], n_cases)
    extract_fingerprint_dataset(DATASET_ID, _FewSamples, num_processes=1,
                                check_dataset_integrity=False, clean=True, verbose=False,
                                show_progress_bar=False)
    _, plans_id = plan_experiment_dataset(DATASET_ID, nnUNetPlannerResEncM)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], DATASET)
    _shrink_plans(os.path.join(pre, plans_id + ".json"))
    preprocess_dataset(DATASET_ID, plans_id, configurations=("3d_lowres", "3d_fullres"),
                       num_processes=(1, 1), show_progress_bar=False)
    ids = [f"knee_{c:03d}" for c in range(n_cases)]
    save_json([{"train": ids, "val": ids}], os.path.join(pre, "splits_final.json"))
    os.environ["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation (0 breaks planning)
    _train("3d_lowres", plans_id, iters, validate=True, fit_steps=fit_steps)
    _train("3d_cascade_fullres", plans_id, iters, validate=False, fit_steps=fit_steps)
    _prune(out)
    shutil.rmtree(work, ignore_errors=True)
    return os.path.join(out, DATASET)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=1, help="nnU-Net training iterations")
    ap.add_argument("--fit-steps", type=int, default=80, help="plain full-image steps after")
    args = ap.parse_args()
    t0 = time.time()
    path = build(args.out, args.iters, fit_steps=args.fit_steps)
    sys.stdout.write(f"{path} built in {time.time() - t0:.1f} s\n")
