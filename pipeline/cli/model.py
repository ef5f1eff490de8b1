"""Commands on segmentation models: train, and the `models` group (list, info, add, fetch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cartiq.cli.app import app
from cartiq.cli.options import DeviceOpt, ModelsDirOpt

__all__ = ["train", "models_app"]


@app.command()
def train(
    labels: Path = typer.Option(..., "--labels", help="Folder of training label maps."),
    out: Path = typer.Option(..., "-o", "--out", help="New model package folder."),
    config: Path = typer.Option(..., "--config", help="Training YAML (configs/train_*.yaml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Real images (same file "
                                          "stems as the label maps): supervised training."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels", help="Held-out label maps "
                                              "for validation Dice."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from the weights of this "
                                        "model package (fine-tuning); ignored with --resume."),
    device: DeviceOpt = "auto",
) -> None:
    """Train a segmentation model (synthetic from label maps, or supervised with --images)."""
    from cartiq.segmentation.segmenter import select_device
    from cartiq.segmentation.train import train as run_train

    summary = run_train(labels, out, config_path=config, images_dir=images,
                        val_labels_dir=val_labels, resume=resume, device=select_device(device),
                        init_weights=init)
    typer.echo(f"{out}: {summary['epochs']} epochs, best mean validation Dice "
               f"{summary['best_mean_dice']:.3f}")


models_app = typer.Typer(help="Segmentation model packages.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(models_dir: ModelsDirOpt = None) -> None:
    """List model packages: shipped ones, then registered ones (`models add`/`fetch`)."""
    from cartiq.segmentation.models import DEFAULT_MODEL, list_models

    for m in list_models(models_dir):
        mark = " (default)" if m.name == DEFAULT_MODEL else ""
        typer.echo(f"{m.name}{mark}\t{m.version}\t{m.format}\t{m.description[:70]}")


@models_app.command("info")
def models_info(name: str = typer.Argument(..., help="Model name or package path."),
                models_dir: ModelsDirOpt = None) -> None:
    """Show a model's metadata (network, expected input, labels, sha256, card)."""
    from cartiq.segmentation.models import model_info

    info = model_info(name, models_dir)
    info.pop("training", None)
    typer.echo(json.dumps(info, indent=2))


@models_app.command("add")
def models_add(
    path: Path = typer.Argument(..., help="nnU-Net v2 results folder (a dataset's folder, a "
                                "<Trainer>__<Plans>__<configuration> folder, or above)."),
    name: Optional[str] = typer.Option(None, "--name", help="Registry name (default: the "
                                       "known model's name, else the dataset's)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Label-mapping YAML (or a "
                                         "configs/label_maps name) from dataset.json values "
                                         "to cartiq structures (default: by label name)."),
    configuration: Optional[str] = typer.Option(None, "--configuration", help="e.g. "
                                                "3d_fullres (default: the cascade if trained)."),
    folds: Optional[str] = typer.Option(None, "--folds", help="Comma-separated folds, e.g. "
                                        "0,1 (default: every fold_N, as nnU-Net does)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint file "
                                             "(default: checkpoint_final.pth)."),
    orientation: Optional[str] = typer.Option(None, "--orientation", help="Voxel storage of "
                                              "the training images as an ITK code, e.g. LPS "
                                              "or PIR (default: as stored)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="nnU-Net's test-time "
                                       "mirroring (default: on, as nnU-Net; up to 8x slower)."),
    models_dir: ModelsDirOpt = None,
    force: bool = typer.Option(False, "--force", help="Replace a package of that name."),
) -> None:
    """Register a local nnU-Net v2 model (single configuration or cascade) as a package."""
    from cartiq.segmentation.model_store import add_model

    fold_list = [f.strip() for f in folds.split(",") if f.strip()] if folds else None
    meta, out = add_model(path, name=name, labels=labels, configuration=configuration,
                          folds=fold_list, checkpoint=checkpoint, orientation=orientation,
                          tta=tta, models_dir=models_dir, force=force)
    typer.echo(f"{meta.name}\t{out}")


@models_app.command("fetch")
def models_fetch(
    name: str = typer.Argument(..., help="Known model (configs/known_models.yaml), e.g. "
                               "nnunet_knee."),
    from_dir: Optional[Path] = typer.Option(None, "--from-dir", help="Use files already "
                                            "downloaded (a copy of the hub repository) "
                                            "instead of the hub."),
    models_dir: ModelsDirOpt = None,
    force: bool = typer.Option(False, "--force", help="Fetch again over an installed copy."),
) -> None:
    """Download a known model from the Hugging Face hub and register it."""
    from cartiq.segmentation.model_store import fetch_model

    meta, out = fetch_model(name, models_dir=models_dir, from_dir=from_dir, force=force)
    typer.echo(f"{meta.name}\t{out}")
