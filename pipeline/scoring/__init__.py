"""MOCART-like repair scoring of repair sites from a measured scan.

Names below are imported on first use (``lazy_loader``), so importing this package is cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submod_attrs={
        "mocart": ["ScoringConfig", "ScoreResult", "ScoreRun", "score_sites", "run_score", "load_scoring_config", "CSV_COLUMNS"],
    },
)
