"""Shared option types of the ``cartiq`` commands: choices as enums (Typer lists and checks
them), and each repeated option defined once as an ``Annotated`` type."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["Side", "BmlSource", "Orientation", "ImageArg", "ScanDirArg", "OutOpt", "SideOpt",
           "SideOverrideOpt", "LabelsOpt", "SeriesOpt", "EchoOpt", "ModelOpt", "DeviceOpt",
           "AmpOpt", "MeasureConfigOpt", "ModelsDirOpt", "WorkersOpt", "NoProgressOpt",
           "value"]


class Side(str, Enum):
    """Knee side."""

    left = "left"
    right = "right"


class BmlSource(str, Enum):
    """Where ``cartiq run`` takes bone-marrow lesions from."""

    model = "model"
    intensity = "intensity"
    both = "both"


class Orientation(str, Enum):
    """Storage orientation of a phantom."""

    oblique_sagittal = "oblique_sagittal"
    sagittal = "sagittal"
    coronal = "coronal"
    axial = "axial"


def value(choice: Enum | None) -> str | None:
    """The plain string of an enum choice (stages and manifests take strings)."""
    return None if choice is None else str(choice.value)


def _device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise typer.BadParameter("must be auto, cpu, cuda or cuda:N")
    return device


ImageArg = Annotated[Path, typer.Argument(
    help="Knee MRI: NIfTI, NRRD, MHA/MHD or a DICOM folder.")]
ScanDirArg = Annotated[Path, typer.Argument(
    help="Finished `cartiq measure`/`run` output folder.")]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Output folder.")]
SideOpt = Annotated[Optional[Side], typer.Option(
    "--side", help="Knee side (else the DICOM header or the anatomy).")]
SideOverrideOpt = Annotated[bool, typer.Option(
    "--side-override", help="Keep the given side (--side or the DICOM header) even when the "
                            "anatomy says otherwise.")]
LabelsOpt = Annotated[Optional[str], typer.Option(
    "--labels", help="Label convention of the label map: cartiq (default), oai_zib, "
                     "spl_knee_atlas, pymskt_dess, nnunet_knee, or a mapping YAML file.")]
SeriesOpt = Annotated[Optional[str], typer.Option(
    "--series", help="DICOM series number or description.")]
EchoOpt = Annotated[Optional[int], typer.Option(
    "--echo", min=1, help="DICOM echo number (default: first).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Model name (see `cartiq models list`) or a package folder / TorchScript "
                    "file / nnU-Net results folder.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_device, help="auto (CUDA if present), cpu, cuda or cuda:N.")]
AmpOpt = Annotated[Optional[bool], typer.Option(
    "--amp/--no-amp", help="Mixed precision (default: on with CUDA).")]
MeasureConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="Measurement config YAML (default configs/measure.yaml).")]
ModelsDirOpt = Annotated[Optional[Path], typer.Option(
    "--models-dir", help="Folder of registered model packages (default: $CARTIQ_MODELS_DIR, "
                         "else ~/.local/share/cartiq/models).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, help="Local worker processes (default: CPU count).")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]
