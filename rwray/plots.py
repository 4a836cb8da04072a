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


# Up to this many classes a figure draws one bar / box / row per class; above it, classes are grouped head -> tail
# into at most this many bins of consecutive classes, so a figure's size and its labels stay bounded at any K
# (ImageNet-LT 1,000, iNaturalist 8,142).
CLASSES_DRAWN = 100
# A confusion matrix drawn class by class up to this many classes (0.4 inch a class); above it the overview.
CONFUSION_DRAWN = 100


def class_bins(order: Sequence[int], bins: int = CLASSES_DRAWN) -> list[list[int]]:
    """``order`` (classes head -> tail) cut into at most ``bins`` runs of consecutive classes, sizes differing by at
    most one; one class a run when there are no more classes than bins."""
    return [list(map(int, part)) for part in np.array_split(np.asarray(order, dtype=np.int64), min(bins, len(order)))
            if len(part)]


def per_class_accuracy(acc: Sequence[float], train_counts: Sequence[int], classes: Sequence[str], title: str,
                       path: str | Path) -> Path:
    """Bars of per-class accuracy, classes ordered head -> tail by training count, counts on a second axis. Above
    CLASSES_DRAWN classes, one bar per bin of consecutive classes (its mean accuracy over the classes the split
    has, NaN entries skipped; the whiskers span the bin's middle half of classes, 25th to 75th percentile) and the
    bin's mean count."""
    order = head_to_tail(train_counts)
    if len(order) <= CLASSES_DRAWN:
        fig = _figure(max(6, 0.35 * len(order)), 4)
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(len(order)), [100 * np.nan_to_num(acc[i]) for i in order], color="tab:blue")
        ax.set_xticks(range(len(order)), [classes[i] for i in order], rotation=90 if len(order) > 12 else 0)
        ax.set_xlabel("class (head -> tail)")
        counts = [train_counts[i] for i in order]
    else:
        bins = class_bins(order)
        values = np.asarray(acc, dtype=float)
        mean, low, high = [], [], []
        for b in bins:
            v = values[b]
            v = 100 * v[~np.isnan(v)]
            mean.append(v.mean() if v.size else np.nan)
            low.append(np.percentile(v, 25) if v.size else np.nan)
            high.append(np.percentile(v, 75) if v.size else np.nan)
        mean, low, high = map(np.asarray, (mean, low, high))
        fig = _figure(12, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        xs = np.arange(len(bins))
        ax.bar(xs, np.nan_to_num(mean), color="tab:blue", width=0.85)
        ax.errorbar(xs, np.nan_to_num(mean), yerr=[np.clip(np.nan_to_num(mean - low), 0, None),
                                                   np.clip(np.nan_to_num(high - mean), 0, None)],
                    fmt="none", ecolor="black", elinewidth=0.6, capsize=0)
        first = np.cumsum([0] + [len(b) for b in bins])[:-1] + 1  # [bins] rank of each bin's first class, 1-based
        step = max(1, len(bins) // 10)
        ax.set_xticks(xs[::step], [str(r) for r in first[::step]], fontsize=8)
        ax.set_xlabel(f"class rank, head -> tail ({len(order)} classes in {len(bins)} bins of "
                      f"{min(map(len, bins))}-{max(map(len, bins))}; bar: mean, whiskers: 25th-75th percentile class)")
        counts = [float(np.mean([train_counts[c] for c in b])) for b in bins]
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    binned = len(order) > CLASSES_DRAWN
    ax2.plot(range(len(counts)), counts, color="tab:orange", marker=None if binned else "o")
    ax2.set_ylabel("training samples", color="tab:orange")
    if binned and min(counts) > 0 and max(counts) / min(counts) > 20:  # a real long tail spans decades
        ax2.set_yscale("log")
    ax.set_title(title)
    return _save(fig, path, 100)


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], title: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class), one row and column per class: for at most
    CONFUSION_DRAWN classes (`confusion_overview` draws any K)."""
    if len(classes) > CONFUSION_DRAWN:
        raise ValueError(f"{len(classes)} classes: draw confusion_overview instead (at most {CONFUSION_DRAWN} here)")
    fig = _figure(max(4, 0.4 * len(classes)) + 1, max(4, 0.4 * len(classes)))
    _matrix(fig.add_subplot(1, 1, 1), _row_normalised(cm, cm.sum(axis=1)), classes, classes, title)
    return _save(fig, path, 100)


def confusion_overview(groups: Sequence[str], group_cm: np.ndarray, classes: Sequence[str], sub_cm: np.ndarray,
                       support: Sequence[int], title: str, path: str | Path) -> Path:
    """A confusion matrix of any number of classes, in two bounded panels: the counts aggregated over shot groups
    ([G, G], rows true group, row-normalised, with the percentages written in), and the rows and columns of the most
    confused classes ([n, n], each row divided by its class's full support, so a row sums to the share of the
    class that stayed among these classes)."""
    fig = _figure(6 + 0.3 * len(classes), 1.5 + 0.3 * max(len(classes), 12))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(1.5, 0.1 * len(classes))]})
    norm = _row_normalised(group_cm, group_cm.sum(axis=1))
    _matrix(ax1, norm, groups, groups, "by shot group (row %)", colorbar=False)
    for (i, j), v in np.ndenumerate(norm):
        ax1.text(j, i, f"{100 * v:.1f}", ha="center", va="center", color="white" if v > 0.5 else "black", fontsize=9)
    _matrix(ax2, _row_normalised(sub_cm, np.asarray(support, dtype=float)), classes, classes,
            f"the {len(classes)} most confused classes (share of each class's samples)")
    fig.suptitle(title)
    return _save(fig, path, 100)


def _row_normalised(cm: np.ndarray, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=float).reshape(-1, 1)
    return np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)


def _matrix(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, colorbar: bool = True):
    im = ax.imshow(values, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=90)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if colorbar:
        ax.figure.colorbar(im, ax=ax)


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
    """Box plot of per-sample scores [N] grouped by their class [N], head -> tail, class means as red dots; above
    CLASSES_DRAWN classes one box per bin of consecutive classes (`class_bins`)."""
    order = head_to_tail(train_counts)
    bins = class_bins(order)
    bin_of = np.empty(len(order), dtype=np.int64)  # [K] class -> its box
    for i, members in enumerate(bins):
        bin_of[members] = i
    which = bin_of[np.asarray(classes, dtype=np.int64)]  # [N]
    data = [scores[which == i] for i in range(len(bins))]
    fig = _figure(max(6.0, 0.4 * len(bins)), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(1, len(bins) + 1))
    nonempty = [(x, d) for x, d in zip(xs, data) if len(d)]
    if nonempty:
        ax.boxplot([d for _, d in nonempty], positions=[x for x, _ in nonempty], widths=0.6, showfliers=True,
                   flierprops={"markersize": 2})
    ax.plot(xs, [float(d.mean()) if len(d) else math.nan for d in data], "o", color="tab:red", markersize=4,
            label="mean")
    if len(bins) == len(order):
        _class_ticks(ax, xs, order, train_counts, 30)
    else:
        ax.set_xlabel(f"class rank, head -> tail ({len(order)} classes in {len(bins)} bins)")
    ax.set_xlim(0.3, len(bins) + 0.7)
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
