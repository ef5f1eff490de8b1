# Sourced by sample.sh and test.sh: create .venv if needed, activate it, install cartiq.
# Usage: . scripts/setup.sh [PIP_TARGET]   (default ".", e.g. ".[test]")
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned: the CPU wheel 2.13.0 (a looser request could pull a CUDA build)
python -m pip install -q "torch==2.13.0"
# everything else with the same pin (scripts/constraints.txt), extras included (e.g. nnunet)
python -m pip install -q -c scripts/constraints.txt -e "${1:-.}"
