"""Figures logged with each run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def per_class_accuracy(acc: Sequence[float], train_counts: Sequence[int], classes: Sequence[str], title: str,
                       path: str | Path) -> Path:
    """Bars of per-class accuracy, classes ordered head -> tail by training count, counts on a second axis."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order)), 4))
    ax.bar(range(len(order)), [100 * acc[i] for i in order], color="tab:blue")
    ax.set_xticks(range(len(order)), [classes[i] for i in order], rotation=90 if len(order) > 12 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("class (head -> tail)")
    ax2 = ax.twinx()
    ax2.plot(range(len(order)), [train_counts[i] for i in order], color="tab:orange", marker="o")
    ax2.set_ylabel("training samples", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def confusion_matrix(cm: np.ndarray, classes: Sequence[str], title: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class)."""
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    size = max(4, 0.4 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
