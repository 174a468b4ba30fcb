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
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
WORST_COLOR = "#111111"
_RC: dict[RcKeyType, Any] = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
                              "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                              "grid.alpha": 0.3, "legend.fontsize": 8, "legend.frameon": False,
                              "svg.hashsalt": "robustlab", "text.parse_math": False,
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
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0)).set_gid("legend")
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
            fig.colorbar(image, ax=list(axes), shrink=0.8, label="success (%)").ax.set_gid("colorbar")
        return _svg_uri(fig)


# ---------------------------------------------------------------------------- perturbation norms
def norm_histograms(series: Sequence[dict], *, eps_lines: dict[str, Sequence[float]]) -> str:
    """Histograms of minimal perturbation sizes (L2 and Linf), one outline per threat model.

    series: [{"label", "l2": array, "linf": array}]; eps_lines: {"l2"|"linf": budgets to mark}.
    """
    with _style():
        fig = _figure(7.4, 2.6 + 0.22 * -(-len(series) // 2))
        axes = fig.subplots(1, 2)
        medians: dict[int, list[str]] = {}
        for ax, key, name in ((axes[0], "l2", "L2"), (axes[1], "linf", "Linf")):
            values = [np.asarray(s[key], dtype=float) for s in series]
            finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
            if finite.size == 0:
                ax.text(0.5, 0.5, "no successful minimal perturbations", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_axis_off()
                continue
            bins = np.linspace(0, float(finite.max()) * 1.02 or 1.0, 25)
            for k, v in enumerate(values):
                v = v[np.isfinite(v)]
                if v.size:
                    ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.35, color=PALETTE[k % len(PALETTE)],
                            edgecolor=PALETTE[k % len(PALETTE)], lw=1.2)
                    medians.setdefault(k, []).append(f"{name} {np.median(v):.3g}")
            for e in eps_lines.get(key, ()):
                ax.axvline(e, color="#555555", ls=":", lw=1)
                ax.text(e, 1.0, f" eps={e:g}", transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                        rotation=90, color="#555555")
            ax.set_xlabel(f"{name} norm of the smallest adversarial perturbation")
            ax.set_ylabel("samples")
        if medians:  # one legend below both panels, never over the bars
            from matplotlib.patches import Patch

            handles = [Patch(facecolor=PALETTE[k % len(PALETTE)], edgecolor=PALETTE[k % len(PALETTE)], alpha=0.5,
                             label=f"{_short(series[k]['label'], 30)} (median {', '.join(m)})")
                       for k, m in sorted(medians.items())]
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 2)).set_gid("legend")
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
    """(C, H, W) -> (H, W) or (H, W, C); a 1-D vector becomes a one-row strip (PNG needs two dimensions)."""
    if array.ndim == 3:
        return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    if array.ndim == 1:
        return array[None, :]
    return array


# ---------------------------------------------------------------------------- attributions
def attribution_maps(rows: Sequence[dict], columns: Sequence[str], *, low: float = 0.0, high: float = 1.0) -> str:
    """Image attribution maps, one row per sample, with a colour bar per row (its scale is shared by the row).

    rows: [{"label": str, "image": input array or None, "maps": [one 2-D map per column]}]. Red is evidence for
    the explained class, blue against; the scale is symmetric around 0 at the row's largest |value|.
    """
    with_input = any(r.get("image") is not None for r in rows)
    ncols = len(columns) + int(with_input)
    with _style():
        fig = _figure(1.15 * ncols + 0.9, 1.12 * len(rows) + 0.35)
        axes = fig.subplots(len(rows), ncols, squeeze=False)
        titles = (["input"] if with_input else []) + [_short(c, 22) for c in columns]
        for r, row in enumerate(rows):
            panels = list(axes[r])
            for ax in panels:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            if with_input:
                ax = panels.pop(0)
                if row.get("image") is not None:
                    picture = np.clip(_hwc((np.asarray(row["image"], dtype=float) - low) / max(high - low, 1e-12)), 0, 1)
                    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1,
                              interpolation="nearest")
                else:
                    ax.set_axis_off()
            maps = [np.asarray(m, dtype=float) for m in row["maps"]]
            scale = max((float(np.nanmax(np.abs(m))) for m in maps if m.size), default=0.0) or 1.0
            image = None
            for ax, m in zip(panels, maps):
                image = ax.imshow(m if m.ndim == 2 else _hwc(m), cmap="RdBu_r", vmin=-scale, vmax=scale,
                                  interpolation="nearest")
            axes[r][0].set_ylabel(_short(row.get("label", ""), 18), fontsize=8)
            if image is not None:
                bar = fig.colorbar(image, ax=list(axes[r]), shrink=0.9, pad=0.02, aspect=12)
                bar.ax.set_gid("colorbar")
                bar.ax.tick_params(labelsize=7)
        for c, title in enumerate(titles):
            axes[0][c].set_title(title, fontsize=8)
        return _svg_uri(fig)


def attribution_bars(panels: Sequence[dict], columns: Sequence[str], features: Sequence[str], *,
                     top: int = 8) -> str:
    """Per-feature attributions of 1-D (tabular) inputs as grouped horizontal bars, one panel per sample.

    panels: [{"title": str, "values": [one 1-D array per column]}]; each panel shows its `top` features by
    largest |attribution| in any column, named by `features`, one bar per column (legend below the panels).
    """
    names = [str(f) for f in features]
    k = len(columns)
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    with _style():
        height = top * (0.11 * k + 0.12) + 0.55
        fig = _figure(4.2 * cols + 0.6, height * rows + 0.35)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            values = np.array([np.asarray(v, dtype=float).reshape(-1) for v in panel["values"]])
            order = np.argsort(-np.nanmax(np.abs(values), axis=0), kind="stable")[:top]
            positions = np.arange(len(order))
            width = 0.8 / k
            for j in range(k):
                ax.barh(positions - 0.4 + width * (j + 0.5), values[j, order], height=width,
                        color=PALETTE[j % len(PALETTE)], label=_short(columns[j], 28))
            ax.set_yticks(positions, [_short(names[i] if i < len(names) else f"x[{i}]", 26) for i in order],
                          fontsize=7.5)
            ax.invert_yaxis()
            ax.axvline(0, color="#555555", lw=0.8)
            ax.grid(axis="y", visible=False)
            ax.set_title(_short(panel.get("title", ""), 40))
            ax.set_xlabel("attribution (true class)")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(k, 4)).set_gid("legend")
        return _svg_uri(fig)


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
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0)).set_gid("legend")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        return _svg_uri(fig)
