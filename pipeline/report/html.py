"""HTML building blocks shared by the subject and cohort reports (self-contained pages:
figures are embedded as PNG data URIs, every value is escaped).

The page shell and the tables are jinja2 templates (``report/templates``) rendered with
autoescaping: values are escaped by the template engine; only HTML that the report code
built itself (sections, the CSS) is passed in as :class:`markupsafe.Markup`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from markupsafe import Markup

__all__ = ["ReportResult", "esc", "png_data_uri", "file_data_uri", "html_table", "html_page",
           "guarded", "CSS"]

log = logging.getLogger(__name__)


@dataclass
class ReportResult:
    path: Path | None
    errors: list[str] = field(default_factory=list)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1500px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:2px solid #446;
padding-bottom:3px;margin-top:30px}h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 12px}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#e8eaf2}
td:first-child,th:first-child,td:nth-child(2){text-align:left}
tr.hi td{background:#fff1c9}.muted{color:#777}.err{color:#a00}
.pass{color:#060;font-weight:bold}.warn{color:#b60;font-weight:bold}.fail{color:#c00;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:18px}.card{border:1px solid #ccd;padding:8px 12px;border-radius:6px}
img{max-width:100%}details{margin:8px 0}summary{cursor:pointer;color:#335}
.meta td{text-align:left;font-family:monospace;font-size:11.5px;word-break:break-all}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def png_data_uri(fig) -> str:
    """Render a matplotlib Figure (Agg) to a base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _fmt(v: Any) -> str:
    """A table cell's text (numbers rounded, non-finite as empty); escaped by the template."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    if not np.isfinite(f):
        return ""
    f = f + 0.0 if f != 0 else 0.0  # no "-0"
    return f"{f:.0f}" if abs(f) >= 1000 or f.is_integer() else f"{f:.3g}" if abs(f) < 0.01 else f"{f:.2f}"


@lru_cache(maxsize=1)
def _templates():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("cartiq.report", "templates"),
                       autoescape=select_autoescape(default_for_string=True, default=True),
                       undefined=StrictUndefined, keep_trailing_newline=False)


def _render(name: str, **values: Any) -> str:
    return str(_templates().get_template(name).render(**values)).strip()


def html_table(rows: list[dict[str, Any]], columns: list[str] | None = None,
               highlight: Callable[[dict[str, Any]], bool] | None = None,
               headers: dict[str, str] | None = None) -> str:
    columns = columns or (list(rows[0]) if rows else [])
    body = [{"highlight": bool(highlight and highlight(r)),
             "cells": [_fmt(r.get(c)) for c in columns]} for r in rows]
    # a plain str: callers concatenate it with their own HTML
    return _render("table.html.j2", rows=body, headers=[(headers or {}).get(c, c) for c in columns])


def html_page(title: str, sections: list[str]) -> str:
    """A whole page; ``sections`` are HTML fragments built (and escaped) by the report code."""
    from cartiq._version import __version__

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return _render("page.html.j2", title=title, css=Markup(CSS), version=__version__,
                   generated=now, sections=[Markup(s) for s in sections])


def guarded(errors: list[str], what: str, fn: Callable[[], str]) -> str:
    """Run a figure/section builder; on failure log it and return a visible note."""
    try:
        return fn()
    except Exception as exc:  # reports never fail the analysis
        log.warning("report: %s failed: %s", what, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        errors.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
        return f"<p class='err'>{esc(what)} could not be drawn ({esc(type(exc).__name__)}: {esc(exc)})</p>"
