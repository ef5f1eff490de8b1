"""Baseline vs follow-up: bone-wise rigid registration, change maps and tables, defect and
lesion tracking, smallest detectable change.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "compare": ["CompareConfig", "CompareResult", "compare_scans", "compare_inputs", "load_compare_config", "CHANGE_COLUMNS"],
        "register": ["register_bone", "register_visits", "BoneRegistration"],
    },
)
