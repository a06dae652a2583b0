"""Figures: the training curve of a run, and the matplotlib plumbing every figure shares (Agg backend, imported
lazily). Ground floor: imports nothing of the project. Heat-maps live in the Hessian wing (``hessian/figures.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence



def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), chosen here rather than at import."""
    import matplotlib  # lazy: matplotlib costs ~1 s to import and the backend is chosen here, never at import
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    return plt


SCHEDULED = ("lr", "K", "active_share", "gamma", "pool_size")  # values a schedule can change during a run

X_AXES = {"samples": "training samples", "round": "round", "steps": "optimiser steps",
          "forward_sample_passes": "forward sample-passes", "train_time": "training time (s)",
          "wall_time": "wall time (s)", "virtual_time": "virtual time (s, async_sequential)"}
"""The x-axes a training curve or a sweep figure can take (a metrics-record key -> axis label); the first is the
default. Rounds are fair only between runs of one mode and one K: a block-wise round with K = 5 draws 5 times the
samples of one with K = 1 (README: compute counters). ``virtual_time`` exists only in the simulator's records
(``async_sequential``); runs without it are left out of such a figure."""


def check_x_axis(x: str) -> str:
    """``x`` when it is a known x-axis.

    Raises:
        ValueError: naming ``x`` and the valid axes.
    """
    if x not in X_AXES:
        raise ValueError(f"x-axis {x!r} is not valid; valid: {sorted(X_AXES)}")
    return x


def scheduled_series(history: Sequence[dict[str, Any]], x: str = "round") -> dict[str, tuple[list, list[float]]]:
    """The schedule-driven values that changed during the run: key -> (x values, values) as logged."""
    series = {}
    for key in SCHEDULED:
        points = [(h[x], h[key]) for h in history if h.get(key) is not None and h.get(x) is not None]
        if len({v for _, v in points}) > 1:
            series[key] = ([p for p, _ in points], [v for _, v in points])
    return series


def curve_panels(history: Sequence[dict[str, Any]], x: str = "samples") -> list[dict[str, Any]]:
    """The data behind :func:`training_curve`: one panel per (metric, x-axis), in drawing order (row by row).

    Each panel: ``metric``, ``x`` (the record key on its x-axis: ``x`` on the left, the training time — compute and
    communication, without evaluation and measurement — on the right, or the round when ``x`` is the training
    time), ``series`` (label -> (x values, y values), as logged; records without the x key are left out).
    """
    check_x_axis(x)
    metrics = [m for m in ("loss", "accuracy") if history and m in history[0]]
    panels = []
    for metric in metrics:
        for xkey in (x, "train_time" if x != "train_time" else "round"):
            shown = [h for h in history if h.get(xkey) is not None]
            panels.append({"metric": metric, "x": xkey, "series": {
                f"{split}{metric}": ([h[xkey] for h in shown], [h[f"{prefix}{metric}"] for h in shown])
                for split, prefix in (("train ", ""), ("test ", "test_"))}})
    return panels


def training_curve(history: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                   x: str = "samples") -> list[Path]:
    """Loss and accuracy (train and test) against ``x`` (a key of :data:`X_AXES`, default the training samples)
    and against training time, and a row with the values that schedules changed (the learning rate; K,
    active_share, gamma, pool size relative to their largest), only the panels that have data; writes ``path``
    (.pdf and .png). :func:`curve_panels` gives the plotted data.

    Returns the files written: none when ``history`` is empty (an engine that logged no progress).

    Raises:
        ValueError: an unknown ``x``.
    """
    panels = curve_panels(history, x)
    if not history:
        return []
    plt = pyplot()
    schedules = scheduled_series(history, x)
    lr = {k: v for k, v in schedules.items() if k == "lr"}
    others = {k: v for k, v in schedules.items() if k != "lr"}
    rows = len(panels) // 2 + (1 if schedules else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.2 * rows), squeeze=False)
    for i, panel in enumerate(panels):
        ax = axes[i // 2][i % 2]
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, label=label)
        ax.set_xlabel(X_AXES[panel["x"]])
        ax.set_ylabel(panel["metric"])
        if panel["metric"] == "loss" and all(isinstance(v, (int, float)) and v > 0
                                             for _, ys in panel["series"].values() for v in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, group, label in zip(axes[-1] if schedules else [], [g for g in (lr, others) if g],
                                ["learning rate" if lr else "value / its maximum", "value / its maximum"]):
        for key, (xs, values) in group.items():
            if key == "lr":
                ax.plot(xs, values, label="learning rate (first block)")
            else:
                top = max(abs(v) for v in values) or 1.0
                ax.step(xs, [v / top for v in values], where="post", label=f"{key} / {top:g}")
        ax.set(xlabel=X_AXES[x], ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if schedules and not (lr and others):  # one schedule panel: no empty one beside it
        fig.delaxes(axes[-1][1])
    for ax in fig.axes:
        readable_ticks(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def readable_ticks(ax: Any) -> None:
    """At most five x ticks, large numbers with a shared power of ten (1e4) instead of long labels that collide."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    if ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        formatter = ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-3, 4))
        ax.xaxis.set_major_formatter(formatter)


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
