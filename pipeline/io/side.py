"""Knee side (left/right) from the anatomy, and its check against a side that was given.

A wrong side silently swaps medial and lateral: every medial number becomes a lateral one.
So a side given on the command line (``--side``), in a batch manifest or in the DICOM header
is checked against the anatomy of the label map, and a disagreement stops the run unless
the user says ``--side-override``.

Evidence, strongest first (world coordinates LPS, +x = patient left; lateral is -x for a
right knee and +x for a left knee):

``anatomy:fibula``      the fibula lies lateral to the tibia (label maps with a fibula).
``anatomy:plates``      the lateral tibial-cartilage label lies lateral to the medial one
                        (label maps with both tibial plates).
``anatomy:bone shape``  two features of the distal femur that must agree: the femoral
                        shaft leans laterally above the condyles (the femur's valgus), and
                        the medial condyle reaches further distally than the lateral one.
                        Used only when both are clear (see the margins below), the
                        femoral shaft is in the field of view, and what is measured has a
                        femur's shape: the condyles' band at least ``MIN_CONDYLE_WIDTH_MM``
                        wide, the shaft's lean at most ``MAX_LEAN_DEG`` from the
                        long axis and the condyles' step at most ``MAX_CONDYLE_DROP_MM``.  A model's segmentation can add a false piece of "femur"
                        (on cartiq's phantom, a 10 mm wide piece beside the tibia made the
                        shaft "lean" 31 degrees); that is no evidence, not a side.

Each test needs a clear margin; a weak or contradictory feature is no evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cartiq.errors import InputError

__all__ = ["SideEvidence", "anatomy_evidence", "decide_side", "SIDE_SOURCES"]

SIDE_SOURCES = ("flag", "header", "manifest", "anatomy:fibula", "anatomy:plates",
                "anatomy:bone shape")

# fibula centroid this far lateral of the tibia's: the fibular head sits at the tibia's
# lateral edge (two real label maps: 28 and 31 mm; the default model on the real qDESS and
# MESE: 22 and 30 mm); a "fibula" predicted under the tibia's middle (0.6.0 on the cartiq
# phantom, which has none: 5 mm) is no evidence
FIBULA_MARGIN_MM = 12.0
PLATES_MARGIN_MM = 5.0     # lateral plate centroid this far lateral of the medial one
SHAFT_MARGIN_MM = 2.0      # femoral shaft this far lateral of the condyles
CONDYLE_MARGIN_MM = 1.5    # medial condyle this far below the lateral one
MIN_FEMUR_EXTENT_MM = 50.0  # femur height in view needed for the shaft test
# What a distal femur looks like (the four real label maps here: condyles' band 74-86 mm
# wide, shaft lean 4.4-9.2 degrees; the femoral anatomical axis is about 5-9 degrees valgus)
MIN_CONDYLE_WIDTH_MM = 50.0  # medial-lateral extent of the lowest 25 mm of the femur
MAX_LEAN_DEG = 15.0          # the shaft's lean from the image's long axis
MAX_CONDYLE_DROP_MM = 12.0   # medial condyle below the lateral one (real maps: 2.9-8.0 mm)


@dataclass(frozen=True)
class SideEvidence:
    side: str
    source: str  # one of the anatomy:* SIDE_SOURCES
    detail: str  # what was measured, for the message and the manifest


def _side_of_lateral_x(dx: float) -> str:
    """The side whose lateral direction is the sign of ``dx`` (LPS x)."""
    return "left" if dx > 0 else "right"


class _Masks:
    """Label masks cropped to their bounding boxes (one pass over the volume), so that
    centroids and point sets cost little on a 384 x 384 x 160 map."""

    def __init__(self, labels: np.ndarray, affine: np.ndarray) -> None:
        from scipy import ndimage

        self.labels, self.affine = labels, affine
        self.boxes = ndimage.find_objects(labels)

    def _crop(self, value: int | None, mask: np.ndarray | None):
        if mask is not None:
            from scipy import ndimage

            found = ndimage.find_objects(mask.view(np.uint8))
            box = found[0] if found else None
            return box, (None if box is None else mask[box])
        box = self.boxes[value - 1] if value is not None and 0 < value <= len(self.boxes) else None
        return box, (None if box is None else self.labels[box] == value)

    def points(self, value: int, stride: int = 1) -> np.ndarray:
        """World coordinates (N, 3) of the voxels of label ``value`` (every ``stride``-th
        voxel along each axis)."""
        box, sub = self._crop(value, None)
        if box is None:
            return np.zeros((0, 3))
        idx = np.argwhere(sub[::stride, ::stride, ::stride]) * stride
        idx += np.array([b.start for b in box])
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def centroid_x(self, value: int | None = None, mask: np.ndarray | None = None) -> float:
        """Patient left-right (LPS x) centroid of label ``value`` (or ``mask``) in mm, from
        the crop's axis projections (no voxel list)."""
        box, sub = self._crop(value, mask)
        if box is None:
            return float("nan")
        sub8 = sub.view(np.uint8)
        n = int(sub8.sum(dtype=np.int64))
        if n == 0:
            return float("nan")
        mean = np.array([
            (np.arange(sub.shape[a]) * sub8.sum(axis=tuple(b for b in range(3) if b != a),
                                                dtype=np.int64)).sum() / n + box[a].start
            for a in range(3)])
        return float(self.affine[0, :3] @ mean + self.affine[0, 3])

    def count(self, value: int) -> int:
        box, sub = self._crop(value, None)
        return 0 if box is None else int(np.count_nonzero(sub))


def _fibula(masks: _Masks, fibula: np.ndarray | None, tibia: int) -> SideEvidence | None:
    if fibula is None or not fibula.any():
        return None
    dx = masks.centroid_x(mask=fibula) - masks.centroid_x(tibia)
    if not np.isfinite(dx) or abs(dx) < FIBULA_MARGIN_MM:
        return None
    side = _side_of_lateral_x(dx)
    return SideEvidence(side, "anatomy:fibula",
                        f"the fibula lies {abs(dx):.0f} mm to the patient's {side} of the "
                        f"tibia")


def _plates(masks: _Masks, med: int, lat: int) -> SideEvidence | None:
    dx = masks.centroid_x(lat) - masks.centroid_x(med)
    if not np.isfinite(dx) or abs(dx) < PLATES_MARGIN_MM:
        return None
    side = _side_of_lateral_x(dx)
    return SideEvidence(side, "anatomy:plates",
                        f"the lateral tibial plate lies {abs(dx):.0f} mm to the patient's "
                        f"{side} of the medial one")


def _bone_shape(masks: _Masks, femur: int) -> SideEvidence | None:
    """Femoral valgus and the lower medial condyle (both must agree, see module doc)."""
    n = masks.count(femur)
    if n < 1000:
        return None
    pts = masks.points(femur, stride=2 if n > 400_000 else 1)
    z = pts[:, 2]
    z_lo, z_hi = np.percentile(z, [0.5, 99.5])
    if z_hi - z_lo < MIN_FEMUR_EXTENT_MM:
        return None
    condyles = pts[z < z_lo + 25.0]
    shaft = pts[z > z_hi - 15.0]
    if len(condyles) < 100 or len(shaft) < 100:
        return None
    cx = float(condyles[:, 0].mean())
    shaft_dx = float(shaft[:, 0].mean()) - cx  # sign = lateral direction
    rise = float(shaft[:, 2].mean() - condyles[:, 2].mean())
    width = float(np.ptp(np.percentile(condyles[:, 0], [1, 99])))
    if width < MIN_CONDYLE_WIDTH_MM or np.degrees(np.arctan2(abs(shaft_dx), rise)) > MAX_LEAN_DEG:
        return None  # not a femur's shape (a false piece, a cut-off bone)
    plus = condyles[condyles[:, 0] > cx, 2]
    minus = condyles[condyles[:, 0] < cx, 2]
    if len(plus) < 50 or len(minus) < 50:
        return None
    dz = float(np.percentile(plus, 1) - np.percentile(minus, 1))  # >0: -x condyle lower
    if abs(shaft_dx) < SHAFT_MARGIN_MM or \
            not CONDYLE_MARGIN_MM <= abs(dz) <= MAX_CONDYLE_DROP_MM:
        return None  # unclear, or a step no condyle has (a stub of a false piece)
    if np.sign(shaft_dx) != np.sign(dz):  # the lower (medial) condyle must be opposite
        return None
    side = _side_of_lateral_x(shaft_dx)
    return SideEvidence(side, "anatomy:bone shape",
                        f"the femoral shaft leans {abs(shaft_dx):.0f} mm to the patient's "
                        f"{side} and the condyle on the other side reaches {abs(dz):.0f} mm "
                        "lower (medial)")


def anatomy_evidence(labels: np.ndarray, affine: np.ndarray, values: dict[str, int], *,
                     fibula: np.ndarray | None = None,
                     plates_labelled: bool = True) -> list[SideEvidence]:
    """All clear anatomical evidence of the knee side, strongest first.

    ``labels`` is in the cartiq scheme with label ``values``; ``plates_labelled`` is False
    when the medial/lateral tibial labels were derived by a split (they then carry no
    evidence of their own).  The bone shape is looked at only when there is no other.
    """
    masks = _Masks(labels, affine)
    out = []
    if (e := _fibula(masks, fibula, values["tibia"])) is not None:
        out.append(e)
    if plates_labelled:
        e = _plates(masks, values["medial_tibial_cartilage"], values["lateral_tibial_cartilage"])
        if e is not None:
            out.append(e)
    if not out and (e := _bone_shape(masks, values["femur"])) is not None:
        out.append(e)
    return out


def _given_name(source: str) -> str:
    return {"flag": "--side", "header": "the DICOM header", "manifest": "the manifest's "
            "side column"}.get(source, source)


def decide_side(evidence: list[SideEvidence], *, side: str | None = None,
                side_source: str = "flag", header_side: str | None = None,
                override: bool = False, path: Any = None) -> tuple[str | None, str, dict[str, Any]]:
    """Side, how it was decided, and a record for the manifest.

    A given side (``side`` from ``side_source``, else ``header_side``) that the strongest
    anatomical evidence contradicts - or a ``side`` that contradicts the header - is an
    :class:`InputError` unless ``override``.  Contradicting anatomical evidence (a fibula
    on one side, the plate labels on the other) is an error too: the plate labels are
    swapped.  Without a given side the strongest evidence decides; without any, the side is
    ``None`` (source ``"unknown"``).
    """
    anatomy = evidence[0] if evidence else None
    record: dict[str, Any] = {
        "given": side or header_side,
        "given_source": side_source if side else ("header" if header_side else None),
        "anatomy": anatomy.side if anatomy else None,
        "anatomy_source": anatomy.source if anatomy else None,
        "evidence": [{"side": e.side, "source": e.source, "detail": e.detail}
                     for e in evidence],
        "overridden": False,
    }
    hint = ("; check the side, or keep the given one with --side-override (in a batch "
            "manifest: the side_override column)" if side_source == "manifest" else
            "; check the side, or pass --side-override to keep the given one")
    if anatomy is not None:
        for e in evidence[1:]:
            if e.side != anatomy.side and e.source == "anatomy:plates" and not override:
                raise InputError(f"medial/lateral tibial labels contradict the knee side: "
                                 f"{anatomy.detail} (a {anatomy.side} knee) but {e.detail} "
                                 "(swapped plate labels?); pass --side-override to measure "
                                 "the labels as they are", path)
    if side and header_side and side != header_side:
        if not override:
            raise InputError(f"{_given_name(side_source)} says {side} but the DICOM header "
                             f"says {header_side}{hint}", path)
        record["overridden"] = True
    given = side or header_side
    source = record["given_source"]
    if given:
        if anatomy is not None and anatomy.side != given:
            if not override:
                raise InputError(f"{_given_name(source)} says {given} but the anatomy says "
                                 f"{anatomy.side} ({anatomy.source}: {anatomy.detail})"
                                 f"{hint}", path)
            record["overridden"] = True
        return given, source, record
    if anatomy is not None:
        return anatomy.side, anatomy.source, record
    return None, "unknown", record
