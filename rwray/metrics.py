"""Classification metrics from a confusion matrix.

Workers all-reduce their confusion matrices and every number is computed from the global one, so metrics are exact
for any number of workers (never an average of per-worker accuracies).
"""

from __future__ import annotations

from typing import Sequence

import torch

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
