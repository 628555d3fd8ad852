"""Figures for reports. Each function takes results (plain dicts) and returns a matplotlib Figure;
nothing here computes results."""
from __future__ import annotations

import math

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


PROJ_ORDER = ("wqkv", "wo", "w1", "w3", "w2", "output")


def layer_errors(rows: list[dict], metric: str = "rel_fro", title: str | None = None) -> plt.Figure:
    """One line per projection: the metric against the layer index, slow and fast AR side by side."""
    comps = [c for c in ("slow_ar", "fast_ar") if any(r["component"] == c for r in rows)]
    fig, axes = plt.subplots(1, len(comps), figsize=(11, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1][:len(comps)]})
    for ax, comp in zip(axes[0], comps):
        for proj in PROJ_ORDER:
            pts = sorted((r["layer"] if r["layer"] is not None else -1, r[metric]) for r in rows
                         if r["component"] == comp and r["projection"] == proj)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=proj)
        ax.set_title(f"{comp}")
        ax.set_xlabel("layer (-1 = fast output head)" if comp == "fast_ar" else "layer")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=3)
    fig.suptitle(title or f"{metric} per layer and projection")
    fig.tight_layout()
    return fig


def error_histograms(metrics: dict[str, dict], names: list[str], cols: int = 6,
                     title: str = "Reconstruction error histograms") -> plt.Figure:
    """Small multiples: the stored error histogram of each named tensor (x in units of its own max error)."""
    rows_n = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.1 * cols, 1.6 * rows_n), squeeze=False, sharex=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        h = metrics[name]["hist"]
        n = len(h["counts"])
        xs = [-1 + (2 * i + 1) / n for i in range(n)]
        ax.set_visible(True)
        ax.bar(xs, h["counts"], width=2 / n, color="#4c72b0")
        ax.set_yscale("log")
        short = name.replace("text_model.model.", "").replace("audio_decoder.", "fast.").replace(".weight", "")
        ax.set_title(f"{short}\nmax {h['range']:.2g}", fontsize=6)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(rows: list[dict], metric: str = "rel_fro", component: str = "slow_ar",
            title: str | None = None, vmax: float | None = None) -> plt.Figure:
    """Layer x projection grid of one metric."""
    rows = [r for r in rows if r["component"] == component and r["layer"] is not None]
    layers = sorted({r["layer"] for r in rows})
    projs = [p for p in PROJ_ORDER if any(r["projection"] == p for r in rows)]
    grid = [[float("nan")] * len(layers) for _ in projs]
    for r in rows:
        grid[projs.index(r["projection"])][layers.index(r["layer"])] = r[metric]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(layers) + 2), 0.45 * len(projs) + 1.4))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_yticks(range(len(projs)), projs)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title or f"{metric}: {component} layer x projection")
    fig.tight_layout()
    return fig


def weight_scatter(pairs: dict[str, dict], title: str = "Weight vs reconstruction") -> plt.Figure:
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.2), squeeze=False)
    for ax, (name, p) in zip(axes[0], pairs.items()):
        ax.scatter(p["w"], p["w_hat"], s=2, alpha=0.4)
        lo, hi = min(p["w"]), max(p["w"])
        ax.plot([lo, hi], [lo, hi], color="red", lw=0.8)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("original")
        ax.set_ylabel("reconstructed")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def pareto(points: list[tuple[float, float]], labels: list[str], front: list[int], xlabel: str, ylabel: str,
           title: str, logy: bool = False) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="#4c72b0", zorder=3)
    for (x, y), lab in zip(points, labels):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="#d62728", lw=1,
                label="Pareto front")
        ax.legend(fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def kl_vs_bits(rows: list[dict], anchors: dict | None = None,
               title: str = "Trained model: KL vs stored bits per weight") -> plt.Figure:
    """fishlab phases (bits_per_weight, kl_mean, phase) as points; llama.cpp's published per-type mean KL
    (anchors['types']: name, bpw, kl_mean) as grey context markers. Log KL axis."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    pts: dict[tuple, list[str]] = {}              # phases with the same result share one labelled point
    for r in rows:
        if r.get("kl_mean") and r["kl_mean"] > 0:
            pts.setdefault((r["bits_per_weight"], r["kl_mean"]), []).append(r["phase"])
    ax.scatter([x for x, _ in pts], [y for _, y in pts], color="#4c72b0", zorder=3,
               label="fishlab phases on the trained proxy")
    for (x, y), names in pts.items():
        ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if anchors:
        t = anchors["types"]
        ax.scatter([a["bpw"] for a in t], [a["kl_mean"] for a in t], marker="x", color="#888", zorder=2,
                   label=f"llama.cpp, {anchors['model']} (context)")
        for a in t:
            ax.annotate(a["name"], (a["bpw"], a["kl_mean"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="#666")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per quantized weight (scales included)")
    ax.set_ylabel("mean KL(base || phase), nats/token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def group_bars(rows: list[dict], key: str = "slow_kl_mean", title: str = "Only this group quantized") -> plt.Figure:
    """One bar per layer group (rows: group, <key>): which layers hurt."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar([r["group"] for r in rows], [r[key] for r in rows], color="#4c72b0")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    return fig


QUANTIZER_COLORS = {"rtn": "#4c72b0", "mse": "#dd8452", "hqq": "#55a868", "gptq": "#c44e52"}


def methods_pareto(rows: list[dict], front: list[int] | None = None,
                   title: str = "Trained model: size vs KL, every method") -> plt.Figure:
    """Every measured phase (rows: bits_per_weight, kl_mean, phase, quantizer, zero_point, overrides) as a point
    coloured by quantizer (hollow = zero points, a square = mixed precision), the Pareto front as a line. Log KL."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    seen = set()
    for r in rows:
        if not r.get("kl_mean") or r["kl_mean"] <= 0:
            continue
        q = r.get("quantizer", "rtn")
        c = QUANTIZER_COLORS.get(q, "#777")
        label = None if q in seen else q
        seen.add(q)
        ax.scatter([r["bits_per_weight"]], [r["kl_mean"]], marker="s" if r.get("overrides") else "o", s=36,
                   facecolors="none" if r.get("zero_point") else c, edgecolors=c, zorder=3, label=label)
        ax.annotate(r["phase"], (r["bits_per_weight"], r["kl_mean"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    if front:
        ax.plot([rows[i]["bits_per_weight"] for i in front], [rows[i]["kl_mean"] for i in front], color="#999",
                lw=1, zorder=2, label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (scales and zero points included; kept linears at 16)")
    ax.set_ylabel("mean KL(base || phase), nats/token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="quantizer (hollow: zero points, square: mixed)", title_fontsize=7)
    fig.tight_layout()
    return fig
