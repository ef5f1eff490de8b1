"""Trials from a manifest: checked manifests, resumable runs on a process pool or a Dask
cluster, per-subject comparisons, cohort tables.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "batch": ["BatchOptions", "BatchResult", "run_batch"],
        "manifest": ["Manifest", "read_manifest_csv"],
        "cohort": ["write_cohort_tables"],
    },
)
