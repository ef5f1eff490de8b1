#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment outside the checkout, and use
# it as a new user would: `cartiq phantom`, `cartiq measure`, `cartiq run`, `import cartiq`
# (and `import pipeline` must fail).  Called by scripts/test.sh; runs on its own too.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/cartiq-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$root" 2>&1 | grep -v "^WARNING: Location" || true
wheel=$(ls "$work"/dist/cartiq-*.whl)
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first, pinned to the CPU wheel (a looser request could pull a CUDA build)
"$work/venv/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$work/venv/bin/python" -m pip install -q "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
cd "$work"
export PATH="$work/venv/bin:$PATH"
python - <<'PY'
import importlib.util, pathlib, sys
import cartiq
here = pathlib.Path(cartiq.__file__).resolve()
assert "site-packages" in str(here), here
assert importlib.util.find_spec("pipeline") is None, "a top-level pipeline module is installed"
from cartiq._resources import resource_dir
for name in ("configs", "models", "sample_data"):
    assert resource_dir(name).is_dir() and "site-packages" in str(resource_dir(name)), name
print("wheel: import cartiq from", here.parent)
PY
cartiq -q phantom ph > /dev/null
cartiq -q measure ph/image.nii.gz --seg ph/seg.nii.gz -o measured > /dev/null
test -f measured/manifest.json
# the phantom has no fibula and no femoral shaft: its anatomy gives no side, so it is given
cartiq -q run ph/image.nii.gz -o segmented --side right --device cpu > /dev/null
test -f segmented/manifest.json -a -f segmented/measurements.csv
python -m cartiq version > /dev/null
echo "wheel check passed: $(basename "$wheel") installed outside the checkout runs phantom, measure and run"
