"""Label scheme (``configs/labels.yaml``) and mappings from other conventions.

This module is the one place that knows label numbers; it imports no torch or SimpleITK.

Tibial split (schemes with one tibial-cartilage label, e.g. OAI-ZIB)
--------------------------------------------------------------------
1. The knee side is taken from ``--side``, else the DICOM header (Laterality), else the
   anatomy (the fibula lies lateral to the tibia; else the femur's shape); a given side
   that the anatomy contradicts stops the run unless ``--side-override`` (see
   :mod:`cartiq.io.side`).
2. The tibial cartilage is split by a sagittal plane (constant patient left-right
   coordinate).  When its two largest 3D connected components each hold at least 20% of
   its voxels (the usual case: two separate plates), the plane lies midway between their
   left-right centroids.  Otherwise (plates joined across the tibial spines, as a network's
   prediction often is) the plane is anchored on the femoral intercondylar notch: per 1 mm
   left-right bin the femur's most distal point is found, and the notch is the highest of
   these in the middle half of the femur's width (it must lie at least 5 mm above the
   lower condyle); the plane is at the sparsest 1 mm of tibial cartilage within 6 mm of the
   notch.  Without a usable femur it lies at the sparsest left-right position in the
   middle 60% of the cartilage.  On the four real label maps the notch lies in the gap
   between the plates or within 1 mm of it.
3. The half on the fibula's side (for a right knee: patient right, -x in LPS) is lateral.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cartiq._resources import CONFIGS, resource_dir
from cartiq.errors import ConfigError, InputError
from cartiq.io.side import anatomy_evidence, decide_side

__all__ = [
    "CONFIG_DIR",
    "LabelScheme",
    "LabelMapping",
    "RENDER_TISSUES",
    "default_scheme",
    "load_mapping",
    "available_mappings",
    "to_default_scheme",
    "infer_side",
    "lateral_sign",
    "label_counts",
    "plate_boxes",
    "PLATES",
    "BONES",
]

CONFIG_DIR = resource_dir(CONFIGS)

# names that a mapping may use besides the scheme's own
_EXTRA_TARGETS = {"tibial_cartilage", "fibula", "background", "ignore"}
#: Unmeasured tissues a label map may name (``tissues:`` in a mapping) so that the training
#: renderer (:mod:`cartiq.segmentation.synth`) draws them as themselves rather than as random
#: background; for measurement they are background like every unmapped label.
RENDER_TISSUES = ("fat", "muscle", "ligament", "vessel")


@dataclass(frozen=True)
class LabelScheme:
    name: str
    labels: dict[str, int]
    plates: dict[str, str]  # plate -> bone
    bones: tuple[str, ...]

    def __getitem__(self, name: str) -> int:
        return self.labels[name]

    def name_of(self, value: int) -> str:
        for k, v in self.labels.items():
            if v == value:
                return k
        raise KeyError(value)

    @property
    def values(self) -> set[int]:
        return set(self.labels.values())


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError("file does not exist", path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML ({str(exc).splitlines()[0]})", path) from None


@lru_cache(maxsize=1)
def default_scheme() -> LabelScheme:
    path = CONFIG_DIR / "labels.yaml"
    data = _read_yaml(path)
    try:
        return LabelScheme(name=str(data["name"]),
                           labels={str(k): int(v) for k, v in data["labels"].items()},
                           plates={str(k): str(v) for k, v in data["plates"].items()},
                           bones=tuple(data["bones"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed label scheme ({exc})", path) from None


PLATES = ("femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage",
          "patellar_cartilage")
BONES = ("femur", "tibia", "patella")


@dataclass(frozen=True)
class LabelMapping:
    """How another label convention maps onto the cartiq scheme."""

    name: str
    description: str
    map: dict[int, str] = field(default_factory=dict)
    unmapped: str = "error"  # or "background"
    source: Path | None = None
    tissues: dict[int, str] = field(default_factory=dict)  # value -> one of RENDER_TISSUES


def available_mappings() -> list[str]:
    return sorted(["cartiq"] + [p.stem for p in (CONFIG_DIR / "label_maps").glob("*.yaml")])


def load_mapping(name_or_path: str | Path | None) -> LabelMapping:
    """Load a mapping by name (``oai_zib``, ``spl_knee_atlas``, ``pymskt_dess``) or YAML path."""
    scheme = default_scheme()
    if name_or_path in (None, "", "cartiq", "default"):
        return LabelMapping(name="cartiq", description="cartiq default scheme",
                            map={v: k for k, v in scheme.labels.items() if v != 0})
    candidate = Path(str(name_or_path))
    if candidate.suffix.lower() in (".yaml", ".yml") or candidate.exists():
        path = candidate
    else:
        path = CONFIG_DIR / "label_maps" / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown label mapping {str(name_or_path)!r}; known: "
                              + ", ".join(available_mappings()))
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("map"), dict):
        raise ConfigError("label mapping needs a 'map' of label value -> structure name", path)
    valid = set(scheme.labels) | _EXTRA_TARGETS
    mapping: dict[int, str] = {}
    for key, target in data["map"].items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"label value {key!r} is not an integer", path) from None
        if str(target) not in valid:
            raise ConfigError(f"label {value} maps to unknown structure {target!r}; valid: "
                              + ", ".join(sorted(valid)), path)
        mapping[value] = str(target)
    unmapped = str(data.get("unmapped", "error"))
    if unmapped not in ("error", "background"):
        raise ConfigError("'unmapped' must be 'error' or 'background'", path)
    return LabelMapping(name=str(data.get("name", path.stem)),
                        description=str(data.get("description", "")), map=mapping,
                        unmapped=unmapped, source=path,
                        tissues=_read_tissues(data.get("tissues"), mapping, path))


def _read_tissues(data: Any, mapping: dict[int, str], path: Path) -> dict[int, str]:
    """``tissues: {fat: [9], muscle: [12, 13]}`` -> {9: "fat", 12: "muscle", 13: "muscle"}."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("'tissues' must map a tissue name to a list of label values", path)
    out: dict[int, str] = {}
    for tissue, values in data.items():
        if tissue not in RENDER_TISSUES:
            raise ConfigError(f"unknown tissue {tissue!r} under 'tissues'; valid: "
                              + ", ".join(RENDER_TISSUES), path)
        if not isinstance(values, list):
            raise ConfigError(f"tissue {tissue!r} needs a list of label values", path)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"tissue {tissue!r}: label value {v!r} is not an integer", path)
            if v in mapping or v in out:
                raise ConfigError(f"label {v} is listed twice (under 'map' or 'tissues')", path)
            out[v] = str(tissue)
    return out


# ------------------------------------------------------------------- side and frame


def label_counts(array: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label value, as ``np.bincount(array.ravel(), minlength)``, counted a
    block of slices at a time: a whole-volume ``bincount`` first copies every voxel into a
    64-bit index (8 bytes a voxel), which costs more than the counting."""
    counts = np.zeros(minlength, dtype=np.intp)
    step = max(1, (1 << 20) // max(1, array[:1].size))
    for i in range(0, len(array), step):
        block = np.bincount(array[i:i + step].ravel(), minlength=len(counts))
        if len(block) > len(counts):
            counts = np.pad(counts, (0, len(block) - len(counts)))
        counts += block
    return counts


def plate_boxes(labels: np.ndarray) -> dict[str, tuple[slice, ...] | None]:
    """Bounding box (index slices) of each cartilage plate of a label map in the cartiq
    scheme, None for an absent plate: one pass over the volume, after which a plate's mask
    is made on its box only."""
    from scipy import ndimage

    scheme = default_scheme()
    boxes = ndimage.find_objects(labels, max_label=max(scheme[p] for p in PLATES))
    return {p: boxes[scheme[p] - 1] if scheme[p] <= len(boxes) else None for p in PLATES}


def lateral_sign(side: str) -> float:
    """Sign of the LPS x axis that points laterally: right knee -> -1, left knee -> +1."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return -1.0 if side == "right" else 1.0


def infer_side(labels: np.ndarray, affine: np.ndarray, *, side: str | None = None,
               header_side: str | None = None, fibula: np.ndarray | None = None,
               path: Path | None = None, side_source: str = "flag",
               override: bool = False) -> tuple[str, str]:
    """Knee side and how it was decided (see :mod:`cartiq.io.side`).

    A given side that the anatomy contradicts is an :class:`InputError` unless
    ``override``; no side at all is an :class:`InputError` too.
    """
    evidence = anatomy_evidence(labels, affine, default_scheme().labels, fibula=fibula)
    found, how, _ = decide_side(evidence, side=side, side_source=side_source,
                                header_side=header_side, override=override, path=path)
    if found is None:
        raise InputError(_NO_SIDE, path)
    return found, how


_NO_SIDE = ("cannot tell the knee side (no header laterality, no fibula, no medial/lateral "
            "labels, no clear femur shape); pass --side left|right")


def femoral_notch_x(femur: np.ndarray, affine: np.ndarray) -> float | None:
    """Patient left-right coordinate (LPS x, mm) of the femoral intercondylar notch.

    Per 1 mm x bin the femur's most distal point (lowest z) is found; the notch is the
    highest of these within the middle half of the femur's width, and must lie at least
    5 mm above the lower condyle (else None: no clear notch).
    """
    idx = np.argwhere(femur)
    if len(idx) < 1000:
        return None
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    x, z = w[:, 0], w[:, 2]
    lo = float(x.min())
    b = np.floor(x - lo).astype(int)
    zmin = np.full(int(b.max()) + 1, np.inf)
    np.minimum.at(zmin, b, z)
    centers = lo + np.arange(len(zmin)) + 0.5
    ok = np.isfinite(zmin)
    centers, zmin = centers[ok], zmin[ok]
    n = len(zmin)
    if n < 20:
        return None
    a, e = n // 4, (3 * n) // 4 + 1
    i = a + int(np.argmax(zmin[a:e]))
    if zmin[i] - min(zmin[:i].min(), zmin[i + 1:].min()) < 5.0:
        return None
    return float(centers[i])


def _split_tibial(tib: np.ndarray, affine: np.ndarray, side: str,
                  femur: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Split one tibial-cartilage mask into (medial, lateral) masks and say how (module
    docstring): ``"two plates"``, ``"femoral notch"`` or ``"sparsest plane"``."""
    import cc3d

    idx = np.argwhere(tib)
    x = idx @ affine[0, :3] + affine[0, 3]
    comps = cc3d.connected_components(tib.astype(np.uint8), connectivity=26)
    counts = np.bincount(comps[tib])
    counts[0] = 0
    order = np.argsort(counts)[::-1]
    two_plates = len(order) > 2 and counts[order[1]] >= 0.2 * tib.sum()
    # the notch only when the plates are joined (0.3 s on a 0.36 mm femur)
    notch = None if two_plates or femur is None else femoral_notch_x(femur, affine)
    if two_plates:
        comp_of = comps[tib]
        x1 = x[comp_of == order[0]].mean()
        x2 = x[comp_of == order[1]].mean()
        split, how = 0.5 * (x1 + x2), "two plates"
    elif notch is not None:
        edges = notch + np.arange(-6.0, 6.5, 1.0)
        hist, _ = np.histogram(x, bins=edges)
        centers = 0.5 * (edges[:-1] + edges[1:])
        # the sparsest bin; ties go to the bin nearest the notch
        best = np.flatnonzero(hist == hist.min())
        split = float(centers[best[np.argmin(np.abs(centers[best] - notch))]])
        how = "femoral notch"
    else:
        lo, hi = np.quantile(x, [0.2, 0.8])
        hist, edges = np.histogram(x, bins=60, range=(lo, hi))
        i = int(np.argmin(hist))
        split, how = 0.5 * (edges[i] + edges[i + 1]), "sparsest plane"
    lateral_is_plus = lateral_sign(side) > 0
    lat_sel = (x > split) if lateral_is_plus else (x < split)
    lat = np.zeros_like(tib)
    med = np.zeros_like(tib)
    lat[tuple(idx[lat_sel].T)] = True
    med[tuple(idx[~lat_sel].T)] = True
    return med, lat, how


def to_default_scheme(array: np.ndarray, mapping: LabelMapping, affine: np.ndarray, *,
                      side: str | None = None, header_side: str | None = None,
                      path: Path | None = None, side_source: str = "flag",
                      side_override: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Convert a label array to the cartiq scheme.

    Returns the converted ``uint8`` array and a dict with the side, how it was decided
    (``side_source``), the side check for the manifest (``side_check``) and which labels
    were dropped.  Unknown label values raise :class:`InputError` unless the mapping says
    ``unmapped: background``; so does a given ``side`` (from ``side_source``: flag,
    manifest) or ``header_side`` that the anatomy contradicts, unless ``side_override``
    (see :mod:`cartiq.io.side`).
    """
    scheme = default_scheme()
    # the label values present (np.unique sorts the whole volume; counting is one pass)
    present = np.flatnonzero(label_counts(array)) if array.dtype.kind == "u" else np.unique(array)
    present = present[present != 0]
    unknown = sorted(int(v) for v in present if int(v) not in mapping.map)
    if unknown and mapping.unmapped == "error":
        hint = "" if mapping.name != "cartiq" else " (use --labels to name its convention)"
        raise InputError(f"unknown label values {unknown[:12]} for label scheme "
                         f"'{mapping.name}'{hint}", path)
    lut = np.zeros(int(max(present.max(initial=0), max(mapping.map, default=0))) + 1, np.uint8)
    tibial_values, fibula_values = [], []
    for value, target in mapping.map.items():
        if target in scheme.labels:
            lut[value] = scheme[target]
        elif target == "tibial_cartilage":
            tibial_values.append(value)
        elif target == "fibula":
            fibula_values.append(value)
    out = lut[array]
    fibula = None
    if fibula_values:  # np.isin(array, fibula_values), by a table lookup (one pass)
        is_fibula = np.zeros(len(lut), dtype=bool)
        is_fibula[fibula_values] = True
        fibula = is_fibula[array]
    info: dict[str, Any] = {"mapping": mapping.name, "dropped_labels": unknown}
    needs_side = bool(set(tibial_values) & {int(v) for v in present})
    evidence = anatomy_evidence(out, affine, scheme.labels, fibula=fibula)
    found_side, how, record = decide_side(evidence, side=side, side_source=side_source,
                                          header_side=header_side, override=side_override,
                                          path=path)
    if needs_side and found_side is None:
        raise InputError(_NO_SIDE, path)
    info.update(side=found_side, side_source=how, side_check=record)
    if needs_side:
        tib = np.isin(array, tibial_values)
        med, lat, how = _split_tibial(tib, affine, found_side, out == scheme["femur"])
        out[med] = scheme["medial_tibial_cartilage"]
        out[lat] = scheme["lateral_tibial_cartilage"]
        info["tibial_split"] = how
    return out, info
