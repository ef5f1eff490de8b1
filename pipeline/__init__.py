"""cartiq: knee MRI cartilage quantification.

Importing the package is cheap: heavy dependencies (torch, MONAI, SimpleITK) are imported
by the stage modules that need them.
"""

from cartiq._version import __version__

__all__ = ["__version__"]
