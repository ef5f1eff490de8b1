"""cartiq: knee MRI cartilage quantification.

The public face (see ``docs/api.md``)::

    import cartiq
    scan = cartiq.measure("knee.nii.gz", "labels.nii.gz", side="right")
    scan.measurements            # pandas DataFrame, the measurements.csv columns
    scan.save("out/knee")        # the same folder as `cartiq measure`

Importing the package is cheap: the stage functions and their heavy dependencies (torch,
MONAI, SimpleITK, pandas) load on first use.
"""

import lazy_loader as _lazy

from cartiq._version import __version__

__getattr__, __dir__, _names = _lazy.attach(
    __name__,
    submodules=["errors"],
    submod_attrs={"_api": ["read_volume", "segment", "measure", "score", "compare",
                           "run_batch", "ScanResult", "ChangeResult"]},
)
__all__ = ["__version__", *_names]
