"""Measurement of one scan from its label map: cartilage thickness on sub-voxel surfaces,
subregions, denuded and partial defects, bone-marrow lesions, QC, and the output folder.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "measure": ["MeasureResult", "PlateResult", "Defect", "Lesion", "MeasureRun", "measure_labels", "run_measure", "METRIC_UNITS"],
        "outputs": ["MEASUREMENT_COLUMNS", "DEFECT_COLUMNS", "LESION_COLUMNS"],
        "qc": ["QCFlag", "QCResult", "qc_checks", "write_qc"],
        "run": ["run_file"],
    },
)
