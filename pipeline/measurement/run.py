"""``cartiq run``: segment a scan with a model, optionally add intensity BMLs, then measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cartiq.errors import InputError
from cartiq.segmentation.segmenter import Segmenter, segment_file

__all__ = ["run_file"]


def run_file(image: Path, out_dir: Path, *, model: str | Path | None = None,
             device: str = "auto", amp: bool | None = None, side: str | None = None,
             series: str | None = None, echo: int | None = None, bml: str = "model",
             bml_config: Path | None = None, measure_config: Path | None = None,
             segmenter: Segmenter | None = None, side_override: bool = False):
    """Segment, optionally add intensity BMLs, then measure (``cartiq run``)."""
    from cartiq.measurement.measure import run_measure

    if bml not in ("model", "intensity", "both"):
        raise InputError(f"--bml must be model, intensity or both, not {bml!r}")
    seg_path, manifest = segment_file(image, out_dir, model=model, device=device, amp=amp,
                                      side=side, series=series, echo=echo,
                                      segmenter=segmenter, write_manifest_file=False,
                                      side_override=side_override)
    bml_info: dict[str, Any] = {"mode": bml}
    if bml != "model":
        from cartiq.segmentation.bml import apply_bml, load_bml_config
        from cartiq.config import resolved
        from cartiq.io.volume import read_volume, write_volume

        cfg = load_bml_config(bml_config)
        vol = read_volume(image, series=series, echo=echo)
        lab = read_volume(seg_path, kind="labels")
        new = apply_bml(lab.array.astype(np.uint8), vol.array, vol.geometry.spacing, bml, cfg)
        write_volume(seg_path, new, vol.geometry)
        bml_info["config"] = resolved(cfg)
    extra = {"stage": "run",
             "segmentation": {k: manifest.get(k) for k in ("model", "device", "amp", "structures",
                                                           "medial_lateral_check", "cleanup",
                                                           "timings_s")},
             "bml": bml_info,
             "warnings": manifest["warnings"]}
    return run_measure(image, seg_path, out_dir, side=side or manifest.get("side"),
                       side_source="flag" if side else (manifest.get("side_source") or "flag"),
                       side_override=side_override,
                       config_path=measure_config, series=series, echo=echo,
                       extra_manifest=extra, fresh=False)
