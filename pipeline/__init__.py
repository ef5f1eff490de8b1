"""cartiq: knee MRI cartilage quantification.

Importing the package is cheap: heavy dependencies (torch, MONAI, SimpleITK) are imported
by the stage modules that need them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cartiq")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
