"""The simulated-trial section of ``cohort.html``: planted vs recovered change.

Rendered only when the batch folder holds a ``planted_vs_recovered.csv`` (written by
``cartiq demo trial``, columns :data:`cartiq.demo_recovery.TABLE_COLUMNS`); real trials'
reports are unchanged.  ``sample_size.csv`` is shown too when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cartiq.report.html import esc, guarded, html_table, png_data_uri

__all__ = ["recovery_figure", "trial_demo_section"]

_GROUPS = [("MSC", "early"), ("placebo", "early"), ("MSC", "late"), ("placebo", "late")]
_COLOURS = {"MSC": "#4c72b0", "placebo": "#dd8452"}


def recovery_figure(table: pd.DataFrame) -> Any:
    """One panel per outcome: planted (open) and recovered (filled, +-SD) mean change per
    arm x stage group."""
    from matplotlib.figure import Figure

    panels = table[["outcome", "structure", "unit"]].drop_duplicates().itertuples(index=False)
    panels = list(panels)
    ncol = 4
    nrow = int(np.ceil(len(panels) / ncol))
    fig = Figure(figsize=(4.2 * ncol, 3.4 * nrow), dpi=72)
    for i, (outcome, structure, unit) in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        sel = table[(table["outcome"] == outcome) & (table["structure"] == structure)]
        for j, (arm, group) in enumerate(_GROUPS):
            r = sel[(sel["arm"] == arm) & (sel["stage_group"] == group)]
            if not len(r):
                continue
            r = r.iloc[0]
            sd = float(r["recovered_sd_change"]) if pd.notna(r["recovered_sd_change"]) else 0.0
            ax.errorbar(j + 0.1, r["recovered_mean_change"], yerr=sd, fmt="o",
                        color=_COLOURS[arm], capsize=3, label="recovered (mean +- SD)" if j == 0 else None)
            ax.plot(j - 0.1, r["planted_mean_change"], marker="D", mfc="white",
                    color=_COLOURS[arm], ls="none", label="planted (mean)" if j == 0 else None)
        ax.axhline(0, color="#999", lw=0.8, ls="--")
        ax.set_xticks(range(len(_GROUPS)))
        ax.set_xticklabels([f"{a}\n{g}" for a, g in _GROUPS], fontsize=8)
        ax.set_title(f"{outcome.replace('_', ' ')}: {structure.replace('_', ' ')} ({unit})",
                     fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("simulated trial: planted vs recovered 12-month change", fontsize=12)
    fig.tight_layout()
    return fig


def trial_demo_section(out_dir: Path, errors: list[str]) -> str:
    """HTML of the section ('' without ``planted_vs_recovered.csv``)."""
    path = Path(out_dir) / "planted_vs_recovered.csv"
    if not path.is_file():
        return ""
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        errors.append(f"{path}: {exc}")
        return ""
    ok = int(table["within_tolerance"].astype(str).str.lower().eq("true").sum())
    parts = ["<h2>Simulated trial: planted vs recovered change</h2>",
             f"<p>Every knee of this batch is a phantom with planted changes ({esc('truth.csv')}). "
             f"{ok} of {len(table)} mean changes were recovered within tolerance (10% of the "
             "planted mean, or 0.05 mm, 5 mm2, 25 mm3, 2 MOCART points). Rows "
             "<i>MSC - placebo</i> give the difference between the arms with its 95% CI "
             "(Welch t).</p>",
             guarded(errors, "planted vs recovered figure",
                     lambda: f"<img alt='planted vs recovered' src='{png_data_uri(recovery_figure(table))}'>"),
             html_table(table.to_dict("records"),
                        highlight=lambda r: str(r.get("within_tolerance")).lower() != "true")]
    sizes = Path(out_dir) / "sample_size.csv"
    if sizes.is_file():
        try:
            parts.append("<h3>Knees per arm for the published effects (two-sided alpha 0.05)</h3>"
                         + html_table(pd.read_csv(sizes).to_dict("records")))
        except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            errors.append(f"{sizes}: {exc}")
    return "".join(parts)
