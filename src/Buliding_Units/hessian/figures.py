"""The Hessian units' figures: honest heat-maps and the coupling over training (data functions apart from drawing).

* Coupling heat-maps use the fixed scale [0, 1] with the diagonal (always 1) masked; a value above 1 — possible for
  an indefinite Hessian, or when coupling is built from lower bounds — is drawn in red.
* Raw block norms use a log scale with one range for every measurement of a run (the unit keeps the range in its
  state, and redraws the run's norm heat-maps on the final range when the run ends).
* Every heat-map's subtitle states the conditions: exact or lower bound, tol, samples, mode, dtype, round.
* ``coupling_over_training.{pdf,png}``: the largest and mean off-diagonal coupling and the top pairs against round
  and against training samples, with the training loss and the deviation on a second axis.
* Block spectral densities (``BlockSpectrumDensity``): every block's density on one log-density plot, and
  ``js0_over_training.{pdf,png}``: the heterogeneity JS₀ against round and samples, drawn like the coupling.

Frames and plugins floor: imports the ground floor's plots only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from src.plots import pyplot, readable_ticks, save_figure

TOP_PAIRS = 3  # pairs drawn in the coupling-over-training figure and logged with each measurement
NORM_TITLES = {  # norm heat-map stem -> (title, colour-bar label), for the Hessian
    "fd_block_norms_heatmap": ("finite-difference $\\|H_{ij}\\|_2$", "spectral norm"),
    "block_offdiag_eig_heatmap": ("Hessian block norms $\\sigma_{max}(H_{ij})$", "spectral norm")}


def norm_title(stem: str, curvature: str = "hessian") -> tuple[str, str]:
    """(title, colour-bar label) of a norm heat-map: a Gauss-Newton measurement is titled as one, not "Hessian"."""
    if curvature == "ggn":
        return "Gauss-Newton block norms $\\sigma_{max}(G_{ij})$", "spectral norm"
    return NORM_TITLES[stem]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def coupling_summary(coupling: Sequence[Sequence[float | None]], top: int = TOP_PAIRS) -> dict[str, Any]:
    """Largest and mean off-diagonal coupling (pairs i < j with a finite value) and the ``top`` largest pairs.

    Returns ``{"coupling_max", "coupling_mean", "top_pairs": [[i, j, value], ...]}`` (None without any pair).
    """
    pairs = [(i, j, float(coupling[i][j])) for i in range(len(coupling)) for j in range(i + 1, len(coupling))
             if _finite(coupling[i][j])]
    if not pairs:
        return {"coupling_max": None, "coupling_mean": None, "top_pairs": []}
    ranked = sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))
    return {"coupling_max": ranked[0][2], "coupling_mean": sum(p[2] for p in pairs) / len(pairs),
            "top_pairs": [list(p) for p in ranked[:top]]}


def conditions(record: dict[str, Any], config: dict[str, Any], round_index: int) -> str:
    """One line stating how a Hessian record was measured (the heat-maps' subtitle)."""
    if record.get("method") == "finite_difference":
        kind = "finite differences"
    elif record.get("lower_bound"):
        kind = "lower bounds (Krylov)"
    else:
        kind = "exact (dense)"
    parts = [kind]
    if "tol" in config and record.get("lower_bound"):
        parts.append(f"tol {config['tol']:g}")
    if "curvature" in config:
        parts.append(str(config["curvature"]))
    parts += [f"{config.get('batch_size', '?')} samples", f"{config.get('mode', '?')} mode",
              str(config.get("dtype", "?")), f"round {round_index}"]
    return ", ".join(parts)


def grow_range(current: Sequence[float] | None, matrix: Any) -> list[float] | None:
    """``current`` widened to hold every positive finite value of ``matrix`` (the shared log-scale range)."""
    values = [float(v) for row in matrix for v in row if _finite(v) and v > 0]
    if not values:
        return list(current) if current is not None else None
    low, high = min(values), max(values)
    if current is not None:
        low, high = min(low, current[0]), max(high, current[1])
    return [low, high]


def coupling_over_training(records: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]],
                           top: int = TOP_PAIRS) -> dict[str, Any]:
    """The series behind ``coupling_over_training``: from a unit's logged records (those with a coupling, measured
    during training: ``--measure_only`` records are left out) and the run's progress records.

    Returns rounds, samples, max and mean coupling per measurement; ``pairs``: ``"i-j"`` -> its coupling per
    measurement (None where not finite) for the ``top`` pairs with the largest coupling at any measurement;
    ``loss`` and ``deviation``: (rounds, samples, values) from the progress records.
    """
    points = [r for r in records if r.get("coupling") is not None and not r.get("measure_only")]
    peak: dict[tuple[int, int], float] = {}
    for r in points:
        for i, row in enumerate(r["coupling"]):
            for j in range(i + 1, len(row)):
                if _finite(row[j]):
                    peak[(i, j)] = max(peak.get((i, j), -math.inf), float(row[j]))
    chosen = sorted(peak, key=lambda p: (-peak[p], p))[:top]
    series = {f"{i}-{j}": [r["coupling"][i][j] if _finite(r["coupling"][i][j]) else None for r in points]
              for i, j in chosen}
    summaries = [coupling_summary(r["coupling"], top) for r in points]
    progress = [h for h in history if "round" in h]
    return {"rounds": [r["round"] for r in points], "samples": [r.get("samples") for r in points],
            "max": [s["coupling_max"] for s in summaries], "mean": [s["coupling_mean"] for s in summaries],
            "pairs": series,
            **{key: ([h["round"] for h in progress if key in h], [h.get("samples") for h in progress if key in h],
                     [h[key] for h in progress if key in h]) for key in ("loss", "deviation")}}


def draw_coupling_over_training(data: dict[str, Any], path: str | Path, title: str = "") -> list[Path]:
    """Draw :func:`coupling_over_training`'s data against round (left) and training samples (right)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), squeeze=False, layout="constrained")
    for col, (xkey, xlabel) in enumerate((("rounds", "round"), ("samples", "training samples"))):
        ax = axes[0][col]
        xs = data[xkey]
        if xkey == "samples" and any(x is None for x in xs):
            fig.delaxes(ax)  # records without the training samples: no empty panel
            continue
        ax.plot(xs, data["max"], "o-", color="C3", label="max off-diagonal")
        ax.plot(xs, data["mean"], "s-", color="C0", label="mean off-diagonal")
        for n, (pair, values) in enumerate(data["pairs"].items()):
            ax.plot(xs, [math.nan if v is None else v for v in values], "--", color=f"C{4 + n}", lw=1,
                    label=f"pair {pair}")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(xlabel)
        values = [v for line in ax.lines for v in line.get_ydata() if math.isfinite(v)]
        log = bool(values) and min(values) > 0  # a degenerate early ratio (up to ~10) must not flatten the rest
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("coupling $S_{ij}/\\sqrt{S_{ii}S_{jj}}$" + (" (log scale)" if log else ""))
        ax.grid(alpha=0.3, which="both")
        readable_ticks(ax)
        _second_axis(ax, data, 0 if xkey == "rounds" else 1)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.18), ncol=3)  # below the data
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _second_axis(ax: Any, data: dict[str, Any], x_index: int) -> None:
    """Training loss and deviation on a twin axis (log scale when all positive); a zero deviation is left out."""
    twin = ax.twinx()
    drawn = []
    for key, style in (("loss", "k-"), ("deviation", "m-.")):
        xs, values = data[key][x_index], data[key][2]
        if not values or not any(values) or any(x is None for x in xs):
            continue
        drawn += twin.plot(xs, values, style, lw=1, alpha=0.7, label=f"training {key}" if key == "loss" else key)
    if drawn and all(v > 0 for line in drawn for v in line.get_ydata()):
        twin.set_yscale("log")
    twin.set_ylabel("training loss, deviation")
    if drawn:
        twin.legend(handles=drawn, fontsize="small", loc="upper right", bbox_to_anchor=(1.0, -0.18))


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
    return save_figure(fig, path)


def draw_block_densities(grid: Sequence[float], densities: Sequence[Sequence[float] | None], labels: Sequence[str],
                         path: str | Path, title: str = "", subtitle: str = "", xlabel: str = "normalised eigenvalue",
                         decades: float = 8.0) -> list[Path]:
    """Every block's spectral density on one plot with a logarithmic density axis (``decades`` below the highest
    value shown), one line per block labelled ``labels[b]``; a block without a density is left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    xs = np.asarray(grid, dtype=float)
    top = max((max(d) for d in densities if d is not None), default=1.0)
    floor = top * 10 ** -decades
    for b, density in enumerate(densities):
        if density is None:
            continue
        ax.plot(xs, np.maximum(np.asarray(density, dtype=float), floor), lw=1.2, color=f"C{b % 10}",
                ls=("-", "--", ":", "-.")[(b // 10) % 4], label=labels[b])
    ax.set_yscale("log")
    ax.set_ylim(floor, top * 3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=1 + len(labels) // 12, loc="upper right")
    if title or subtitle:
        ax.set_title("\n".join(t for t in (title, subtitle) if t), fontsize=9)
    return save_figure(fig, path)


def js0_over_training(records: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The series behind ``js0_over_training``: JS₀ per measurement (records with a ``js0`` key, measured during
    training) against round and samples, with the training loss and deviation from the progress records."""
    points = [r for r in records if "js0" in r and not r.get("measure_only")]
    progress = [h for h in history if "round" in h]
    return {"rounds": [r["round"] for r in points], "samples": [r.get("samples") for r in points],
            "js0": [r["js0"] for r in points], "normalisation": points[-1].get("js_normalisation") if points else None,
            **{key: ([h["round"] for h in progress if key in h], [h.get("samples") for h in progress if key in h],
                     [h[key] for h in progress if key in h]) for key in ("loss", "deviation")}}


def draw_js0_over_training(data: dict[str, Any], path: str | Path, title: str = "") -> list[Path]:
    """Draw :func:`js0_over_training`'s data against round (left) and training samples (right, hidden when the
    records hold no samples)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), squeeze=False, layout="constrained")
    for col, (xkey, xlabel) in enumerate((("rounds", "round"), ("samples", "training samples"))):
        ax = axes[0][col]
        xs = data[xkey]
        if xkey == "samples" and any(x is None for x in xs):
            ax.set_visible(False)
            continue
        ax.plot(xs, [math.nan if v is None else v for v in data["js0"]], "o-", color="C3",
                label=f"JS$_0$ ({data.get('normalisation') or '?'})")
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("JS$_0$: mean pairwise JS distance of block spectra")
        ax.grid(alpha=0.3)
        _second_axis(ax, data, 0 if xkey == "rounds" else 1)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.18), ncol=3)  # below the data
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
