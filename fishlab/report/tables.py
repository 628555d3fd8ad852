"""Small HTML tables for reports (no pandas needed); each returns an object Jupyter displays as HTML."""
from __future__ import annotations

import html
from typing import Any, Callable, Sequence


class HTML(str):
    """A string that Jupyter renders as HTML."""

    def _repr_html_(self) -> str:
        return str(self)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.3f} {unit}"
    return f"{n:,.0f} B"


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.{digits - 1}e}"
        return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.1f}"
    return str(x)


def table(rows: Sequence[dict], columns: Sequence[str | tuple] | None = None, caption: str | None = None) -> HTML:
    """rows: dicts; columns: keys, or (key, header) / (key, header, formatter) tuples."""
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    cols: list[tuple[str, str, Callable]] = []
    for c in columns:
        if isinstance(c, str):
            cols.append((c, c, fmt_num))
        else:
            key, head, *f = c
            cols.append((key, head, f[0] if f else fmt_num))
    out = ['<table class="fishlab-table" style="border-collapse:collapse;font-size:0.9em">']
    if caption:
        out.append(f'<caption style="text-align:left;font-weight:bold;padding:4px 0">{html.escape(caption)}</caption>')
    out.append("<thead><tr>" + "".join(
        f'<th style="text-align:left;border-bottom:2px solid #444;padding:3px 8px">{html.escape(h)}</th>'
        for _, h, _ in cols) + "</tr></thead><tbody>")
    for r in rows:
        cells = []
        for key, _, f in cols:
            v = r.get(key)
            right = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td style="padding:2px 8px;border-bottom:1px solid #ddd;'
                         f'text-align:{"right" if right else "left"}">{html.escape(f(v))}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return HTML("".join(out))


def note(text: str, kind: str = "info") -> HTML:
    """A highlighted paragraph (e.g. 'these weights are synthetic')."""
    color = {"info": "#e8f0fe", "warn": "#fff4e5", "error": "#fdecea"}[kind]
    return HTML(f'<div style="background:{color};padding:8px 12px;border-radius:4px;margin:6px 0">'
                f'{html.escape(text)}</div>')
