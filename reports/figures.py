"""Every figure of the report: one function per figure, each returning a `data:` URI.

matplotlib (Agg, no pyplot and no global state) is imported inside the functions, so importing
the reports package stays cheap. Plots are SVG (crisp on screen and in print); example images are
tiny PNGs scaled up in the browser. Text from results (model and class names) is passed to
matplotlib with math parsing off, and the SVG is shown through <img>, where nothing can run.
"""

from __future__ import annotations

import base64
import io
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
WORST_COLOR = "#111111"
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
       "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
       "legend.fontsize": 8, "legend.frameon": False, "svg.hashsalt": "robustlab", "text.parse_math": False,
       "font.family": ["DejaVu Sans", "sans-serif"]}


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _short(text: str, limit: int = 40) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- robustness curves
def robustness_curves(panels: Sequence[dict]) -> str:
    """Accuracy vs eps, one panel per threat model, one line per attack (worst case in black).

    panels: [{"title", "norm", "clean", "lines": {attack: {eps: accuracy}}, "worst": {eps: accuracy}}]
    """
    with _style():
        cols = min(len(panels), 2)
        rows = -(-len(panels) // cols)
        fig = _figure(5.6 * cols, 3.3 * rows)
        axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
        for index, panel in enumerate(panels):
            ax = axes[index // cols][index % cols]
            for k, (attack, points) in enumerate(panel["lines"].items()):
                points = points if 0.0 in points else {0.0: panel["clean"], **points}  # eps 0: clean accuracy
                xs = sorted(points)
                ys = [points[e] for e in xs]
                ax.plot(xs, [100 * y for y in ys], marker="o", ms=3.5, lw=1.4, color=PALETTE[k % len(PALETTE)],
                        label=_short(attack, 24))
            if panel.get("worst"):
                xs = [0.0] + sorted(panel["worst"])
                ys = [panel["clean"]] + [panel["worst"][e] for e in sorted(panel["worst"])]
                ax.plot(xs, [100 * y for y in ys], marker="s", ms=4, lw=2.4, color=WORST_COLOR, ls="--",
                        label="worst case", zorder=5)
            ax.set_title(_short(panel["title"], 48))
            ax.set_xlabel(f"eps ({panel['norm']})")
            ax.set_ylim(-3, 103)
            ax.set_xlim(left=0)
            if index % cols == 0:
                ax.set_ylabel("accuracy (%)")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for index in range(len(panels), rows * cols):
            axes[index // cols][index % cols].set_visible(False)
        return _svg_uri(fig)


# ---------------------------------------------------------------------------- targeted success matrix
def success_matrices(panels: Sequence[dict], class_names: Sequence[str]) -> str:
    """Heatmaps of targeted success, true class (rows) x target class (columns), one per eps.

    panels: [{"title", "rate": (k, k) array with NaN where no pair was attacked}]
    """
    k = len(class_names)
    annotate = k <= 12
    labels = [_short(c, 12) for c in class_names]
    with _style():
        cell = 0.36 if annotate else max(0.06, 3.2 / max(k, 1))
        side = max(2.6, cell * k + 1.2)
        fig = _figure(side * len(panels) + 0.8, side + 0.4)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        image = None
        for ax, panel in zip(axes, panels):
            rate = np.asarray(panel["rate"], dtype=float)
            masked = np.ma.masked_invalid(rate * 100)
            image = ax.imshow(masked, cmap="Reds", vmin=0, vmax=100, aspect="equal")
            ax.set_facecolor("#eeeeee")
            ax.grid(False)
            ax.set_title(panel["title"])
            ax.set_xlabel("target class")
            ax.set_ylabel("true class")
            if k <= 30:
                ax.set_xticks(range(k), labels, rotation=90 if max(map(len, labels)) > 2 else 0, fontsize=7)
                ax.set_yticks(range(k), labels, fontsize=7)
            if annotate:
                for i in range(k):
                    for j in range(k):
                        if np.isfinite(rate[i, j]):
                            ax.text(j, i, f"{rate[i, j] * 100:.0f}", ha="center", va="center", fontsize=7.5,
                                    color="white" if rate[i, j] > 0.6 else "black")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label="success (%)")
        return _svg_uri(fig)


# ---------------------------------------------------------------------------- perturbation norms
def norm_histograms(series: Sequence[dict], *, eps_lines: dict[str, Sequence[float]]) -> str:
    """Histograms of minimal perturbation sizes (L2 and Linf), one outline per threat model.

    series: [{"label", "l2": array, "linf": array}]; eps_lines: {"l2"|"linf": budgets to mark}.
    """
    with _style():
        fig = _figure(7.4, 2.6)
        axes = fig.subplots(1, 2)
        for ax, key, name in ((axes[0], "l2", "L2"), (axes[1], "linf", "Linf")):
            values = [np.asarray(s[key], dtype=float) for s in series]
            finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
            if finite.size == 0:
                ax.text(0.5, 0.5, "no successful minimal perturbations", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_axis_off()
                continue
            bins = np.linspace(0, float(finite.max()) * 1.02 or 1.0, 25)
            for k, (s, v) in enumerate(zip(series, values)):
                v = v[np.isfinite(v)]
                if v.size:
                    ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=PALETTE[k % len(PALETTE)],
                            edgecolor=PALETTE[k % len(PALETTE)], lw=1.2,
                            label=f"{_short(s['label'], 30)} (median {np.median(v):.3g})")
            for e in eps_lines.get(key, ()):
                ax.axvline(e, color="#555555", ls=":", lw=1)
                ax.text(e, 1.0, f" eps={e:g}", transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                        rotation=90, color="#555555")
            ax.set_xlabel(f"{name} norm of the smallest adversarial perturbation")
            ax.set_ylabel("samples")
            ax.legend(loc="upper right")
        return _svg_uri(fig)


# ---------------------------------------------------------------------------- example images
def image_uri(image: np.ndarray, low: float, high: float) -> str:
    """A (H, W) or (C, H, W) image with C in 1 or 3, as a PNG data URI (values scaled from [low, high])."""
    from matplotlib.image import imsave

    array = _hwc((np.asarray(image, dtype=float) - low) / max(high - low, 1e-12))
    buffer = io.BytesIO()
    if array.ndim == 2:
        imsave(buffer, np.clip(array, 0, 1), cmap="gray", vmin=0, vmax=1, format="png")
    else:
        imsave(buffer, np.clip(array, 0, 1), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def delta_uri(delta: np.ndarray, scale: float) -> str:
    """A perturbation amplified so that |delta| = scale maps to full colour (diverging map, grey = 0)."""
    from matplotlib.image import imsave

    array = _hwc(np.asarray(delta, dtype=float) / max(scale, 1e-12))
    buffer = io.BytesIO()
    if array.ndim == 2:
        imsave(buffer, np.clip(array, -1, 1), cmap="RdBu_r", vmin=-1, vmax=1, format="png")
    else:
        imsave(buffer, np.clip(0.5 + 0.5 * array, 0, 1), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _hwc(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    return array


# ---------------------------------------------------------------------------- training curves
def training_curves(panels: Sequence[dict]) -> str:
    """Validation accuracy per epoch of adversarial training, one panel per defended model.

    panels: [{"title", "series": {"clean_accuracy": {epoch: acc}, "robust_accuracy": {...}}, "best": epoch|None,
              "eps", "norm"}]
    """
    with _style():
        cols = min(len(panels), 2)
        rows = -(-len(panels) // cols)
        fig = _figure(5.6 * cols, 3.0 * rows)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for (key, label), color in zip((("clean_accuracy", "clean"), ("robust_accuracy", "robust (PGD)")),
                                           (PALETTE[0], PALETTE[1])):
                points = sorted(panel["series"].get(key, {}).items())
                if points:
                    ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", markersize=2.5,
                            color=color, label=label)
            if panel.get("best"):
                ax.axvline(panel["best"], color=WORST_COLOR, linestyle=":", linewidth=1, label="kept")
            eps = panel.get("eps")
            ax.set_title(_short(panel["title"]) + (f" (trained at {panel.get('norm')} eps={eps:g})"
                                                   if isinstance(eps, (int, float)) else ""))
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel("validation accuracy (%)")
            ax.set_ylim(0, 100)
            ax.legend(loc="lower right")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        return _svg_uri(fig)
