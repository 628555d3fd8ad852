"""Stage 5, index: side files assigned to reports, run.json and index.html (rewritten after every change)."""
from __future__ import annotations

import html as _html
import time
import urllib.parse

from ..io import write_json_atomic, write_text_atomic
from .results import RUN_STATUS_FILE, STATUS_RUNNING, RunResult, first_line, iso_to_ts


def assign_side_files(result: RunResult) -> None:
    run_dir = result.run_dir
    files = sorted(p for p in run_dir.glob("*.json") if p.is_file() and p.name != RUN_STATUS_FILE
                   and not p.name.startswith("."))
    by_name = sorted(result.reports, key=lambda r: -len(r.name))   # longest prefix first
    windows = []
    for r in result.reports:
        a, b = iso_to_ts(r.started), iso_to_ts(r.finished)
        if r.name in result.executed and a is not None:
            windows.append((r, a, b if b is not None else time.time()))
    for r in result.reports:
        if not r.previous:
            r.side_files = []
    other = []
    for p in files:
        mtime = p.stat().st_mtime
        owner = next((r for r in by_name if p.name.startswith(r.name + ".")), None)
        if owner is None:
            owner = next((r for r, a, b in windows if a <= mtime <= b), None)
        if owner is None or owner.previous:
            if owner is None:
                other.append({"name": p.name, "stale": True})
            continue
        start = iso_to_ts(owner.started)
        stale = owner.name not in result.executed or start is None or mtime < start
        owner.side_files.append({"name": p.name, "stale": bool(stale)})
    result.other_files = other


def write_status(result: RunResult) -> None:
    write_json_atomic(result.run_dir / RUN_STATUS_FILE, result.to_dict())
    write_text_atomic(result.run_dir / "index.html", render_index(result))


_INDEX_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#1f2328;background:#fff}
h1{font-size:1.5em;margin:0 0 .2em} .meta{color:#57606a;margin-bottom:1.2em;font-size:.9em}
table{border-collapse:collapse;width:100%;font-size:.92em} th,td{border-bottom:1px solid #d0d7de;
padding:.45em .6em;text-align:left;vertical-align:top} th{background:#f6f8fa}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.1em .55em;border-radius:1em;font-weight:600;font-size:.85em;white-space:nowrap}
.s-ok{background:#dafbe1;color:#1a7f37} .s-failed,.s-interrupted{background:#ffebe9;color:#b42318}
.s-timeout{background:#fff4d6;color:#9a6700} .s-dead-kernel{background:#f3e8fd;color:#6e1fb4}
.s-running{background:#ddf4ff;color:#0969da} .s-queued,.s-not-run{background:#eaeef2;color:#57606a}
.s-cancelled,.s-preempted{background:#eaeef2;color:#24292f;border:1px solid #8c959f}
pre{white-space:pre-wrap;margin:.3em 0 0;font-size:.85em;background:#f6f8fa;padding:.4em;border-radius:4px}
.stale{color:#8c959f} .prev{color:#8c959f;font-size:.85em} a{color:#0969da}
ul.files{margin:0;padding-left:1.1em}
"""


def _link(name: str | None, label: str) -> str:
    if not name:
        return ""
    return f'<a href="{_html.escape(urllib.parse.quote(name))}">{_html.escape(label)}</a>'


def render_index(result: RunResult) -> str:
    e = _html.escape
    ex = [r for r in result.reports if r.name in result.executed]
    counts: dict[str, int] = {}
    for r in ex:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    rows = []
    for i, r in enumerate(result.reports, 1):
        cls = "s-" + r.status.replace(" ", "-")
        dur = f"{r.duration_s:.1f} s" if r.duration_s is not None else ""
        links = " &middot; ".join(x for x in (_link(r.html, "html"), _link(r.ipynb, "ipynb")) if x)
        if r.job:
            j = r.job
            logs = " ".join(x for x in (_link(j.get("stdout"), "stdout"), _link(j.get("stderr"), "stderr")) if x)
            links += (f'<div class="prev">{e(j.get("executor", ""))} job {e(str(j.get("id", "")))}'
                      f'{" " + logs if logs else ""}</div>')
        files = ""
        if r.side_files:
            items = []
            for f in r.side_files:
                note = ' <span class="stale">(stale: from an earlier run)</span>' if f.get("stale") else ""
                items.append(f"<li>{_link(f['name'], f['name'])}{note}</li>")
            files = '<ul class="files">' + "".join(items) + "</ul>"
        reason = ""
        if r.reason:
            rs = r.reason
            head = f"{rs.get('type') or ''}: {first_line(rs.get('message'))}"
            cell = rs.get("cell_index")
            if cell is not None:
                head += f" (cell {cell})"
            tail = rs.get("tail") or ""
            reason = (f"<details><summary>{e(head)}</summary><pre>{e(tail)}</pre></details>" if tail
                      else e(head))
        if r.warnings:
            reason += "".join(f'<div class="prev">warning: {e(w)}</div>' for w in r.warnings)
        prev = ' <span class="prev">(from an earlier run)</span>' if r.previous else ""
        rows.append(
            f'<tr id="{e(r.name)}"><td class="num">{i}</td><td>{e(r.name)}{prev}</td>'
            f'<td><span class="badge {cls}">{e(r.status)}</span></td><td class="num">{dur}</td>'
            f"<td>{links}</td><td>{files}</td><td>{reason}</td></tr>")
    other = ""
    if result.other_files:
        other = ("<h2>Run-wide files</h2><ul>" + "".join(
            f"<li>{_link(f['name'], f['name'])}</li>" for f in result.other_files) + "</ul>")
    refresh = '<meta http-equiv="refresh" content="15">' if result.status == STATUS_RUNNING else ""
    run_cls = "s-" + result.status.replace(" ", "-")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>fishlab run {e(result.run_name)}: {e(result.status)}</title>
<style>{_INDEX_CSS}</style></head>
<body>
<h1>fishlab run <code>{e(result.run_name)}</code> <span class="badge {run_cls}">{e(result.status)}</span></h1>
<div class="meta">params: <code>{e(str(result.params_file))}</code> &middot; executor {e(result.executor)}
&middot; started {e(result.started or "")}
{("&middot; finished " + e(result.finished)) if result.finished else ""} &middot; {e(summary)}
&middot; {_link(RUN_STATUS_FILE, RUN_STATUS_FILE)}</div>
<table>
<thead><tr><th>#</th><th>report</th><th>status</th><th>duration</th><th>open</th><th>side files</th>
<th>reason</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{other}
</body></html>
"""
