"""Report figures: matplotlib (Agg, no pyplot state) PNG ``data:`` URIs and inline SVG charts.

Curve figures (randomization cascade, deletion/insertion) are matplotlib PNGs returned as
``data:`` URIs; the per-pathology charts (method comparison, IoU distribution) are small inline SVG
built here directly (vector, a few kB, and no matplotlib cost per pathology), every text escaped.
Each function returns ``None`` when there is nothing to draw. Nothing is recomputed beyond means
of stored per-image values for curves.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from markupsafe import Markup, escape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from audit.store.files import float_or_nan

from .gallery import data_uri

DPI = 100
METHOD_COLOURS = {
    "gradcam": "#1f77b4",
    "gradcampp": "#ff7f0e",
    "integrated_gradients": "#2ca02c",
    "random": "#8c8c8c",
    "centre_prior": "#b5a642",
    "average_box": "#9467bd",
}
_EXTRA = ["#d62728", "#17becf", "#e377c2", "#7f7f7f", "#bcbd22", "#8c564b"]


def method_colour(method: str, i: int = 0) -> str:
    return METHOD_COLOURS.get(method, _EXTRA[i % len(_EXTRA)])


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return data_uri(buf.getvalue(), "image/png")


# ---- per-pathology charts as inline SVG (vector, tiny, fast: no matplotlib per pathology) ----

SVG_LABEL_W = 190
SVG_PANEL_W = 240
SVG_ROW_H = 24
SVG_TOP = 34
SVG_BOTTOM = 30
SVG_GAP = 26


def _x(v: float, x0: float, w: float, lo: float = 0.0, hi: float = 1.0) -> float:
    f = (v - lo) / (hi - lo)
    return round(x0 + max(0.0, min(1.0, f)) * w, 1)


def _svg_axes(parts: list[str], x0: float, w: float, top: float, bottom: float, title: str,
              lo: float = 0.0, hi: float = 1.0):
    parts.append(f'<text x="{x0 + w / 2:.1f}" y="{SVG_TOP - 14}" class="t">{escape(title)}</text>')
    ticks = np.linspace(lo, hi, 5) if lo < 0 else (0, 0.25, 0.5, 0.75, 1.0)
    for t in ticks:
        x = _x(t, x0, w, lo, hi)
        parts.append(f'<line x1="{x}" y1="{top - 4}" x2="{x}" y2="{bottom}" class="g"/>')
        parts.append(f'<text x="{x}" y="{bottom + 14}" class="k">{t:g}</text>')
    parts.append(f'<rect x="{x0}" y="{top - 4}" width="{w}" height="{bottom - top + 4}" '
                 'class="f"/>')


SVG_STYLE = (
    "<style>.t{font:600 12px sans-serif;text-anchor:middle;fill:#1b1f24}"
    ".k{font:10px sans-serif;text-anchor:middle;fill:#5b6570}"
    ".ke{font:10px sans-serif;text-anchor:end;fill:#5b6570}"
    ".l{font:11px sans-serif;text-anchor:end;fill:#1b1f24}"
    ".b{font-style:italic;fill:#555}"
    ".g{stroke:#e3e7eb;stroke-width:1}.f{fill:none;stroke:#b8c0c8;stroke-width:1}"
    ".r{stroke:#000;stroke-width:1;stroke-dasharray:3 3}</style>"
)


def method_comparison_svg(
    rows: pd.DataFrame,
    labels: dict[str, str],
    kinds: dict[str, str] | None = None,
    reference: dict | None = None,
) -> Markup | None:
    """Dot-and-whisker chart of one pathology: mean IoU, pointing rate, IoBB hit rates (95% CI).

    ``rows``: the per_pathology rows of one pathology (methods then baselines).
    ``reference``: {"label", "thresholds", "values"} drawn as dotted vertical lines.
    """
    if rows is None or rows.empty:
        return None
    kinds = kinds or {}
    methods = [str(m) for m in rows["method"]]
    n = len(methods)
    top = SVG_TOP + (14 if reference is not None else 0)
    bottom = top + n * SVG_ROW_H
    width = SVG_LABEL_W + 3 * SVG_PANEL_W + 2 * SVG_GAP + 12
    height = bottom + SVG_BOTTOM + (18 if reference is not None else 0)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="method comparison">', SVG_STYLE]
    for i, m in enumerate(methods):
        y = top + (i + 0.5) * SVG_ROW_H
        cls = "l b" if kinds.get(m) == "baseline" else "l"
        parts.append(f'<text x="{SVG_LABEL_W - 8}" y="{y + 4:.1f}" class="{cls}">'
                     f'{escape(labels.get(m, m))}</text>')
    panels = (
        ("mean IoU (95% CI)", [("iou_mean", "iou_mean_lo", "iou_mean_hi", 0.0, "circle")]),
        ("pointing hit rate (95% CI)",
         [("pointing_rate", "pointing_lo", "pointing_hi", 0.0, "circle")]),
        ("IoBB hit rate at 0.1 ● 0.25 ■ 0.5 ▲",
         [(f"iobb_hit_{t}_rate", f"iobb_hit_{t}_lo", f"iobb_hit_{t}_hi", dy, shape)
          for t, dy, shape in (("0.1", -6, "circle"), ("0.25", 0, "square"),
                               ("0.5", 6, "triangle"))]),
    )
    recs = rows.to_dict("records")
    for p, (title, series) in enumerate(panels):
        x0 = SVG_LABEL_W + p * (SVG_PANEL_W + SVG_GAP)
        _svg_axes(parts, x0, SVG_PANEL_W, top, bottom, title)
        for i, r in enumerate(recs):
            colour = method_colour(str(r["method"]), i)
            yc = top + (i + 0.5) * SVG_ROW_H
            for col, lo, hi, dy, shape in series:
                v = float_or_nan(r.get(col))
                if not math.isfinite(v):
                    continue
                y = round(yc + dy, 1)
                vlo, vhi = float_or_nan(r.get(lo)), float_or_nan(r.get(hi))
                if math.isfinite(vlo) and math.isfinite(vhi):
                    a, b = _x(vlo, x0, SVG_PANEL_W), _x(vhi, x0, SVG_PANEL_W)
                    parts.append(f'<path d="M{a} {y}H{b}M{a} {y - 3}v6M{b} {y - 3}v6" '
                                 f'stroke="{colour}" stroke-width="1.5" fill="none"/>')
                x = _x(v, x0, SVG_PANEL_W)
                tip = escape(f"{labels.get(str(r['method']), r['method'])}: {col} = {v:.3f}")
                if shape == "circle":
                    parts.append(f'<circle cx="{x}" cy="{y}" r="3.6" fill="{colour}">'
                                 f'<title>{tip}</title></circle>')
                elif shape == "square":
                    parts.append(f'<rect x="{x - 3.2:.1f}" y="{y - 3.2:.1f}" width="6.4" '
                                 f'height="6.4" fill="{colour}"><title>{tip}</title></rect>')
                else:
                    parts.append(f'<path d="M{x} {y - 4:.1f}l4 7h-8z" fill="{colour}">'
                                 f'<title>{tip}</title></path>')
    if reference is not None:
        x0 = SVG_LABEL_W + 2 * (SVG_PANEL_W + SVG_GAP)
        for t, v in zip(reference["thresholds"], reference["values"], strict=False):
            x = _x(float(v), x0, SVG_PANEL_W)
            parts.append(f'<line x1="{x}" y1="{top - 4}" x2="{x}" y2="{bottom}" class="r"/>')
            parts.append(f'<text x="{x}" y="{top - 7}" class="k">{t:g}</text>')
        parts.append(f'<text x="{x0 + SVG_PANEL_W}" y="{bottom + 30}" class="ke">'
                     f'dotted: published, {escape(reference["label"])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def distribution_svg(
    panels: list[tuple[str, list[tuple[str, np.ndarray]]]],
    labels: dict[str, str],
    kinds: dict[str, str] | None = None,
    panel_w: int = 600,
    dots: bool = True,
    aria: str = "distribution",
) -> Markup | None:
    """Box plots side by side (one panel per title, one row per method): quartile box, median,
    5–95% whiskers, and optionally every value as a dot. Values outside [0, 1] widen the axis to
    [-1, 1]."""
    panels = [(t, [(m, v) for m, v in rows if v.size]) for t, rows in panels]
    panels = [(t, rows) for t, rows in panels if rows]
    if not panels:
        return None
    kinds = kinds or {}
    methods = list(dict.fromkeys(m for _, rows in panels for m, _ in rows))
    row_h = 30 if dots else 24
    top, bottom = SVG_TOP, SVG_TOP + len(methods) * row_h
    width = SVG_LABEL_W + len(panels) * (panel_w + SVG_GAP) + 10
    height = bottom + SVG_BOTTOM
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{escape(aria)}">', SVG_STYLE]
    counts = {m: max(v.size for _, rows in panels for mm, v in rows if mm == m) for m in methods}
    for i, m in enumerate(methods):
        yc = top + (i + 0.5) * row_h
        cls = "l b" if kinds.get(m) == "baseline" else "l"
        parts.append(f'<text x="{SVG_LABEL_W - 8}" y="{yc + 4:.1f}" class="{cls}">'
                     f'{escape(labels.get(m, m))} (n={counts[m]})</text>')
    rng = np.random.default_rng(0)
    for p, (title, rows) in enumerate(panels):
        x0 = SVG_LABEL_W + p * (panel_w + SVG_GAP)
        lo = -1.0 if any(float(np.nanmin(v)) < 0 for _, v in rows) else 0.0
        _svg_axes(parts, x0, panel_w, top, bottom, title, lo, 1.0)
        for m, v in rows:
            i = methods.index(m)
            colour = method_colour(m, i)
            yc = top + (i + 0.5) * row_h
            q05, q25, q50, q75, q95 = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
            X = [_x(q, x0, panel_w, lo) for q in (q05, q25, q50, q75, q95)]
            parts.append(f'<path d="M{X[0]} {yc:.1f}H{X[1]}M{X[3]} {yc:.1f}H{X[4]}" '
                         'stroke="#333" stroke-width="1"/>')
            parts.append(f'<rect x="{X[1]}" y="{yc - 7:.1f}" width="{max(X[3] - X[1], 0.5):.1f}"'
                         f' height="14" fill="{colour}" fill-opacity="0.18" stroke="{colour}">'
                         f'<title>{escape(labels.get(m, m))}: median {q50:.3f}, quartiles '
                         f'{q25:.3f}–{q75:.3f}</title></rect>')
            parts.append(f'<path d="M{X[2]} {yc - 7:.1f}v14" stroke="#000" stroke-width="2"/>')
            if dots:
                jitter = rng.uniform(-9, 9, v.size)
                pts = "".join(f'<circle cx="{_x(a, x0, panel_w, lo)}" cy="{yc + j:.1f}" r="1.7"/>'
                              for a, j in zip(v, jitter, strict=True))
                parts.append(f'<g fill="{colour}" fill-opacity="0.5">{pts}</g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _values(df: pd.DataFrame, method: str, col: str) -> np.ndarray:
    v = pd.to_numeric(df.loc[df["method"].astype(str) == method, col], errors="coerce")
    return v.dropna().to_numpy(float)


def iou_distribution_svg(boxes: pd.DataFrame, methods: list[str], labels: dict[str, str],
                         kinds: dict[str, str] | None = None) -> Markup | None:
    """IoU of every box, one row per method (each dot one box)."""
    if boxes is None or boxes.empty:
        return None
    rows = [(m, _values(boxes, m, "iou")) for m in methods]
    return distribution_svg([("IoU with the expert box (each dot one box)", rows)], labels,
                            kinds, aria="IoU distribution")


REPEAT_TITLES = {"noise_ssim": "noise: SSIM", "noise_spearman": "noise: Spearman",
                 "shift_ssim": "shift: SSIM", "shift_spearman": "shift: Spearman"}


def repeatability_svg(images: pd.DataFrame, methods: list[str], labels: dict[str, str]):
    """Distributions of test–retest similarities per method (noise and shift), one panel each."""
    cols = [c for c in REPEAT_TITLES if c in images.columns]
    panels = [(REPEAT_TITLES[c], [(m, _values(images, m, c)) for m in methods]) for c in cols]
    return distribution_svg(panels, labels, panel_w=190, dots=False, aria="repeatability")


def _mean_curves(curves: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = curves.groupby(by, sort=False, dropna=False)
    out = g.agg(x=("x", "mean"), mean=("value", "mean"), sd=("value", "std"),
                n=("value", "size")).reset_index()
    out["sem"] = out["sd"] / np.sqrt(out["n"].clip(lower=1))
    return out


RANDOMIZATION_METRICS = ("spearman", "spearman_abs", "ssim", "hog")
RANDOMIZATION_TITLES = {
    "spearman": "Spearman rank correlation",
    "spearman_abs": "Spearman (absolute maps)",
    "ssim": "SSIM",
    "hog": "HOG similarity",
}


def randomization_cascade_plot(curves: pd.DataFrame, methods: list[str], labels: dict[str, str]):
    """Similarity of each step's map to the original vs fraction of the model randomized."""
    c = curves[curves["family"] == "randomization_cascade"]
    if c.empty:
        return None
    metrics = [m for m in RANDOMIZATION_METRICS if m in set(c["metric"])]
    metrics += [m for m in dict.fromkeys(c["metric"]) if m not in metrics]
    mc = _mean_curves(c, ["method", "metric", "step"])
    fig = _figure(3.1 * len(metrics), 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    for ax, metric in zip(axes, metrics, strict=True):
        for i, m in enumerate(methods):
            d = mc[(mc["method"] == m) & (mc["metric"] == metric)].sort_values("step")
            if d.empty:
                continue
            col = method_colour(m, i)
            ax.plot(d["x"], d["mean"], "-o", ms=3, color=col, label=labels.get(m, m))
            ax.fill_between(d["x"], d["mean"] - 1.96 * d["sem"].fillna(0),
                            d["mean"] + 1.96 * d["sem"].fillna(0), color=col, alpha=0.15)
        ax.axhline(0, color="#999", lw=0.6)
        ax.set_title(RANDOMIZATION_TITLES.get(metric, metric), fontsize=9)
        ax.set_xlabel("fraction of the model randomized", fontsize=8)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("similarity to the trained model's map", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.16, top=0.9, wspace=0.08)
    return figure_uri(fig)


def fidelity_plot(curves: pd.DataFrame, methods: list[str], labels: dict[str, str]):
    """Deletion and insertion curves (mean over images); random-order curves dashed."""
    fam = {"deletion", "insertion", "deletion_random", "insertion_random"}
    c = curves[curves["family"].isin(fam)]
    if c.empty:
        return None
    mc = _mean_curves(c, ["method", "family", "step"])
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    handles, names = [], []
    for ax, family in zip(axes, ("deletion", "insertion"), strict=True):
        for i, m in enumerate(methods):
            col = method_colour(m, i)
            for fam_name, ls in ((family, "-"), (f"{family}_random", "--")):
                d = mc[(mc["method"] == m) & (mc["family"] == fam_name)].sort_values("step")
                if d.empty:
                    continue
                (line,) = ax.plot(d["x"], d["mean"], ls, color=col,
                                  lw=1.5 if ls == "-" else 1.0)
                lab = labels.get(m, m) + (", random order" if ls == "--" else "")
                if family == "deletion" and lab not in names:
                    handles.append(line)
                    names.append(lab)
        ax.set_title(f"{family}: probability vs fraction of pixels "
                     f"{'removed' if family == 'deletion' else 'inserted'}", fontsize=9)
        ax.set_xlabel("fraction of pixels", fontsize=8)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("model probability (mean over images)", fontsize=8)
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=7,
               frameon=False)
    fig.subplots_adjust(left=0.06, right=0.78, bottom=0.15, top=0.9, wspace=0.1)
    return figure_uri(fig)
