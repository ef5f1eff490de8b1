"""Batch manifest: the CSV that lists a trial's scans, read and checked before any work.

Columns
-------
Required: ``subject_id``, ``timepoint``, ``image`` (file or DICOM folder).
Optional: ``seg`` (label map; segmentation is skipped for the row), ``side`` (left|right),
``side_override`` (yes/no, 1/0, true/false; empty = no: keep ``side`` even where the anatomy
contradicts it, recorded as ``side_check`` in the scan's manifest; needs ``side``),
``arm`` (treatment arm, e.g. ``MSC``/``placebo``), ``kl_grade`` (Kellgren-Lawrence 0-4, also
``I``..``IV``), ``visit_order`` (integer; else timepoints sort naturally), ``sites``
(repair-site mask for MOCART scoring), ``labels`` (label convention of ``seg``).
Relative paths are relative to the manifest's folder.  Empty cells mean "not given".

Visits
------
Timepoints sort naturally: ``baseline``/``bl`` first, then by the number in the name
(``m6`` < ``m12`` < ``24m``), then alphabetically; ``visit_order`` overrides that.  A
subject's baseline is its visit named ``baseline``/``bl``/``base``/``screening`` or numbered 0
(``m0``, ``0m``, ``week0``), or the visit with ``visit_order`` 0.  Every follow-up is
compared with the baseline.

Checks
------
Every problem of every row is collected first and reported together in one
:class:`cartiq.errors.InputError` (or, with ``skip_invalid``, the bad rows - and the rows of
subjects left without a baseline - are dropped and listed in :attr:`Manifest.invalid`).

Resume
------
What each row's results depend on - sha256 of its input files, the model (name and weights
sha256), the resolved configs - is hashed into a *fingerprint* that the batch records in the
scan's ``manifest.json``; a later run skips the scan when the fingerprints match
(:func:`scan_is_current`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cartiq.errors import InputError
from cartiq.io.trial import is_baseline_name, stage_group, timepoint_sort_key

log = logging.getLogger(__name__)

__all__ = ["ScanRow", "InvalidRow", "Manifest", "read_manifest_csv", "timepoint_sort_key",
           "is_baseline_name", "stage_group", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS",
           "input_hashes", "model_identity", "config_hashes", "fingerprint", "scan_is_current",
           "scan_outdated", "compare_is_current"]

REQUIRED_COLUMNS = ("subject_id", "timepoint", "image")
OPTIONAL_COLUMNS = ("seg", "side", "side_override", "arm", "kl_grade", "visit_order", "sites", "labels")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_YES_NO = {"": False, "no": False, "n": False, "false": False, "0": False,
           "yes": True, "y": True, "true": True, "1": True}
_ROMAN = {"0": 0, "i": 1, "ii": 2, "iii": 3, "iv": 4}
MAX_LISTED = 200


@dataclass(frozen=True)
class ScanRow:
    """One scan of the manifest (paths absolute)."""

    line: int  # line number in the CSV (header = 1)
    subject_id: str
    timepoint: str
    image: Path
    seg: Path | None = None
    sites: Path | None = None
    side: str | None = None
    side_override: bool = False
    arm: str = ""
    kl_grade: int | None = None
    visit_order: int | None = None
    labels: str | None = None
    is_baseline: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject_id, self.timepoint)

    @property
    def stage_group(self) -> str:
        return stage_group(self.kl_grade)


@dataclass(frozen=True)
class InvalidRow:
    """A manifest row that was not run, with every problem found in it."""

    line: int
    subject_id: str
    timepoint: str
    problems: tuple[str, ...]

    def __str__(self) -> str:
        return f"line {self.line}: " + "; ".join(self.problems)


@dataclass
class Manifest:
    """A checked manifest: valid rows grouped by subject, visits in order."""

    path: Path
    rows: list[ScanRow]
    invalid: list[InvalidRow] = field(default_factory=list)
    unknown_columns: list[str] = field(default_factory=list)

    def subjects(self) -> dict[str, list[ScanRow]]:
        """Rows per subject, each list in visit order (baseline first)."""
        out: dict[str, list[ScanRow]] = {}
        for r in self.rows:
            out.setdefault(r.subject_id, []).append(r)
        return {s: sorted(rs, key=_visit_key) for s, rs in out.items()}

    def pairs(self) -> list[tuple[ScanRow, ScanRow]]:
        """(baseline, follow-up) for every follow-up of every subject."""
        out = []
        for rows in self.subjects().values():
            base = next((r for r in rows if r.is_baseline), None)
            if base is not None:
                out += [(base, r) for r in rows if r is not base]
        return out

    def subject_info(self) -> dict[str, dict[str, Any]]:
        """Per subject: arm and the baseline's KL grade / stage group."""
        info = {}
        for s, rows in self.subjects().items():
            base = next((r for r in rows if r.is_baseline), rows[0])
            kl = base.kl_grade if base.kl_grade is not None else next(
                (r.kl_grade for r in rows if r.kl_grade is not None), None)
            info[s] = {"arm": base.arm, "kl_grade": kl, "stage_group": stage_group(kl)}
        return info


def _visit_key(r: ScanRow) -> tuple:
    if r.visit_order is not None:
        return (0, r.visit_order, timepoint_sort_key(r.timepoint))
    return (0 if r.is_baseline else 1, 0, timepoint_sort_key(r.timepoint))


def _resolve(cell: str, base: Path) -> Path:
    p = Path(cell).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _parse_kl(cell: str) -> int:
    c = cell.strip().lower().removeprefix("kl").strip()
    if c in _ROMAN:
        return _ROMAN[c]
    v = float(c)  # ValueError handled by caller
    if not v.is_integer() or not 0 <= v <= 4:
        raise ValueError(c)
    return int(v)


def _check_row(line: int, raw: dict[str, str], base: Path, columns: set[str],
               check_paths: bool) -> tuple[ScanRow | None, list[str]]:
    problems: list[str] = []
    get = lambda k: (raw.get(k) or "").strip()  # noqa: E731
    sid, tp = get("subject_id"), get("timepoint")
    for name, value in (("subject_id", sid), ("timepoint", tp)):
        if not value:
            problems.append(f"{name} is empty")
        elif not _SAFE_NAME.match(value):
            problems.append(f"{name} {value!r} is not a safe folder name "
                            "(letters, digits, '.', '_', '-')")
    paths: dict[str, Path | None] = {}
    for col in ("image", "seg", "sites"):
        cell = get(col)
        if not cell:
            if col == "image":
                problems.append("image is empty")
            paths[col] = None
            continue
        p = _resolve(cell, base)
        if check_paths and not p.exists():
            problems.append(f"{col} {cell} does not exist")
        paths[col] = p
    side = get("side").lower() or None
    if side in ("l", "r"):
        side = {"l": "left", "r": "right"}[side]
    if side is not None and side not in ("left", "right"):
        problems.append(f"side {get('side')!r} is not left or right")
    override = _YES_NO.get(get("side_override").lower())
    if override is None:
        problems.append(f"side_override {get('side_override')!r} is not yes or no")
    elif override and side is None:
        problems.append("side_override without a side")
    kl = None
    if get("kl_grade"):
        try:
            kl = _parse_kl(get("kl_grade"))
        except ValueError:
            problems.append(f"kl_grade {get('kl_grade')!r} is not 0-4 (or I-IV)")
    order = None
    if get("visit_order"):
        try:
            v = float(get("visit_order"))
            if not v.is_integer():
                raise ValueError
            order = int(v)
        except ValueError:
            problems.append(f"visit_order {get('visit_order')!r} is not an integer")
    if problems:
        return None, problems
    is_base = (order == 0) if order is not None and "visit_order" in columns else False
    row = ScanRow(line=line, subject_id=sid, timepoint=tp, image=paths["image"],
                  seg=paths["seg"], sites=paths["sites"], side=side,
                  side_override=bool(override), arm=get("arm"),
                  kl_grade=kl, visit_order=order, labels=get("labels") or None,
                  is_baseline=is_base or is_baseline_name(tp))
    return row, []


def read_manifest_csv(path: str | Path, *, skip_invalid: bool = False,
                      check_paths: bool = True) -> Manifest:
    """Read and check a batch manifest; every problem is reported at once.

    Parameters
    ----------
    path : the CSV file.
    skip_invalid : drop bad rows (listed in ``Manifest.invalid``) instead of raising.
    check_paths : check that image/seg/sites paths exist.

    Raises
    ------
    InputError
        Unreadable file, missing required columns (always fatal), or - unless
        ``skip_invalid`` - any bad row; the message lists every bad row by CSV line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("manifest does not exist", path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest ({exc})", path) from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"missing required column(s) {', '.join(missing)} (header: "
                         f"{','.join(header) or 'empty'}); required: "
                         f"{','.join(REQUIRED_COLUMNS)}", path)
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS and c]
    base = path.resolve().parent
    columns = set(header)
    problems: dict[int, list[str]] = {}
    rows: list[ScanRow] = []
    ids: dict[int, tuple[str, str]] = {}
    for raw in reader:
        i = reader.line_num
        ids[i] = ((raw.get("subject_id") or "").strip(), (raw.get("timepoint") or "").strip())
        if not any((v or "").strip() for k, v in raw.items() if k is not None):
            continue  # blank line
        if raw.get(None):
            problems.setdefault(i, []).append(f"has {len(raw[None])} more cell(s) than the header")
        row, probs = _check_row(i, raw, base, columns, check_paths)
        if probs:
            problems.setdefault(i, []).extend(probs)
        if row is not None:
            rows.append(row)
    # duplicates, per-subject consistency, baselines
    seen: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.key in seen:
            problems.setdefault(r.line, []).append(
                f"duplicate subject_id,timepoint {r.subject_id},{r.timepoint} "
                f"(also line {seen[r.key]})")
        else:
            seen[r.key] = r.line
    by_subject: dict[str, list[ScanRow]] = {}
    for r in rows:
        by_subject.setdefault(r.subject_id, []).append(r)
    for sid, rs in by_subject.items():
        arms = sorted({r.arm for r in rs if r.arm})
        if len(arms) > 1:
            for r in rs:
                problems.setdefault(r.line, []).append(
                    f"subject {sid} has different arms ({', '.join(arms)})")
        bases = [r for r in rs if r.is_baseline]
        bad_bases = [ln for ln, (s_, t_) in ids.items() if s_ == sid and ln in problems
                     and is_baseline_name(t_)]
        if not bases:
            why = (f"the baseline row of subject {sid} (line {bad_bases[0]}) is invalid"
                   if bad_bases else f"subject {sid} has no baseline visit (timepoint "
                   "baseline/bl/m0 or visit_order 0)")
            for r in rs:
                problems.setdefault(r.line, []).append(why)
        elif len(bases) > 1:
            for r in bases:
                problems.setdefault(r.line, []).append(
                    f"subject {sid} has {len(bases)} baseline visits "
                    f"({', '.join(b.timepoint for b in bases)})")
        orders = [r.visit_order for r in rs if r.visit_order is not None]
        if len(orders) != len(set(orders)):
            for r in rs:
                if r.visit_order is not None and orders.count(r.visit_order) > 1:
                    problems.setdefault(r.line, []).append(
                        f"visit_order {r.visit_order} repeated for subject {sid}")
    invalid = [InvalidRow(ln, *ids.get(ln, ("", "")), tuple(ps))
               for ln, ps in sorted(problems.items())]
    if invalid and not skip_invalid:
        shown = [str(b) for b in invalid[:MAX_LISTED]]
        more = len(invalid) - len(shown)
        raise InputError(f"{len(invalid)} bad row(s) (nothing was processed; fix them or use "
                         "--skip-invalid):\n  " + "\n  ".join(shown)
                         + (f"\n  ... and {more} more" if more else ""), path)
    good = [r for r in rows if r.line not in problems]
    # a subject whose baseline row was dropped has no baseline left: drop its rows too
    keep_subjects = {r.subject_id for r in good if r.is_baseline}
    for r in good:
        if r.subject_id not in keep_subjects:
            invalid.append(InvalidRow(r.line, r.subject_id, r.timepoint,
                                      (f"subject {r.subject_id} has no valid baseline row",)))
    good = [r for r in good if r.subject_id in keep_subjects]
    if not good and not invalid:
        raise InputError("manifest lists no scans", path)
    if not good:
        raise InputError("no valid rows left:\n  "
                         + "\n  ".join(str(b) for b in invalid[:MAX_LISTED]), path)
    return Manifest(path=path, rows=good, invalid=invalid, unknown_columns=unknown)


# ----------------------------------------------------------------------------- resume
# What a scan's results depend on, recorded in its manifest.json as the batch fingerprint.

FINGERPRINT_VERSION = 2  # 2: the cartiq version is part of it


def sha256_or_none(path: Path | None) -> str | None:
    from cartiq.io.volume import sha256_file

    return None if path is None or not path.exists() else sha256_file(path)


def input_hashes(row: ScanRow) -> dict[str, str | None]:
    """sha256 of the row's image (file or DICOM folder), seg and sites."""
    return {"image": sha256_or_none(row.image), "seg": sha256_or_none(row.seg),
            "sites": sha256_or_none(row.sites)}


def model_identity(model: str | None) -> dict[str, Any]:
    """Model name, version and weights sha256 (checked against the weights at load)."""
    from cartiq.segmentation.models import DEFAULT_MODEL, model_info

    info = model_info(model or DEFAULT_MODEL)
    sha = info.get("weights_sha256")
    weights = Path(info["folder"]) / str(info.get("weights") or "model.pt")
    if not sha and weights.is_file():
        sha = sha256_or_none(weights)
    return {"name": info.get("name"), "version": info.get("version"), "weights_sha256": sha}


def config_hashes(measure_config: Path | None, compare: bool = True) -> dict[str, str]:
    """Hashes of the resolved configs that shape a batch's results (and the label scheme);
    ``compare=False``: without the comparison config (a batch without follow-ups)."""
    from cartiq.config import MeasureConfig, config_hash, load_config
    from cartiq.io.labels import CONFIG_DIR

    out = {"measure": config_hash(load_config(measure_config, MeasureConfig,
                                              default_name="measure.yaml"))}
    stages = [("qc", "measurement.qc", "load_qc_config"),
              ("score", "scoring.mocart", "load_scoring_config")]
    if compare:
        stages.append(("compare", "longitudinal.compare", "load_compare_config"))
    for key, module, loader in stages:
        try:
            load = getattr(importlib.import_module(f"cartiq.{module}"), loader)
            out[key] = config_hash(load(None))
        except (ImportError, AttributeError):
            log.warning("%s stage not available: its config is not part of the fingerprint", key)
    out["labels"] = (sha256_or_none(CONFIG_DIR / "labels.yaml") or "")[:16]
    return out


def fingerprint(row: ScanRow, inputs: dict[str, Any], model: dict[str, Any] | None,
                configs: dict[str, str]) -> str:
    """sha256 over everything a scan's results depend on (the comparison config excluded)."""
    from cartiq._version import __version__

    data = {"v": FINGERPRINT_VERSION, "cartiq": __version__, "inputs": inputs, "model": model,
            "configs": {k: v for k, v in configs.items() if k != "compare"},
            "side": row.side, "labels": row.labels,
            **({"side_override": True} if row.side_override else {})}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def scan_is_current(out_dir: Path, fp: str) -> bool:
    """A complete batch scan folder whose recorded fingerprint is ``fp``."""
    return scan_outdated(out_dir, fp) is None


def scan_outdated(out_dir: Path, fp: str) -> str | None:
    """Why the scan folder must be (re)computed, or ``None`` when it is up to date: complete
    (every file the manifest lists there, unchanged) and made with fingerprint ``fp``."""
    from cartiq.io.outputs import why_incomplete

    path = out_dir / "manifest.json"
    if not path.is_file():
        return "not computed yet"
    recorded = (_read_json(path).get("batch") or {}).get("fingerprint")
    if recorded is None:
        return "unfinished (no batch record in manifest.json)"
    if recorded != fp:
        return "inputs, model, configs or cartiq version changed"
    return why_incomplete(out_dir)


def compare_is_current(out_dir: Path, baseline_dir: Path, followup_dir: Path,
                       config_hash: str | None) -> bool:
    """A finished comparison with the same config, newer than both scans' manifests."""
    from cartiq.io.outputs import why_incomplete

    m = out_dir / "manifest.json"
    if _read_json(m).get("config_hash") != config_hash or why_incomplete(out_dir) is not None:
        return False
    try:
        return all(m.stat().st_mtime >= (d / "manifest.json").stat().st_mtime
                   for d in (baseline_dir, followup_dir))
    except OSError:
        return False
