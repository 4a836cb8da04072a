"""Every figure rwray draws (logged with runs and reports), in one matplotlib idiom.

Each figure is a `matplotlib.figure.Figure` on its own Agg canvas: no pyplot, so no global backend switch, no figure
registry to leak into, and drawing is safe from any thread (a Tune trial's driver, a Ray worker). Classes on a
long-tail axis are ordered head -> tail by training count (`head_to_tail`).

A leaf: imports nothing from rwray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def head_to_tail(train_counts: Sequence[int]) -> list[int]:
    """Class ids by training count, largest first; ties keep class order."""
    return sorted(range(len(train_counts)), key=lambda c: (-train_counts[c], c))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _class_ticks(ax, xs: Sequence[int], order: Sequence[int], counts: Sequence[int], most: int) -> None:
    if len(order) <= most:
        ax.set_xticks(list(xs), [f"{c}\n({counts[c]})" for c in order], fontsize=7)
    ax.set_xlabel("class, head → tail (training count)")


def per_class_accuracy(acc: Sequence[float], train_counts: Sequence[int], classes: Sequence[str], title: str,
                       path: str | Path) -> Path:
    """Bars of per-class accuracy, classes ordered head -> tail by training count, counts on a second axis."""
    order = head_to_tail(train_counts)
    fig = _figure(max(6, 0.35 * len(order)), 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(order)), [100 * acc[i] for i in order], color="tab:blue")
    ax.set_xticks(range(len(order)), [classes[i] for i in order], rotation=90 if len(order) > 12 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("class (head -> tail)")
    ax2 = ax.twinx()
    ax2.plot(range(len(order)), [train_counts[i] for i in order], color="tab:orange", marker="o")
    ax2.set_ylabel("training samples", color="tab:orange")
    ax.set_title(title)
    return _save(fig, path, 100)


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], title: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class)."""
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    size = max(4, 0.4 * len(classes))
    fig = _figure(size + 1, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path, 100)


def class_weights_by_epoch(history: Sequence[tuple[int, Sequence[float]]], train_counts: Sequence[int], title: str,
                           ylabel: str, path: str | Path) -> Path:
    """One line per epoch of a per-class mean sample weight (NaN: no sample that epoch), head -> tail, colour =
    epoch, the ERM level (w = 1) dashed; log scale when the weights spread over more than 20x."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    order = head_to_tail(train_counts)
    fig = _figure(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    first, last = history[0][0], history[-1][0]
    norm = Normalize(vmin=first, vmax=last if last > first else first + 1)
    cmap = matplotlib.colormaps["viridis"]
    xs = list(range(len(order)))
    for epoch, means in history:
        ax.plot(xs, [means[c] for c in order], color=cmap(norm(epoch)), linewidth=1.0,
                marker="." if len(xs) <= 20 else None)
    finite = [m for _, means in history for m in means if not math.isnan(m)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="ERM (w = 1)")
    _class_ticks(ax, xs, order, train_counts, 20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="epoch")
    return _save(fig, path, 120)


def score_boxes_per_class(scores: np.ndarray, classes: np.ndarray, train_counts: Sequence[int], title: str,
                          ylabel: str, path: str | Path) -> Path:
    """Box plot of per-sample scores [N] grouped by their class [N], head -> tail, class means as red dots."""
    order = head_to_tail(train_counts)
    data = [scores[classes == c] for c in order]
    fig = _figure(max(6.0, 0.4 * len(order)), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(1, len(order) + 1))
    nonempty = [(x, d) for x, d in zip(xs, data) if len(d)]
    if nonempty:
        ax.boxplot([d for _, d in nonempty], positions=[x for x, _ in nonempty], widths=0.6, showfliers=True,
                   flierprops={"markersize": 2})
    ax.plot(xs, [float(d.mean()) if len(d) else math.nan for d in data], "o", color="tab:red", markersize=4,
            label="mean")
    _class_ticks(ax, xs, order, train_counts, 30)
    ax.set_xlim(0.3, len(order) + 0.7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path, 120)


def ours_vs_paper(rows: Sequence[tuple[str, float, float]], title: str, path: str | Path) -> Path:
    """Paired bars per table row: (label, ours, paper) in percent."""
    fig = _figure(max(5, 0.9 * len(rows)), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], 0.4, label="ours")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], 0.4, label="paper")
    ax.set_xticks(list(x), [r[0] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path, 100)
