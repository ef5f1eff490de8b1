"""The Python API: one function per stage, typed results, writing folders kept separate.

Everything here works on paths or on in-memory :class:`~cartiq.io.volume.Volume` objects
(an array in ITK index order plus its :class:`~cartiq.io.volume.Geometry`), and returns
results whose tables are pandas DataFrames in the columns of the output CSV files.
``result.save(out_dir)`` writes the same folder as the command line (the CLI calls the
same stage functions).  Errors are :mod:`cartiq.errors` exceptions whose text is the line
the CLI prints.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError

__all__ = ["read_volume", "segment", "measure", "score", "compare", "run_batch",
           "ScanResult", "ChangeResult"]

PathLike = str | Path


def read_volume(path: PathLike, *, series: str | None = None, echo: int | None = None,
                kind: str = "image"):
    """Read a scan or label map (NIfTI, NRRD, MHA/MHD, DICOM folder) into a ``Volume``."""
    from cartiq.io.volume import read_volume as _read

    return _read(path, series=series, echo=echo, kind=kind)


def _volume(x: Any, what: str, kind: str):
    from cartiq.io.volume import Volume

    if isinstance(x, Volume):
        return x
    if isinstance(x, (str, Path)):
        return read_volume(x, kind=kind)
    if isinstance(x, np.ndarray):
        raise InputError(f"{what} is a bare array without geometry: pass a file path or a "
                         "cartiq Volume (array + Geometry with spacing, origin, direction)")
    raise InputError(f"{what} must be a file path or a cartiq Volume, not {type(x).__name__}")


def _measure_config(config: Any):
    from cartiq.config import MeasureConfig, load_config

    if config is None or isinstance(config, (str, Path)):
        return load_config(None if config is None else Path(config), MeasureConfig,
                           default_name="measure.yaml")
    if isinstance(config, MeasureConfig):
        return config
    raise InputError(f"config must be a YAML path or a MeasureConfig, not {type(config).__name__}")


# ----------------------------------------------------------------------------- results


@dataclass
class ScanResult:
    """One measured scan.

    ``measurements``, ``defects`` and ``lesions`` are the ``measurements.csv``,
    ``defects.csv`` and ``lesions.csv`` tables (``qc_status`` column included);
    ``qc_flags``/``qc_status`` the automatic QC; ``raw`` holds the per-vertex surfaces
    (:class:`cartiq.measurement.measure.MeasureResult`) that scoring and comparison reuse.
    """

    measurements: Any
    defects: Any
    lesions: Any
    side: str | None
    side_source: str
    image: Any
    labels: Any  # Volume in the cartiq scheme
    config: Any
    raw: Any
    qc_flags: list = field(default_factory=list)  # cartiq.measurement.qc.QCFlag
    folder: Path | None = None
    _inputs: Any = field(default=None, repr=False)
    _manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, out_dir: PathLike) -> Path:
        """Write the scan's output folder (tables, maps, meshes, QC, manifest last)."""
        from cartiq.measurement.outputs import write_results

        out = Path(out_dir)
        from cartiq.io.outputs import check_writable

        check_writable(out)
        self._manifest = write_results(out, self.raw, self._inputs, self.config,
                                       dict(self._manifest), t_start=time.perf_counter(),
                                       qc_flags=self.qc_flags)
        self.folder = out
        return out

    @property
    def qc_status(self) -> str:
        """``pass``, ``warn`` or ``fail`` (a ``fail`` scan's numbers are implausible)."""
        from cartiq.measurement.qc import QCResult

        return QCResult(flags=self.qc_flags).status


@dataclass
class ChangeResult:
    """Baseline vs follow-up: ``change`` in the ``change.csv`` columns, the defect and
    lesion tracking tables, the status (ok, partial) and the warnings."""

    change: Any
    defect_tracking: Any
    lesion_tracking: Any
    status: str
    warnings: list[str]
    manifest: dict[str, Any]
    _folder: Path = field(repr=False, default=Path())

    def save(self, out_dir: PathLike) -> Path:
        """Copy the comparison's folder (change maps, tables, registration) to ``out_dir``."""
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise InputError("output folder is not empty", out)
        shutil.copytree(self._folder, out, dirs_exist_ok=True)
        return out


def _frames(raw: Any):
    import pandas as pd

    from cartiq.measurement.outputs import (DEFECT_COLUMNS, LESION_COLUMNS,
                                            MEASUREMENT_COLUMNS, defect_rows, lesion_rows)

    return (pd.DataFrame(raw.rows, columns=MEASUREMENT_COLUMNS),
            pd.DataFrame(defect_rows(raw), columns=DEFECT_COLUMNS),
            pd.DataFrame(lesion_rows(raw), columns=LESION_COLUMNS))


# ----------------------------------------------------------------------------- stages


def segment(image: Any, *, model: PathLike | None = None, device: str = "auto",
            side: str | None = None, side_override: bool = False):
    """Segment a knee scan; returns the label map (cartiq scheme) as a ``Volume`` whose
    ``meta["segmentation"]`` records the model, device, side and warnings.

    A ``side`` that the predicted anatomy contradicts is an ``InputError`` unless
    ``side_override`` (as ``--side-override`` on the command line)."""
    from cartiq.io.volume import Volume
    from cartiq.segmentation.segmenter import Segmenter, select_device

    vol = _volume(image, "image", "image")
    res = Segmenter(model, device=select_device(device)).run(vol, side=side,
                                                             side_override=side_override)
    return Volume(res.labels, vol.geometry, None, {"segmentation": res.info})


def measure(image: Any, labels: Any, *, side: str | None = None, config: Any = None,
            label_map: str | None = None, side_override: bool = False) -> ScanResult:
    """Measure a scan from its label map.

    ``image``/``labels``: paths or ``Volume`` objects on the same grid; ``label_map``: the
    labels' convention (``oai_zib``, ``spl_knee_atlas``, ``pymskt_dess``, a YAML path;
    default cartiq); ``side``: left/right (else from the header or the anatomy; a side the
    anatomy contradicts is an ``InputError`` unless ``side_override``); ``config``: a
    measurement YAML path or a ``MeasureConfig``.
    """
    from cartiq.config import config_hash, resolved
    from cartiq.io.labels import load_mapping, to_default_scheme
    from cartiq.io.volume import Volume, check_same_geometry
    from cartiq.measurement.measure import measure_labels
    from cartiq.measurement.outputs import MeasureInputs
    from cartiq.measurement.qc import QCResult, qc_checks

    cfg = _measure_config(config)
    t0 = time.perf_counter()
    img = _volume(image, "image", "image")
    lab = _volume(labels, "labels", "labels")
    check_same_geometry(img.geometry, lab.geometry, img.path, lab.path)
    mapping = load_mapping(label_map)
    arr, info = to_default_scheme(lab.array, mapping, lab.geometry.affine, side=side,
                                  header_side=img.meta.get("side"), path=lab.path,
                                  side_override=side_override)
    inputs = MeasureInputs(image=img, seg=lab, labels=arr, side=info["side"],
                           side_source=info["side_source"], mapping_name=mapping.name)
    t1 = time.perf_counter()
    raw = measure_labels(arr, lab.geometry, side=info["side"], config=cfg)
    flags = qc_checks(arr, lab.geometry, side=info["side"], result=raw, image=img.array)
    m, d, les = _frames(raw)
    m["qc_status"] = QCResult(flags=flags).status  # a broken segmentation is marked here too
    manifest = {"stage": "measure", "inputs": inputs.describe(), "side": info["side"],
                "side_source": info["side_source"], "side_check": info.get("side_check", {}),
                "label_mapping": mapping.name,
                "config": resolved(cfg), "config_hash": config_hash(cfg),
                "timings_s": {"read": round(t1 - t0, 3),
                              "measure": round(time.perf_counter() - t1, 3)}}
    return ScanResult(measurements=m, defects=d, lesions=les, side=info["side"],
                      side_source=info["side_source"], image=img,
                      labels=Volume(arr, lab.geometry, lab.path, dict(lab.meta)), config=cfg,
                      raw=raw, qc_flags=flags, _inputs=inputs, _manifest=manifest)


def score(result: ScanResult, *, sites: Any = None, config: PathLike | None = None):
    """MOCART-like scores of repair sites (default: the scan's own defects); returns a
    :class:`cartiq.scoring.mocart.ScoreResult` (``.rows()`` = the ``mocart.csv`` rows)."""
    from cartiq.scoring.mocart import load_scoring_config, score_sites

    if isinstance(sites, (str, Path)):
        sites = read_volume(sites, kind="labels").array
    return score_sites(result.image, result.labels.array, sites,
                       config=load_scoring_config(config), scan_result=result.raw,
                       geometry=result.labels.geometry)


def compare(baseline: ScanResult, followup: ScanResult, *, sdc_config: PathLike | None = None,
            allow_mismatch: bool = False) -> ChangeResult:
    """Change from baseline to follow-up (bone-wise registration, change per plate and
    subregion, defect and lesion tracking).  The visits' measurements are reused, not
    repeated; visits not yet saved are written to a private temporary folder first."""
    import pandas as pd

    from cartiq.longitudinal.compare import compare_scans, load_compare_config

    work = Path(tempfile.mkdtemp(prefix="cartiq-compare-"))
    folders = []
    for name, r in (("baseline", baseline), ("followup", followup)):
        if r.folder is None or not (Path(r.folder) / "manifest.json").is_file():
            r.save(work / name)
        folders.append(r.folder)
    res = compare_scans(folders[0], folders[1], work / "change",
                        config=load_compare_config(sdc_config), allow_mismatch=allow_mismatch)

    def table(name: str) -> pd.DataFrame:
        p = res.out_dir / name
        return pd.read_csv(p) if p.is_file() else pd.DataFrame()

    return ChangeResult(change=table("change.csv"), defect_tracking=table("defect_tracking.csv"),
                        lesion_tracking=table("lesion_tracking.csv"), status=res.status,
                        warnings=list(res.warnings), manifest=res.manifest, _folder=res.out_dir)


def run_batch(manifest: PathLike, out_dir: PathLike, *, workers: int | None = None,
              scheduler: str | None = None, model: str | None = None, device: str = "auto",
              measure_config: PathLike | None = None, reports: bool = True,
              skip_invalid: bool = False):
    """Run a trial from its manifest CSV into ``out_dir`` (resumable); returns the
    :class:`cartiq.batch.batch.BatchResult` (outcomes and failures)."""
    from cartiq.batch.batch import BatchOptions
    from cartiq.batch.batch import run_batch as _run

    opts = BatchOptions(out=Path(out_dir), workers=workers, scheduler=scheduler, device=device,
                        model=model, reports=reports, skip_invalid=skip_invalid,
                        measure_config=None if measure_config is None else Path(measure_config))
    return _run(Path(manifest), opts)
