"""Reading and writing scans and results: volumes with geometry (NIfTI, NRRD, MHA, DICOM),
label schemes and mappings, trial vocabulary, and the output-folder contract.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "volume": ["Geometry", "Volume", "read_volume", "write_volume", "check_same_geometry", "sha256_file"],
        "labels": ["LabelScheme", "LabelMapping", "default_scheme", "load_mapping", "to_default_scheme", "infer_side", "PLATES", "BONES"],
        "dicom": ["list_series", "side_from_header"],
        "outputs": ["is_complete", "read_manifest"],
        "trial": ["stage_group", "is_baseline_name", "timepoint_sort_key"],
    },
)
