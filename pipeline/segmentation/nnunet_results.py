"""Reading nnU-Net v2 results folders (no nnU-Net import): stages, folds, checkpoints, labels,
and the registry of known public nnU-Net knee models (``configs/known_models.yaml``).

A results folder is what ``nnUNetv2_train`` writes::

    <results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/
        dataset.json  plans.json  fold_<f>/checkpoint_final.pth  [fold_<f>/checkpoint_best.pth]

Any folder at or above such trained-model folders is accepted.  The configuration is the
cascade when one is trained (``3d_cascade_fullres``, run after its ``previous_stage``
``3d_lowres``, which must be there too), else ``3d_fullres``, ``2d``, ``3d_lowres``, in that
order, unless one is named.  Folds and checkpoint are chosen as nnU-Net chooses them:
every ``fold_<n>`` holding the checkpoint (``fold_all`` only when there is no other), and
``checkpoint_final.pth``; a known model may say otherwise (``nnunet_knee``: the fold in
``model_config.json`` and ``checkpoint_best.pth``, as its publisher runs it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from cartiq._resources import CONFIGS, resource_dir
from cartiq.errors import ModelError
from cartiq.io.volume import sha256_file

__all__ = ["known_models", "find_trained_folders", "inspect_results", "dataset_labels",
           "map_labels", "match_known", "describe_results", "combined_sha256", "hash_stages",
           "PREFERENCE", "KNOWN_MODELS_FILE"]

log = logging.getLogger(__name__)

KNOWN_MODELS_FILE = resource_dir(CONFIGS) / "known_models.yaml"
PREFERENCE = ("3d_cascade_fullres", "3d_fullres", "2d", "3d_lowres")
_ALIASES = {  # normalised dataset.json label name -> cartiq structure
    "femur": "femur", "femoral_bone": "femur", "tibia": "tibia", "tibial_bone": "tibia",
    "patella": "patella", "patellar_bone": "patella", "fibula": "fibula",
    "femoral_cartilage": "femoral_cartilage", "femoral_cart": "femoral_cartilage",
    "tibial_cartilage": "tibial_cartilage", "tibial_cart": "tibial_cartilage",
    "medial_tibial_cartilage": "medial_tibial_cartilage",
    "medial_tibial_cart": "medial_tibial_cartilage",
    "lateral_tibial_cartilage": "lateral_tibial_cartilage",
    "lateral_tibial_cart": "lateral_tibial_cartilage",
    "patellar_cartilage": "patellar_cartilage", "patellar_cart": "patellar_cartilage",
    "medial_meniscus": "medial_meniscus", "lateral_meniscus": "lateral_meniscus",
    "meniscus": "meniscus", "menisci": "meniscus",
    "bone_marrow_lesion": "bone_marrow_lesion", "bml": "bone_marrow_lesion",
}


# ----------------------------------------------------------------------------- registry


def known_models(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The known-model registry: name -> entry."""
    path = Path(path or KNOWN_MODELS_FILE)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read the known-model registry ({exc})", path) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ModelError("known-model registry must map names to entries", path)
    return data


def match_known(spec: dict[str, Any], registry: dict[str, dict[str, Any]]) -> str | None:
    """Name of the registry entry whose ``match`` (dataset, trainer, plans) fits ``spec``."""
    for name, entry in registry.items():
        want = entry.get("match") or {}
        if want and all(spec.get(k) == v for k, v in want.items()):
            return name
    return None


# ----------------------------------------------------------------------------- folders


def _is_trained(p: Path) -> bool:
    return (p / "plans.json").is_file() and (p / "dataset.json").is_file() and \
        any(q.is_dir() for q in p.glob("fold_*"))


def find_trained_folders(root: Path, depth: int = 4) -> list[Path]:
    """Trained-model folders at or below ``root`` (at most ``depth`` levels)."""
    out, level = [], [Path(root)]
    for _ in range(depth + 1):
        nxt = []
        for p in level:
            if _is_trained(p):
                out.append(p)
            else:
                nxt.extend(q for q in sorted(p.iterdir()) if q.is_dir()
                           and not q.name.startswith("."))
        level = nxt
    return sorted(out)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read nnU-Net file ({exc})", path) from None


def _config(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """A configuration of plans.json with ``inherits_from`` resolved (as nnU-Net does)."""
    cfgs = plans.get("configurations") or {}
    if name not in cfgs:
        raise ModelError(f"plans.json has no configuration {name!r}", path)
    cfg = dict(cfgs[name])
    parent = cfg.get("inherits_from")
    if parent:
        base = _config(plans, parent, path)
        base.update(cfg)
        cfg = base
    return cfg


def _identity(folder: Path) -> tuple[str, str, str]:
    """(trainer, plans, configuration) from ``<Trainer>__<Plans>__<configuration>``."""
    parts = folder.name.split("__")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    plans = _read_json(folder / "plans.json")
    cfgs = list((plans.get("configurations") or {}).keys())
    if len(cfgs) != 1:
        raise ModelError("cannot tell the configuration of this trained-model folder (its "
                         "name is not <Trainer>__<Plans>__<configuration>)", folder)
    return "", str(plans.get("plans_name", "")), cfgs[0]


def _folds(folder: Path, checkpoint: str, folds: list[str] | None) -> list[str]:
    if folds:
        missing = [f for f in folds if not (folder / f"fold_{f}" / checkpoint).is_file()]
        if missing:
            raise ModelError(f"fold {missing[0]} is missing (no fold_{missing[0]}/"
                             f"{checkpoint})", folder)
        return [str(f) for f in folds]
    found = sorted((p.name[5:] for p in folder.glob("fold_*")
                    if (p / checkpoint).is_file() and p.name[5:].isdigit()), key=int)
    if not found and (folder / "fold_all" / checkpoint).is_file():
        found = ["all"]
    if not found:
        raise ModelError(f"no fold_<n>/{checkpoint} in this trained-model folder", folder)
    return found


def _model_config_fold(folder: Path) -> list[str] | None:
    """The fold named in ``model_config.json`` (``model_info.fold``), as nnunet_knee's
    inference code reads it."""
    path = folder / "model_config.json"
    if not path.is_file():
        return None
    fold = (_read_json(path).get("model_info") or {}).get("fold")
    return None if fold is None else [str(fold)]


def _layout(path: Path) -> dict[str, Any]:
    """trainer, plans, dataset and trained-model folder per configuration of ``path``."""
    if not path.is_dir():
        raise ModelError("is not a folder (an nnU-Net results folder is needed)", path)
    trained = find_trained_folders(path)
    if not trained:
        raise ModelError("is not an nnU-Net v2 results folder (no <Trainer>__<Plans>__"
                         "<configuration> folder with plans.json, dataset.json and fold_*)",
                         path)
    ids = {f: _identity(f) for f in trained}
    groups = sorted({(t, p) for t, p, _ in ids.values()})
    if len(groups) > 1:
        raise ModelError("holds several trained models ("
                         + ", ".join(f"{t}__{p}" for t, p in groups)
                         + "); pass the dataset's folder of one, or one trained-model folder",
                         path)
    by_conf = {c: f for f, (_, _, c) in ids.items()}
    any_folder = trained[0]
    dataset = any_folder.parent.name
    if not re.match(r"Dataset\d+_", dataset):
        dataset = str(_read_json(any_folder / "plans.json").get("dataset_name", ""))
    return {"trainer": groups[0][0], "plans": groups[0][1], "dataset": dataset,
            "by_conf": by_conf}


def inspect_results(path: Path, *, configuration: str | None = None,
                    folds: list[str] | None = None, checkpoint: str | None = None,
                    fold_rule: str | None = None) -> dict[str, Any]:
    """The ``nnunet`` entry (stages in run order, folds, checkpoint) of a results folder."""
    path = Path(path)
    lay = _layout(path)
    by_conf = lay["by_conf"]
    if configuration is None:
        configuration = next((c for c in PREFERENCE if c in by_conf), sorted(by_conf)[0])
        if len(by_conf) > 1:
            log.debug("%s: using configuration %s (of %s)", path, configuration,
                     ", ".join(sorted(by_conf)))
    if configuration not in by_conf:
        raise ModelError(f"has no trained configuration {configuration!r} (found: "
                         + ", ".join(sorted(by_conf)) + ")", path)
    chain = [configuration]
    while True:
        folder = by_conf[chain[0]]
        prev = _config(_read_json(folder / "plans.json"), chain[0], folder).get("previous_stage")
        if not prev:
            break
        if prev not in by_conf:
            raise ModelError(f"{chain[0]} is a cascade stage but its low-res stage {prev!r} is "
                             f"missing (expected a folder {lay['trainer']}__{lay['plans']}__"
                             f"{prev})", path)
        chain.insert(0, prev)
    checkpoint = checkpoint or "checkpoint_final.pth"
    stages = []
    for conf in chain:
        folder = by_conf[conf]
        use = folds or (_model_config_fold(by_conf[configuration]) if fold_rule == "model_config"
                        else None)
        if fold_rule in ("model_config", "first") and use is None:
            use = _folds(folder, checkpoint, None)[:1]
        stages.append({"configuration": conf, "folder": str(folder.resolve()),
                       "folds": _folds(folder, checkpoint, use), "checkpoint": checkpoint})
    return {"trainer": lay["trainer"], "plans": lay["plans"], "dataset": lay["dataset"],
            "configuration": configuration, "stages": stages}


def hash_stages(spec: dict[str, Any], expected: dict[str, str] | None = None) -> None:
    """Fill each stage's ``sha256`` (checked against ``expected``: ``<configuration>/fold_<f>/
    <checkpoint>`` -> sha256, where a publisher gives them)."""
    expected = {k: str(v).lower() for k, v in (expected or {}).items()}
    for st in spec["stages"]:
        folder = Path(st["folder"])
        st["sha256"] = {}
        for f in st["folds"]:
            rel = f"fold_{f}/{st['checkpoint']}"
            sha = sha256_file(folder / rel)
            want = expected.get(f"{st['configuration']}/{rel}")
            if want is not None and sha != want:
                raise ModelError(f"checkpoint sha256 mismatch (expected {want[:12]}..., got "
                                 f"{sha[:12]}...): download corrupt or not the published "
                                 "model", folder / rel)
            st["sha256"][rel] = sha


def combined_sha256(stages: list[dict[str, Any]]) -> str:
    """One hash over every checkpoint of a model (its identity, e.g. for batch re-runs)."""
    h = hashlib.sha256()
    for st in sorted(stages, key=lambda s: s["configuration"]):
        for rel, sha in sorted(st["sha256"].items()):
            h.update(f"{st['configuration']}/{rel}={sha}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- labels


def dataset_labels(folder: Path) -> dict[int, str]:
    """dataset.json ``labels`` as value -> name (background included)."""
    path = Path(folder) / "dataset.json"
    labels = _read_json(path).get("labels")
    if not isinstance(labels, dict):
        raise ModelError("dataset.json has no 'labels'", path)
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ModelError(f"label {name!r} is a region (list of values); region-based "
                             "nnU-Net models are not supported", path)
        out[int(value)] = str(name)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def map_labels(names: dict[int, str], mapping: dict[int, str] | None,
               path: Path) -> dict[int, str]:
    """nnU-Net label value -> cartiq structure; by name unless ``mapping`` (value -> target,
    a label-mapping YAML's ``map``) is given.  Values mapped to background/ignore are left
    out (they become background)."""
    fg = {v: n for v, n in names.items() if v != 0}
    if mapping is not None:
        extra = sorted(set(mapping) - set(names))
        if extra:
            log.warning("%s: the label mapping names values %s that dataset.json lacks",
                        path, extra)
        return {v: t for v, t in mapping.items() if t not in ("background", "ignore")}
    out, bad = {}, []
    for v, n in sorted(fg.items()):
        target = _ALIASES.get(_norm(n))
        if target is None:
            bad.append(f"{v} {n!r}")
        else:
            out[v] = target
    if bad:
        raise ModelError(f"dataset.json labels {', '.join(bad)} cannot be mapped into the "
                         "cartiq scheme by name; give a label-mapping YAML with --labels "
                         "(see configs/label_maps/)", path)
    return out


# ----------------------------------------------------------------------------- metadata


def describe_results(path: Path, *, name: str | None = None, labels: str | Path | None = None,
                     configuration: str | None = None, folds: list[str] | None = None,
                     checkpoint: str | None = None, orientation: str | None = None,
                     tta: bool | None = None,
                     registry: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Model metadata (``format: nnunetv2``, a dict for ``ModelMetadata``) for a results
    folder: a known model's entry when it matches, else what the folder says.

    Checkpoints are hashed (and checked where the registry gives sha256)."""
    from cartiq.io.labels import load_mapping

    path = Path(path)
    registry = known_models() if registry is None else registry
    known = match_known(_layout(path), registry)
    entry = registry.get(known, {}) if known else {}
    if known:
        log.info("%s is the known model %s (configs/known_models.yaml)", path, known)
        if configuration is None and entry.get("configuration"):
            configuration = entry["configuration"]
    spec = inspect_results(path, configuration=configuration, folds=folds,
                           checkpoint=checkpoint or entry.get("checkpoint"),
                           fold_rule=None if folds else entry.get("folds"))
    log.info("%s: nnU-Net %s, stages %s, folds %s, %s", path, spec["configuration"],
             " -> ".join(s["configuration"] for s in spec["stages"]),
             "/".join(",".join(s["folds"]) for s in spec["stages"]), spec["stages"][0]["checkpoint"])
    hash_stages(spec, entry.get("sha256"))
    final = Path(spec["stages"][-1]["folder"])
    names = dataset_labels(final)
    label_source = labels if labels is not None else entry.get("label_map")
    mapping = load_mapping(label_source).map if label_source is not None else None
    label_map = map_labels(names, mapping, final / "dataset.json")
    if orientation is None and "orientation" in entry:
        orientation = entry["orientation"]
    if orientation is None:
        log.warning("%s: training orientation unknown; scans go to nnU-Net as stored, so "
                    "results depend on how a scan is stored (give --orientation, e.g. LPS)",
                    path)
    plans = _read_json(final / "plans.json")
    djson = _read_json(final / "dataset.json")
    expected = {"channels": djson.get("channel_names"), "sequence": entry.get("sequence", ""),
                "orientation": orientation,
                "normalization": _config(plans, spec["configuration"], final)
                .get("normalization_schemes"),
                "median_spacing_mm": plans.get("original_median_spacing_after_transp"),
                "transpose_forward": plans.get("transpose_forward")}
    spec.update(orientation=orientation, known_model=known, expected_input=expected,
                use_mirroring=bool(entry.get("use_mirroring", True) if tta is None else tta))
    desc = entry.get("description") or (f"nnU-Net v2 {spec['dataset']} {spec['trainer']}__"
                                        f"{spec['plans']}__{spec['configuration']}")
    return {"name": name or known or _norm(spec["dataset"] or path.name) or "nnunet_model",
            "version": str(entry.get("version", "1")), "format": "nnunetv2",
            "description": str(desc), "labels": label_map, "weights": "",
            "weights_sha256": combined_sha256(spec["stages"]),
            "license": str(entry.get("license", "unknown (not stated in the results folder)")),
            "source": str(entry.get("source", str(path.resolve()))),
            "training_data": str(entry.get("training_data", djson.get("description", ""))),
            "authors": str(entry.get("authors", "")),
            "references": list(entry.get("references", [])), "nnunet": spec,
            "training": {"reported": entry.get("reported", ""),
                         "dataset_json_labels": {str(k): v for k, v in names.items()}}}
