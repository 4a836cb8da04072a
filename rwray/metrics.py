"""Exact evaluation metrics from count tensors, and the names they are logged under.

Workers all-reduce integer counts and every number is computed from the global ones, so metrics are exact for any
number of workers (never an average of per-worker accuracies). Two kinds of counts:

- a confusion matrix [K, K] (`confusion_matrix`): top-1, balanced and many/medium/few-shot accuracy;
- (correct, total) per (class, bias attribute) cell [2, K, K_bias] (`bias_cell_counts`): how a classifier does on
  bias-aligned vs bias-conflicting samples. "Aligned" means bias == label: the bias attribute's values are indexed
  like the classes (Biased MNIST: colour c is class c's colour). For other datasets only the per-cell and cell-mean
  numbers are meaningful.

The metric keys (``train/loss``, ``val/balanced_acc``, ``best/test/few_acc``, ...) are built here and nowhere else:
the training loop logs them, the CLI summary, sweeps and tables read them back.

A leaf: imports nothing from rwray.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# ------------------------------------------------------------------------------------------------------ metric keys

TRAIN_LOSS = "train/loss"  # exact over workers; logged last in every epoch: the spool's "epoch complete" sentinel
TRAIN_SAMPLES = "train/samples"
TRAIN_MEAN_WEIGHT = "train/mean_weight"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"  # with train.clip_grad_norm: mean global gradient norm before clipping
TRAIN_CLIPPED = "train/clipped_frac"  # ... and the fraction of the epoch's updates it clipped
TRAIN_SKIPPED = "train/skipped_frac"  # train.amp=fp16: the fraction of updates skipped for overflowing gradients
TRAIN_CLASS_SAMPLES = "train/class_samples/"  # + class id: the epoch's samples of that class (data.sampler)
SAMPLES_PER_S = "train/samples_per_s"
EPOCH_S = "time/epoch_s"
# Where a worker's training time went, per epoch (train_epoch): blocked waiting for its next batch (input pipeline)
# vs the rest (forward, backward, update, and the one host sync a step), as means over workers, and the waiting
# share of the whole; plus each worker's own training throughput (+ rank).
DATA_WAIT_S = "time/data_wait_s"
TRAIN_S = "time/train_s"
DATA_WAIT_FRAC = "time/data_wait_frac"
WORKER_SAMPLES_PER_S = "train/samples_per_s/worker_"
WORST_CLASS = "worst_class_acc"  # per split: the lowest accuracy of a class present in it
BEST_EPOCH = "best/epoch"  # the epoch chosen on validation (train.select_metric)
SUMMARY_KEYS = ("top1", "balanced_acc", "many_acc", "medium_acc", "few_acc")  # what `summarize` returns, in order


def split_key(split: str, name: str) -> str:
    """A split's metric: ``val/balanced_acc``."""
    return f"{split}/{name}"


def class_acc_key(split: str, c: int) -> str:
    """One class's accuracy on a split: ``test/class_acc/9``."""
    return f"{split}/class_acc/{c}"


def bias_key(split: str, name: str) -> str:
    """A bias-cell summary on a split: ``test_unbiased/bias/worst_cell_acc``."""
    return f"{split}/bias/{name}"


def best_key(metric: str) -> str:
    """A metric at the epoch chosen on validation: ``best/val/balanced_acc``, ``best/test/few_acc``."""
    return f"best/{metric}"


# ------------------------------------------------------------------------------------------------ confusion matrix

# Shot groups of the long-tail literature, by number of training samples of the class.
MANY, FEW = 100, 20  # many: > 100, medium: 20..100, few: < 20


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B], [B] -> [K, K] int64 counts, rows = true class, columns = predicted class."""
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """[K, K] -> [K] recall per class; NaN for a class with no samples in this split."""
    support = cm.sum(dim=1).double()
    return torch.where(support > 0, cm.diag().double() / support.clamp(min=1), torch.full_like(support, float("nan")))


def shot_groups(train_counts: Sequence[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        groups["many" if n > MANY else "few" if n < FEW else "medium"].append(c)
    return groups


def summarize(cm: torch.Tensor, train_counts: Sequence[int]) -> dict[str, float]:
    """top1, balanced accuracy (mean per-class recall over classes present) and many/medium/few-shot accuracy.

    Shot-group accuracy is the mean recall of the group's classes (the convention of the long-tail papers); a group
    with no classes is omitted rather than reported as 0.
    """
    cm = cm.double()
    acc = per_class_accuracy(cm)
    present = ~torch.isnan(acc)
    out = {
        "top1": float(cm.diag().sum() / cm.sum().clamp(min=1)),
        "balanced_acc": float(acc[present].mean()) if present.any() else float("nan"),
    }
    for group, classes in shot_groups(train_counts).items():
        vals = acc[classes] if classes else acc[:0]
        vals = vals[~torch.isnan(vals)]
        if len(vals):
            out[f"{group}_acc"] = float(vals.mean())
    return out


# ------------------------------------------------------------------------------------------- (class, bias) cells


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


# ------------------------------------------------------------------------------------------------ one split's line


def cluster_unbiased_acc(counts: torch.Tensor, min_count: int = 10) -> float:
    """ReBias's 9-class ImageNet "unbiased" accuracy from [R, 2, K, C] counts ((correct, total) per (class, texture
    cluster) cell, for R clusterings): per clustering, the mean accuracy over cells with at least ``min_count``
    samples; then the mean over clusterings (clovaai/rebias evaluator). NaN when no cell qualifies."""
    scores = []
    for correct, total in counts.double():  # [K, C] each, one clustering at a time
        keep = total >= min_count
        if keep.any():
            scores.append(float((correct[keep] / total[keep]).mean()))
    return sum(scores) / len(scores) if scores else float("nan")


def macro_f1(cm: torch.Tensor) -> float:
    """Mean F1 over the classes present in the split ([K, K] confusion matrix, rows true, columns predicted), as
    WILDS scores iWildCam (sklearn's f1_score, average="macro", labels = the true labels present). A class never
    predicted has precision 0 (and so F1 0)."""
    cm = cm.double()
    tp, true, pred = cm.diag(), cm.sum(1), cm.sum(0)  # [K] each
    present = true > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp / (true + pred).clamp(min=1)  # = 2PR / (P + R); 0 where tp = 0
    return float(f1[present].mean())


def split_metrics(split: str, cm: torch.Tensor, cells: torch.Tensor | None,
                  train_counts: Sequence[int], clusters: torch.Tensor | None = None) -> dict[str, float]:
    """Everything logged for one evaluated split: the [K, K] matrix's summary, each present class's accuracy and,
    when the data has a bias attribute, the [2, K, K_bias] cells' summary."""
    out = {split_key(split, k): v for k, v in summarize(cm, train_counts).items()}
    out[split_key(split, "macro_f1")] = macro_f1(cm)
    acc = per_class_accuracy(cm)  # [K]; NaN where the split has no sample of the class
    out.update({class_acc_key(split, c): float(a) for c, a in enumerate(acc) if not torch.isnan(a)})
    if not torch.isnan(acc).all():
        out[split_key(split, WORST_CLASS)] = float(acc[~torch.isnan(acc)].min())  # the worst group, groups = classes
    if cells is not None:
        out.update({bias_key(split, k): v for k, v in summarize_bias_cells(cells.cpu()).items()})
    if clusters is not None and not math.isnan(score := cluster_unbiased_acc(clusters.cpu())):
        out[split_key(split, "cluster_unbiased_acc")] = score
    return out
