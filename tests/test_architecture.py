"""The package's shape: stages import only earlier stages, no import cycles, no private
names imported across modules, and the installed name is ``cartiq`` (not ``pipeline``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "pipeline"

# data flows forward only: a module may import its own stage and earlier ones
STAGES = ["core", "io", "data", "segmentation", "measurement", "scoring", "longitudinal", "report",
          "batch", "front"]
CORE = {"errors", "_version", "_resources", "config"}
FRONT = {"__init__", "__main__", "cli", "_api", "demo", "demo_recovery", "power"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = ["cartiq", *rel.parts]
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in FRONT:  # cartiq.cli.* (the CLI's command modules)
        return "front"
    if len(parts) >= 3 or (len(parts) == 2 and parts[1] in STAGES):
        return parts[1]
    name = parts[1] if len(parts) > 1 else "__init__"
    if name in CORE:
        return "core" if name != "config" else "io"
    if name in FRONT:
        return "front"
    raise AssertionError(f"{module}: top-level module in no stage")


def _imports() -> dict[str, list[tuple[str, list[str], bool]]]:
    """module -> [(imported module, imported names, at module level)]"""
    out: dict[str, list[tuple[str, list[str], bool]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        mod = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] == "cartiq":
                    found.append((node.module, [a.name for a in node.names], id(node) in top))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "cartiq":
                        found.append((a.name, [], id(node) in top))
        out[mod] = found
    return out


def test_source_modules_are_all_in_a_stage():
    mods = _imports()
    assert len(mods) > 40
    for m in mods:
        _stage(m)


def test_no_import_from_a_later_stage():
    bad = []
    for mod, imps in _imports().items():
        here = STAGES.index(_stage(mod))
        for target, _names, _top in imps:
            if target == "cartiq":
                continue
            if STAGES.index(_stage(target)) > here:
                bad.append(f"{mod} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules():
    bad = []
    for mod, imps in _imports().items():
        for target, names, _top in imps:
            for n in names:
                if n.startswith("_") and n != "__version__":
                    bad.append(f"{mod} imports {target}.{n}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = _imports()
    graph = {m: {t for t, _n, _top in imps if t in mods and t != m} for m, imps in mods.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the stage code
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") and m.count(".") >= 1)
                    and not m.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [m, t]) if t in stack
                              else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(cycles)


def test_installed_name_is_cartiq(tmp_path):
    # outside the checkout (whose pipeline/ folder would be importable from the cwd)
    code = ("import importlib.util, cartiq; print(cartiq.__file__); "
            "print(importlib.util.find_spec('pipeline') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert Path(out[0]).name == "__init__.py"
    assert out[1] == "True"


@pytest.mark.parametrize("stage", ["io", "segmentation", "measurement", "scoring", "longitudinal",
                                   "report", "batch"])
def test_each_stage_has_a_documented_face(stage):
    import importlib

    pkg = importlib.import_module(f"cartiq.{stage}")
    assert pkg.__doc__ and len(pkg.__doc__.strip()) > 20
    assert getattr(pkg, "__all__", None), f"cartiq.{stage} exports nothing"
    for name in pkg.__all__:
        assert hasattr(pkg, name), f"cartiq.{stage}.{name}"
