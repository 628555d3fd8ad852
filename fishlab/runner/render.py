"""Stage 4, render: an executed notebook -> one self-contained HTML page (no CDN, images inline)."""
from __future__ import annotations

import copy
import logging
import re

# The lab template minus everything that loads from a CDN (require.js, MathJax, mermaid, widget manager).
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
_EXTERNAL_SCRIPT_RE = re.compile(
    r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>.*?</script\s*>", re.I | re.S)
_EXTERNAL_LINK_RE = re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I)
_WIDGET_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


def strip_external_resources(html_text: str) -> str:
    """Remove <script src=http...> and <link href=http...> tags (a safety net behind the offline template)."""
    return _EXTERNAL_LINK_RE.sub("", _EXTERNAL_SCRIPT_RE.sub("", html_text))


def render_html(nb, show_code: bool = False, title: str | None = None) -> str:
    """A self-contained HTML page for an executed notebook: lab template, images inline as base64, no
    external scripts or stylesheets, no widget JS; code cells hidden unless `show_code`."""
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for c in nb.cells:
        for o in c.get("outputs", []):
            data = o.get("data")
            if data:
                for m in _WIDGET_MIME:
                    data.pop(m, None)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    quiet = logging.getLogger("fishlab.runner.nbconvert")   # e.g. "Alternative text is missing on 1 image(s)"
    quiet.setLevel(logging.ERROR)
    exporter.log = quiet
    exporter.raw_template = _OFFLINE_TEMPLATE
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    if not show_code:
        exporter.exclude_input = True
        exporter.exclude_input_prompt = True
        exporter.exclude_output_prompt = True
    resources = {"metadata": {"name": title}} if title else None
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    return strip_external_resources(body)
