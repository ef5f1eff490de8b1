"""The Dockerfile is consistent with the package (no Docker engine runs here: parse it)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        ln = ln.strip()
        if ln:
            word, _, rest = ln.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _args() -> dict[str, str]:
    return {m.group(1): m.group(2) for op, rest in _instructions() if op == "ARG"
            for m in [re.match(r"(\w+)=(\S+)", rest)] if m}


def _torch_spec(pyproject: dict) -> SpecifierSet:
    dep = next(d for d in pyproject["project"]["dependencies"] if re.match(r"torch\b", d))
    return SpecifierSet(dep[len("torch"):])


def test_base_image_is_cuda_pytorch_and_matches_pyproject(pyproject):
    ins = _instructions()
    assert ins[0][0] == "ARG" and ins[1] == ("FROM", "${BASE_IMAGE}")
    base = _args()["BASE_IMAGE"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert m, base
    assert Version(m.group(1)) in _torch_spec(pyproject)  # torch pinned by the base image
    cpu = Version(_args()["TORCH_CPU_VERSION"])
    assert cpu in _torch_spec(pyproject)
    # the build checks the interpreter against pyproject's requires-python
    need = SpecifierSet(pyproject["project"]["requires-python"])
    checks = re.findall(r"sys\.version_info >= \((\d+), (\d+)\)", DOCKERFILE.read_text())
    assert checks and all(Version(f"{a}.{b}") in need for a, b in checks)
    floor = min(s.version for s in need if s.operator == ">=")
    assert tuple(map(int, checks[0])) == tuple(map(int, floor.split(".")[:2]))
    # the documented CPU base has a Python that satisfies requires-python
    cpu_base = re.search(r"BASE_IMAGE=python:(\d+\.\d+)-slim", DOCKERFILE.read_text())
    assert cpu_base and Version(cpu_base.group(1)) in need


def test_installs_this_package_with_its_dependencies(pyproject):
    ins = _instructions()
    runs = [rest for op, rest in ins if op == "RUN"]
    copies = [rest for op, rest in ins if op == "COPY"]
    assert any(c.startswith("pyproject.toml") for c in copies)
    # dependencies come from pyproject itself (cannot drift), torch constrained to the base
    dep_run = next(r for r in runs if "pyproject.toml" in r)
    assert "['project']['dependencies']" in dep_run and "-c /tmp/constraints.txt" in dep_run
    # the image runs nnU-Net models too: the nnunet extra, with the repo's constraints
    assert "['optional-dependencies']['nnunet']" in dep_run
    assert "constraints.txt" in dep_run and (ROOT / "scripts" / "constraints.txt").is_file()
    idx_pkg = next(i for i, (op, rest) in enumerate(ins)
                   if op == "COPY" and rest.startswith("pipeline/"))
    idx_install = next(i for i, (op, rest) in enumerate(ins)
                       if op == "RUN" and re.search(r"pip install [^&]*cartiq-\*\.whl", rest))
    assert idx_install > idx_pkg
    # the wheel is built from this tree and installed; no editable install of the checkout
    assert "pip wheel" in ins[idx_install][1]
    assert not any(re.search(r"pip install [^&]*-e ", r) for r in runs)
    assert pyproject["project"]["name"] == "cartiq"
    assert pyproject["tool"]["setuptools"]["package-dir"]["cartiq"] == "pipeline"


def test_models_and_configs_are_baked_in():
    ins = _instructions()
    copies = {rest.split()[0] for op, rest in ins if op == "COPY"}
    assert {"configs/", "models/", "pipeline/"} <= copies
    # nothing they need is excluded from the build context
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(rel: str) -> bool:
        hit = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").lstrip("/")
            if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat + "/*") or \
                    any(fnmatch.fnmatch(part, pat) for part in rel.split("/")[:1]):
                hit = not neg
        return hit

    for folder in ("models", "configs", "pipeline"):
        files = [p for p in (ROOT / folder).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files, folder
        for f in files:
            if "checkpoints" in f.parts:  # resumable training state stays out of the image
                assert ignored(str(f.relative_to(ROOT))), f
                continue
            assert not ignored(str(f.relative_to(ROOT))), f
    for needed in ("pyproject.toml", "README.md", "scripts/constraints.txt"):
        assert not ignored(needed)
    assert ignored(".git") and ignored("tests")
    weights = list((ROOT / "models").rglob("model.pt"))
    assert weights, "default weights missing from models/"
    meta = json.loads((weights[0].parent / "metadata.json").read_text())
    assert meta


def test_non_root_user_and_entrypoint(pyproject):
    ins = _instructions()
    users = [(i, rest) for i, (op, rest) in enumerate(ins) if op == "USER"]
    assert users and users[-1][1] not in ("root", "0")
    last_run = max(i for i, (op, _) in enumerate(ins) if op == "RUN")
    assert users[-1][0] > last_run
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["cartiq"]
    assert pyproject["project"]["scripts"]["cartiq"] == "cartiq.cli:main"


def test_docs_show_the_gpu_batch_command():
    doc = (ROOT / "docs" / "batch.md").read_text(encoding="utf-8")
    assert re.search(r"docker run [^\n]*--gpus all[^\n]*-v /data:/data[^\n]*batch "
                     r"/data/manifest\.csv -o /data/out", doc)
    assert "BASE_IMAGE=python:3.11-slim" in doc


def test_files_the_build_reads_are_in_the_image(pyproject):
    """The wheel build reads the readme and the license files named in pyproject: each is
    copied before the wheel is built and not excluded from the build context."""
    ins = _instructions()
    copied = {part for op, rest in ins if op == "COPY" for part in rest.split()[:-1]}
    needed = [pyproject["project"]["readme"], *pyproject["project"]["license-files"]]
    assert pyproject["project"]["license"] == "Apache-2.0"
    for name in needed:
        assert (ROOT / name).is_file(), name
        assert name in copied, f"{name} is not copied into the image"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert not set(needed) & set(ignore)


def test_every_shipped_data_folder_is_a_listed_package(pyproject):
    """setuptools ignores (and warns about) a folder of package data that is not listed in
    `packages`: every model package under models/ (a folder with metadata.json), the label
    maps and the report templates must be listed, each with its own package-data."""
    tool = pyproject["tool"]["setuptools"]
    packages, data = set(tool["packages"]), tool["package-data"]
    expected = {"cartiq.report.templates", "cartiq.resources.configs.label_maps"}
    expected |= {f"cartiq.resources.models.{p.parent.name}"
                 for p in (ROOT / "models").glob("*/metadata.json")}
    for name in expected:
        assert name in packages, f"{name} is not in [tool.setuptools] packages"
        assert data.get(name), f"{name} has no package-data"
