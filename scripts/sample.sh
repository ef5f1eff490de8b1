#!/usr/bin/env bash
# Set up .venv, make the bundled sample (a seeded knee phantom with analytic truth),
# run the pipeline on it, and print where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh .
out=out/sample
python sample_data/generate.py sample_data/generated --seed 0 >/dev/null
cartiq measure sample_data/generated/image.nii.gz --seg sample_data/generated/seg.nii.gz -o "$out/measure" >/dev/null
# the full pipeline: segment with the default model (synthetic-trained prototype), then measure
cartiq -q run sample_data/generated/image.nii.gz --side right -o "$out/run" >/dev/null
echo "Measured with the phantom's own label map (measure) and with the default model (run):"
python sample_data/check_truth.py sample_data/generated/truth.json "$out/measure" "$out/run"
echo "Sample results: $(pwd)/$out/measure and $(pwd)/$out/run (measurements.csv, defects.csv, lesions.csv, thickness.nii.gz, segmentation.nii.gz, meshes/, qc.png, manifest.json)"
echo "Ground truth of the phantom: $(pwd)/sample_data/generated/truth.json"
