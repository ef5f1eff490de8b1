"""The ``qc.png`` review figure of a scan (flags in :mod:`cartiq.measurement.qc`).

One row per cartilage plate: the label outlines over the image on three planes through the
plate and its 2D thickness map (drawing helpers in :mod:`cartiq.measurement.qc_maps`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cartiq.io.labels import PLATES, default_scheme, plate_boxes
from cartiq.io.volume import Geometry, Volume, atomic_write_bytes
from cartiq.measurement.qc_maps import PlateMap, draw_plate_map, draw_slice, plate_views

__all__ = ["qc_figure", "lesions_for", "image_on_grid"]


def image_on_grid(image: Volume | None, labels: np.ndarray) -> np.ndarray | None:
    """The image's array when it is on the labels' grid (the figure and the QC checks that
    read the image need that), else None."""
    if image is None or image.array.shape != labels.shape:
        return None
    return image.array


def qc_figure(path: Path, labels: np.ndarray, geometry: Geometry, image: Volume | None,
              maps: dict[str, PlateMap], defects: list[dict], lesions: list[dict],
              flags: list[Any], side: str | None, cfg: Any, title: str,
              save: Callable[[Path, bytes], Any] | None = None,
              boxes: dict[str, tuple[slice, ...] | None] | None = None) -> Path:
    """Draw ``qc.png`` (see :mod:`cartiq.measurement.qc`): a header with the status and the
    first flags, then per plate three planes and the thickness map.  ``flags``:
    :class:`cartiq.measurement.qc.QCFlag`; ``cfg``: its ``QCConfig`` (dpi, colour bar).
    The PNG is drawn in memory and stored by ``save(path, data)`` (default: an atomic,
    verified write now; ``cartiq measure`` hands it to its background writer).  ``boxes``:
    :func:`cartiq.io.labels.plate_boxes` of ``labels``, if known."""
    png = _draw(labels, geometry, image, maps, defects, lesions, flags, side, cfg, title,
                boxes or plate_boxes(labels))
    (save or atomic_write_bytes)(path, png)
    return path


def _draw(labels: np.ndarray, geometry: Geometry, image: Volume | None,
          maps: dict[str, PlateMap], defects: list[dict], lesions: list[dict],
          flags: list[Any], side: str | None, cfg: Any, title: str,
          boxes: dict[str, tuple[slice, ...] | None]) -> bytes:
    """The figure of :func:`qc_figure` as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scheme = default_scheme()
    img = image_on_grid(image, labels)
    views = plate_views(geometry)
    fig = Figure(figsize=(16, 3.6 * len(PLATES) + 1.2))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(PLATES), 4, left=0.03, right=0.97, top=1 - 1.3 / fig.get_figheight(),
                            bottom=0.02, hspace=0.25, wspace=0.12)
    status = "PASS" if not flags else ("FAIL" if any(f.severity == "error" for f in flags) else "WARN")
    head = f"cartiq QC - {title} - side {side or '?'} - {status}"
    lines = [f"[{f.severity}] {f.message}" for f in flags[:5]]
    if len(flags) > 5:
        lines.append(f"... and {len(flags) - 5} more flags (manifest.json)")
    fig.text(0.03, 1 - 0.25 / fig.get_figheight(), head, fontsize=14, weight="bold", va="top")
    fig.text(0.03, 1 - 0.6 / fig.get_figheight(), "\n".join(lines) or "no QC flags",
             fontsize=8.5, va="top", color="#b00" if flags else "#060")
    for row, name in enumerate(PLATES):
        box = boxes[name]
        axes = [fig.add_subplot(grid[row, c]) for c in range(4)]
        if box is None:
            for ax in axes:
                ax.set_axis_off()
            axes[0].text(0.5, 0.5, f"{name}: absent", ha="center", va="center",
                         transform=axes[0].transAxes, fontsize=12, color="#b00")
            continue
        # the plate's mask, made on its bounding box (the rest of the volume is False)
        mask = np.zeros(labels.shape, dtype=bool)
        mask[box] = labels[box] == scheme[name]
        # per axis, the slice holding most of the plate (the femur's centroid is in the notch)
        sub = mask[box]
        centre = np.array([b.start + int(np.argmax(sub.sum(axis=tuple(x for x in range(3) if x != a))))
                           for a, b in enumerate(box)])
        for ax, view in zip(axes[:3], views):
            draw_slice(ax, img, labels, geometry, view, centre, mask, name)
        marks = [d for d in defects if d.get("plate") == name]
        bml = [l for l in lesions if l.get("bone") == scheme.plates[name]]
        if name in maps:
            draw_plate_map(fig, axes[3], maps[name], vmax=cfg.map_vmax_mm, side=side,
                           defects=marks, lesions=lesions_for(name, bml, maps),
                           label="thickness (mm)")
        else:
            axes[3].set_axis_off()
            axes[3].text(0.5, 0.5, "no thickness map", ha="center", va="center",
                         transform=axes[3].transAxes, color="#777")
    buf = io.BytesIO()
    # zlib level 1: the same pixels, a file about 8% larger, encoded several times faster
    fig.savefig(buf, dpi=cfg.figure_dpi, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def lesions_for(name: str, lesions: list[dict], maps: dict[str, PlateMap]) -> list[dict]:
    """Tibial lesions go to the nearer tibial plate (left-right), others to their plate."""
    if "tibial" not in name:
        return lesions
    other = "lateral_tibial_cartilage" if name.startswith("medial") else "medial_tibial_cartilage"
    if other not in maps:
        return lesions
    mine, theirs = maps[name].centre_world[0], maps[other].centre_world[0]
    return [l for l in lesions if abs(l["xyz"][0] - mine) <= abs(l["xyz"][0] - theirs)]
