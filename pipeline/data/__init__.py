"""Data to try cartiq on: knee phantoms with analytic ground truth and the public real
samples (fetched into a cache, or from a local mirror).

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "phantom": ["PhantomSpec", "Phantom", "make_phantom", "write_phantom"],
        "fetch": ["fetch_sample", "list_samples", "sample_info"],
    },
)
