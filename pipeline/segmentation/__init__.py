"""Segmentation: model packages, the segmenter (canonical grid, sliding window, device and
mixed precision), anatomical clean-up, intensity BML detection, and training.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "segmenter": ["Segmenter", "SegmentResult", "segment_file", "select_device", "check_knee_like"],
        "models": ["list_models", "resolve_model", "load_model", "read_metadata", "DEFAULT_MODEL"],
        "bml": ["detect_bml", "apply_bml"],
        "train": ["train"],
        "soup": ["average_checkpoints"],
    },
)
