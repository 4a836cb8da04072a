"""Accuracy per (class, bias attribute) cell: how a classifier does on bias-aligned vs bias-conflicting samples.

`bias_cell_counts` turns one batch's (prediction, label, bias) into integer counts [2, K, K_bias] (correct, total).
Counts add over batches and over workers (`rwray.dist.all_reduce_sum`), so every number below is exact for any number
of workers, like the confusion matrices of `rwray.metrics`.

"Aligned" means bias == label: the bias attribute's values are indexed like the classes (Biased MNIST: colour c is
class c's colour). For other datasets only the per-cell and cell-mean numbers are meaningful.
"""

from __future__ import annotations

import torch


def bias_cell_counts(preds: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor, num_classes: int,
                     num_bias: int) -> torch.Tensor:
    """[B] predicted class, [B] true class, [B] bias index -> [2, K, K_bias] int64: [0] correct, [1] total."""
    if not (preds.shape == labels.shape == bias.shape and preds.ndim == 1):
        raise ValueError(f"preds, labels and bias must be [B] each, got {tuple(preds.shape)}, {tuple(labels.shape)}, "
                         f"{tuple(bias.shape)}")
    if bias.numel() and (int(bias.min()) < 0 or int(bias.max()) >= num_bias):
        raise ValueError(f"bias values span [{int(bias.min())}, {int(bias.max())}], outside [0, {num_bias})")
    cell = labels.long() * num_bias + bias.long()  # [B] flat cell id
    size = num_classes * num_bias
    total = torch.bincount(cell, minlength=size)  # [K * K_bias]
    correct = torch.bincount(cell, weights=(preds.long() == labels.long()).double(), minlength=size).long()
    return torch.stack([correct, total]).reshape(2, num_classes, num_bias)


def bias_cell_accuracy(counts: torch.Tensor) -> torch.Tensor:
    """[2, K, K_bias] counts -> [K, K_bias] float64 accuracy; NaN where a cell has no samples."""
    correct, total = counts.double().unbind(0)
    return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))


def summarize_bias_cells(counts: torch.Tensor) -> dict[str, float]:
    """Headline numbers of a [2, K, K_bias] count tensor (keys absent when no sample qualifies):

    cell_mean_acc   mean accuracy over non-empty cells (each (class, bias) combination counts the same)
    worst_cell_acc  the lowest non-empty cell's accuracy
    aligned_acc     accuracy over samples whose bias index equals their label (pooled)
    conflicting_acc accuracy over the other samples (pooled)
    """
    acc = bias_cell_accuracy(counts)  # [K, Kb]
    present = ~torch.isnan(acc)
    out: dict[str, float] = {}
    if present.any():
        out["cell_mean_acc"] = float(acc[present].mean())
        out["worst_cell_acc"] = float(acc[present].min())
    correct, total = counts.double().unbind(0)  # [K, Kb] each
    k, kb = total.shape
    aligned = torch.zeros(k, kb, dtype=torch.bool, device=total.device)
    d = min(k, kb)
    aligned[torch.arange(d), torch.arange(d)] = True  # cell (c, c)
    for name, mask in (("aligned_acc", aligned), ("conflicting_acc", ~aligned)):
        n = total[mask].sum()
        if n > 0:
            out[name] = float(correct[mask].sum() / n)
    return out
