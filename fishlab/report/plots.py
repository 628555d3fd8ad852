"""Figures for reports. Each function takes results (plain dicts) and returns a matplotlib Figure;
nothing here computes results."""
from __future__ import annotations

import matplotlib.pyplot as plt

COMPONENT_COLORS = {"slow_ar": "#1f77b4", "fast_ar": "#ff7f0e", "embeddings": "#2ca02c", "norms": "#9467bd",
                    "codec": "#8c564b", "tied_head": "#2ca02c", "embedding_rows": "#98df8a"}


def param_breakdown(group_totals: dict[str, dict], title: str = "Parameters by group") -> plt.Figure:
    """Horizontal bars of parameters per manifest group (transformer and codec)."""
    items = sorted(group_totals.items(), key=lambda kv: kv[1]["params"])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(items) + 1.2))
    names = [k for k, _ in items]
    vals = [v["params"] / 1e6 for _, v in items]
    ax.barh(names, vals, color="#4c72b0")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,.1f}M", va="center", fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_title(title)
    ax.margins(x=0.15)
    fig.tight_layout()
    return fig


def sizes_by_component(estimates: list[dict], title: str = "Checkpoint size by component") -> plt.Figure:
    """Stacked bars (GB) per estimate (bf16, each phase, each GGUF type)."""
    comps = [c for c in ("slow_ar", "fast_ar", "embeddings", "norms", "codec")
             if any(c in e["per_component"] for e in estimates)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [e["label"] for e in estimates]
    bottom = [0.0] * len(estimates)
    for c in comps:
        vals = [e["per_component"].get(c, 0) / 1e9 for e in estimates]
        ax.bar(labels, vals, bottom=bottom, label=c, color=COMPONENT_COLORS.get(c))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GB (10^9 bytes)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    return fig


def published_vs_computed(rows: list[dict], title: str = "Published vs computed size") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    names = [r["published"] for r in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["published_gb"] for r in rows], height=0.4, label="published", color="#999")
    ax.barh([i - 0.2 for i in y], [r["fishlab_gb"] for r in rows], height=0.4, label="fishlab (plan layout)",
            color="#4c72b0")
    ax.scatter([r["likely_layout_gb"] for r in rows], list(y), marker="|", s=200, color="#d62728",
               label="best-fitting layout", zorder=3)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def traffic(traffic_per_frame: dict[str, dict], frames_per_second: float,
            title: str = "Weight bytes read per generated frame (batch 1)") -> plt.Figure:
    keys = ["slow_ar", "tied_head", "fast_ar", "embedding_rows", "norms"]
    names = list(traffic_per_frame)
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(names)
    for k in keys:
        vals = [traffic_per_frame[n][k] / 1e9 for n in names]
        ax.bar(names, vals, bottom=bottom, label=k, color=COMPONENT_COLORS.get(k))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GB per frame")
    ax2 = ax.secondary_yaxis("right", functions=(lambda g: g * frames_per_second, lambda r: r / frames_per_second))
    ax2.set_ylabel("GB/s needed for real time")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
