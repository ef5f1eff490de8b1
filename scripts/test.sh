#!/usr/bin/env bash
# Set up a virtual environment with everything cartiq needs, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh ".[test,nnunet]"   # nnunet: the nnU-Net tests run in CI too
# headless Chromium for the HTML report screenshot tests (skipped when it cannot be installed)
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
    >/dev/null 2>&1 || echo "note: chromium not installed; report screenshot tests will skip"
fi
# public sample data: a local mirror (CI has ../shared/data) instead of downloading
if [ -z "${CARTIQ_DATA_MIRROR:-}" ] && [ -d ../shared/data ]; then
  export CARTIQ_DATA_MIRROR="$(cd ../shared/data && pwd)"
fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
# the wheel, installed outside the checkout, works on its own (skip with CARTIQ_SKIP_WHEEL_CHECK=1)
if [ "${CARTIQ_SKIP_WHEEL_CHECK:-0}" != 1 ]; then bash scripts/wheel_check.sh; fi
