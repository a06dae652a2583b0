"""Figures: training curves and block heat-maps (matplotlib, Agg backend, imported lazily).

Plotting never alters the arrays it is given: a heat-map copies its matrix before any scaling, so the values a
measurement unit logs are the values it measured. Ground floor: imports nothing of the project.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), chosen here rather than at import."""
    import matplotlib  # lazy: matplotlib costs ~1 s to import and the backend is chosen here, never at import
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    return plt


SCHEDULED = ("lr", "K", "active_share", "gamma", "pool_size")  # values a schedule can change during a run


def scheduled_series(history: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The schedule-driven values that changed during the run: key -> (rounds, values) as logged."""
    series = {}
    for key in SCHEDULED:
        points = [(h["round"], h[key]) for h in history if h.get(key) is not None]
        if len({v for _, v in points}) > 1:
            series[key] = ([r for r, _ in points], [v for _, v in points])
    return series


def training_curve(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> list[Path]:
    """Loss and accuracy (train and test) against rounds and against wall time, and a row with the values that
    schedules changed (learning rate; K, active_share, gamma, pool size); writes ``path`` (.pdf and .png).

    Returns the files written: none when ``history`` is empty (an engine that logged no progress).
    """
    if not history:
        return []
    plt = pyplot()
    metrics = [m for m in ("loss", "accuracy") if history and m in history[0]]
    schedules = scheduled_series(history)
    rows = len(metrics) + (1 if schedules else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.2 * rows), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, xkey in enumerate(("round", "wall_time")):
            ax = axes[row][col]
            xs = [h[xkey] for h in history]
            ax.plot(xs, [h[metric] for h in history], label=f"train {metric}")
            ax.plot(xs, [h[f"test_{metric}"] for h in history], label=f"test {metric}")
            ax.set_xlabel("round" if xkey == "round" else "wall time (s)")
            ax.set_ylabel(metric)
            if metric == "loss" and all(h[metric] > 0 for h in history):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
    if schedules:
        _schedule_row(axes[-1], schedules)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _schedule_row(axes: Any, schedules: dict[str, tuple[list[int], list[float]]]) -> None:
    """Left: the learning rate; right: the other scheduled values, each relative to its largest."""
    left, right = axes
    if "lr" in schedules:
        left.plot(*schedules["lr"], label="learning rate (first block)")
    for key, (rounds, values) in schedules.items():
        if key != "lr":
            top = max(abs(v) for v in values) or 1.0
            right.step(rounds, [v / top for v in values], where="post", label=f"{key} / {top:g}")
    for ax, label in ((left, "learning rate"), (right, "value / its maximum")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")


HEATMAP_SCALES = ("linear", "log", "coupling")
OVER_COLOUR, MASKED_COLOUR = "red", "lightgrey"  # coupling above 1 (indefinite Hessian); masked diagonal / no value


def heatmap_values(matrix: Any, scale: str = "linear", value_range: Sequence[float] | None = None,
                   mask_diagonal: bool = False) -> tuple[np.ma.MaskedArray, float | None, float | None]:
    """What a heat-map shows: a masked copy of ``matrix`` and the colour limits (vmin, vmax).

    ``scale="coupling"``: the fixed range [0, 1] (values above 1 keep their value and are drawn in
    ``OVER_COLOUR``); ``"log"``: ``value_range`` if given, else the positive finite values' range, with values
    <= 0 masked; ``"linear"``: ``value_range`` or matplotlib's auto-range (None, None). Non-finite values, and the
    diagonal when ``mask_diagonal``, are masked (drawn in ``MASKED_COLOUR``).
    """
    if scale not in HEATMAP_SCALES:
        raise ValueError(f"unknown heat-map scale {scale!r}; valid: {list(HEATMAP_SCALES)}")
    values = np.array(matrix, dtype=float, copy=True)
    mask = ~np.isfinite(values)
    if mask_diagonal:
        mask |= np.eye(*values.shape, dtype=bool)
    if scale == "coupling":
        return np.ma.masked_array(values, mask), 0.0, 1.0
    if scale == "log":
        mask |= values <= 0
        positive = values[~mask]
        low, high = value_range if value_range is not None else \
            (positive.min(), positive.max()) if positive.size else (None, None)
        if low is not None and not low < high:  # one value: a decade around it, so LogNorm has a range
            low, high = low / 10 ** 0.5, high * 10 ** 0.5
        return np.ma.masked_array(values, mask), low, high
    low, high = value_range if value_range is not None else (None, None)
    return np.ma.masked_array(values, mask), low, high


def draw_heatmap(matrix: Any, title: str = "", labels: Sequence[str] | None = None, colorbar_label: str = "",
                 scale: str = "linear", value_range: Sequence[float] | None = None, mask_diagonal: bool = False,
                 subtitle: str = "") -> Any:
    """The heat-map figure of :func:`heatmap` (not saved); returns the matplotlib Figure."""
    plt = pyplot()
    from matplotlib.colors import LogNorm, Normalize  # lazy, with pyplot

    shown, low, high = heatmap_values(matrix, scale, value_range, mask_diagonal)
    n = shown.shape[0]
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    norm = LogNorm(vmin=low, vmax=high) if scale == "log" and low is not None else Normalize(vmin=low, vmax=high)
    cmap = plt.get_cmap("viridis").with_extremes(bad=MASKED_COLOUR, over=OVER_COLOUR)
    side = 1.2 + 0.55 * max(n, 5)
    fig, ax = plt.subplots(figsize=(side + 2.2, side + 1.2), layout="constrained")
    image = ax.imshow(shown, cmap=cmap, norm=norm)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("block j")
    ax.set_ylabel("block i")
    if n <= 12:
        _annotate(ax, image, shown)
    over = scale == "coupling" and bool((shown > 1).any())
    fig.colorbar(image, ax=ax, label=colorbar_label + (f" ({OVER_COLOUR}: > 1)" if over else ""), fraction=0.046,
                 pad=0.04, extend="max" if scale == "coupling" else "neither")
    if title or subtitle:
        ax.set_title("\n".join(t for t in (title, subtitle) if t), fontsize=9)
    return fig


def _annotate(ax: Any, image: Any, shown: np.ma.MaskedArray) -> None:
    n = shown.shape[0]
    for i in range(n):
        for j in range(n):
            if shown.mask is np.ma.nomask or not shown.mask[i, j]:
                value = float(shown[i, j])
                bright = value > image.norm.vmax or image.norm(value) > 0.6  # dark text on a bright cell
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=8, color="k" if bright else "w")


def heatmap(matrix: Any, path: str | Path, title: str = "", labels: Sequence[str] | None = None,
            colorbar_label: str = "", log_scale: bool = False, *, scale: str | None = None,
            value_range: Sequence[float] | None = None, mask_diagonal: bool = False,
            subtitle: str = "") -> list[Path]:
    """A labelled B×B heat-map with a colour bar, written as PDF and PNG. The input is copied, never modified.

    ``scale`` is "linear", "log" or "coupling" (see :func:`heatmap_values`); ``log_scale=True`` is ``scale="log"``.
    """
    plt = pyplot()
    fig = draw_heatmap(matrix, title, labels, colorbar_label, scale or ("log" if log_scale else "linear"),
                       value_range, mask_diagonal, subtitle)
    return _save(fig, plt, path)


def save_figure(fig: Any, path: str | Path) -> list[Path]:
    """Write ``fig`` as ``path`` .pdf and .png and close it; returns the files written."""
    return _save(fig, pyplot(), path)


def _save(fig: Any, plt: Any, path: str | Path) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".pdf", ".png"):
        target = path.with_suffix(suffix)
        fig.savefig(target, dpi=120)
        written.append(target)
    plt.close(fig)
    return written
