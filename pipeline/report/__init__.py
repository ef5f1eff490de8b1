"""Human-readable outputs: the subject report.html and the batch cohort.html.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "scan": ["write_subject_report", "find_folders"],
        "cohort": ["write_cohort_report"],
    },
)
