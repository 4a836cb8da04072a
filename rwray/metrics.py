"""Exact evaluation metrics from count tensors, and the names they are logged under.

Workers merge integer counts and every number is computed from the global ones, so metrics are exact for any
number of workers (never an average of per-worker accuracies). Two kinds of counts:

- (true, predicted) pair counts, sparse (`Confusion`): top-1, balanced, many/medium/few-shot accuracy, macro F1 and
  the worst class, from per-class vectors, so nothing grows as K² (iNaturalist has K = 8,142);
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
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
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


# ------------------------------------------------------------------------------------------------ confusion counts

# Shot groups of the long-tail literature, by number of training samples of the class.
MANY, FEW = 100, 20  # many: > 100, medium: 20..100, few: < 20
SHOT_GROUPS = ("many", "medium", "few")
# Up to this many classes a split's per-class accuracy is also logged as one metric per class and epoch
# (``test/class_acc/9``: CIFAR-100 and smaller, what small runs always showed); above it the per-class numbers go to
# one table per evaluation instead (`class_columns`): ImageNet-LT's 2 x 1,000 metrics an epoch, iNaturalist's 16,284,
# would be millions of rows in the tracking store over a run.
CLASS_METRICS_MAX = 100


@dataclass(frozen=True)
class Confusion:
    """A split's (true class, predicted class) counts, kept sparse: only the pairs that occur.

    Memory is O(min(N, K²)) for N samples, where a dense [K, K] int64 matrix is K² (530 MB at iNaturalist's
    K = 8,142), and merging workers' counts moves their distinct pairs, not K². Every metric below needs only the
    per-class vectors (`per_class`); the pairs themselves serve the confusion artifacts.
    """

    num_classes: int
    pairs: torch.Tensor  # [M] int64 flat ids true * K + predicted, unique and ascending
    counts: torch.Tensor  # [M] int64 samples of each pair, > 0

    @classmethod
    def of(cls, preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> "Confusion":
        """[B] predicted, [B] true class -> their counts."""
        ids = targets.long() * num_classes + preds.long()  # [B]
        return cls.from_ids(ids, torch.ones_like(ids), num_classes)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, counts: torch.Tensor, num_classes: int) -> "Confusion":
        """Flat ids [M'] with counts [M'] (repeats allowed: they add up) -> a Confusion."""
        uniq, inverse = torch.unique(ids.long(), return_inverse=True)  # [M] sorted, [M']
        summed = torch.zeros(uniq.numel(), dtype=torch.int64, device=ids.device).index_add_(0, inverse, counts.long())
        return cls(num_classes, uniq, summed)

    @classmethod
    def from_dense(cls, cm: torch.Tensor) -> "Confusion":
        """A dense [K, K] matrix (rows true, columns predicted) -> the same counts, sparse."""
        flat = cm.reshape(-1).long()
        ids = flat.nonzero().squeeze(1)
        return cls(cm.shape[0], ids, flat[ids])

    @classmethod
    def empty(cls, num_classes: int, device: torch.device | str = "cpu") -> "Confusion":
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(num_classes, none, none)

    def __add__(self, other: "Confusion") -> "Confusion":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add counts over {self.num_classes} and {other.num_classes} classes")
        return Confusion.from_ids(torch.cat([self.pairs, other.pairs]), torch.cat([self.counts, other.counts]),
                                  self.num_classes)

    @property
    def true(self) -> torch.Tensor:
        return self.pairs // self.num_classes  # [M]

    @property
    def pred(self) -> torch.Tensor:
        return self.pairs % self.num_classes  # [M]

    def total(self) -> int:
        return int(self.counts.sum())

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(correct, support, predicted), [K] int64 each: samples of the class predicted right, samples of the
        class, and samples predicted as the class."""
        k, true, pred = self.num_classes, self.true, self.pred
        zeros = torch.zeros(k, dtype=torch.int64, device=self.counts.device)
        right = true == pred
        return (zeros.index_add(0, true[right], self.counts[right]), zeros.index_add(0, true, self.counts),
                zeros.index_add(0, pred, self.counts))

    def dense(self) -> torch.Tensor:
        """[K, K] int64, rows true, columns predicted: for small K only (K² memory)."""
        k = self.num_classes
        out = torch.zeros(k * k, dtype=torch.int64, device=self.counts.device)
        out[self.pairs] = self.counts
        return out.reshape(k, k)

    def cpu(self) -> "Confusion":
        return Confusion(self.num_classes, self.pairs.cpu(), self.counts.cpu())

    def state_dict(self) -> dict:
        """Tensors and ints only: a checkpoint loads it with torch.load(weights_only=True)."""
        return {"num_classes": self.num_classes, "pairs": self.pairs.cpu(), "counts": self.counts.cpu()}

    @classmethod
    def from_state(cls, state: dict | torch.Tensor) -> "Confusion":
        """`state_dict`'s output, or a dense [K, K] matrix (what checkpoints written before held)."""
        if isinstance(state, torch.Tensor):
            return cls.from_dense(state)
        return cls(int(state["num_classes"]), state["pairs"].long(), state["counts"].long())


def per_class_accuracy(conf: Confusion) -> torch.Tensor:
    """[K] float64 recall per class; NaN for a class with no samples in this split."""
    correct, support, _ = conf.per_class()
    support = support.double()
    return torch.where(support > 0, correct.double() / support.clamp(min=1), torch.full_like(support, float("nan")))


def shot_groups(train_counts: Sequence[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {g: [] for g in SHOT_GROUPS}
    for c, n in enumerate(train_counts):
        groups["many" if n > MANY else "few" if n < FEW else "medium"].append(c)
    return groups


def summarize(conf: Confusion, train_counts: Sequence[int]) -> dict[str, float]:
    """top1, balanced accuracy (mean per-class recall over classes present) and many/medium/few-shot accuracy.

    Shot-group accuracy is the mean recall of the group's classes (the convention of the long-tail papers); a group
    with no classes is omitted rather than reported as 0.
    """
    correct, support, _ = conf.per_class()
    acc = per_class_accuracy(conf)
    present = ~torch.isnan(acc)
    out = {
        "top1": float(correct.sum().double() / support.sum().clamp(min=1)),
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


def macro_f1(conf: Confusion) -> float:
    """Mean F1 over the classes present in the split, as WILDS scores iWildCam (sklearn's f1_score,
    average="macro", labels = the true labels present). A class never predicted has precision 0 (and so F1 0)."""
    tp, true, pred = (v.double() for v in conf.per_class())  # [K] each
    present = true > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp / (true + pred).clamp(min=1)  # = 2PR / (P + R); 0 where tp = 0
    return float(f1[present].mean())


def split_metrics(split: str, conf: Confusion, cells: torch.Tensor | None,
                  train_counts: Sequence[int], clusters: torch.Tensor | None = None) -> dict[str, float]:
    """Everything logged for one evaluated split: the summary of its counts, the worst class, each present class's
    accuracy when there are at most CLASS_METRICS_MAX classes (else they go to the per-class table,
    `class_columns`) and, when the data has a bias attribute, the [2, K, K_bias] cells' summary."""
    out = {split_key(split, k): v for k, v in summarize(conf, train_counts).items()}
    out[split_key(split, "macro_f1")] = macro_f1(conf)
    acc = per_class_accuracy(conf)  # [K]; NaN where the split has no sample of the class
    if conf.num_classes <= CLASS_METRICS_MAX:
        out.update({class_acc_key(split, c): float(a) for c, a in enumerate(acc.tolist()) if not math.isnan(a)})
    if not torch.isnan(acc).all():
        out[split_key(split, WORST_CLASS)] = float(acc[~torch.isnan(acc)].min())  # the worst group, groups = classes
    if cells is not None:
        out.update({bias_key(split, k): v for k, v in summarize_bias_cells(cells.cpu()).items()})
    if clusters is not None and not math.isnan(score := cluster_unbiased_acc(clusters.cpu())):
        out[split_key(split, "cluster_unbiased_acc")] = score
    return out


# ------------------------------------------------------------------------------------------ per-class tables, K large


def class_columns(confusions: Mapping[str, Confusion]) -> dict[str, np.ndarray]:
    """Per-class numbers of each split as table columns, [K] each: ``<split>_support``, ``<split>_correct``,
    ``<split>_predicted`` (int64) and ``<split>_acc`` (float64, NaN where the split has no sample of the class)."""
    out: dict[str, np.ndarray] = {}
    for split, conf in confusions.items():
        correct, support, predicted = (v.cpu().numpy() for v in conf.per_class())
        out.update({f"{split}_support": support, f"{split}_correct": correct, f"{split}_predicted": predicted,
                    f"{split}_acc": per_class_accuracy(conf).cpu().numpy()})
    return out


def group_confusion(conf: Confusion, train_counts: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """The counts aggregated over shot groups: (the groups that have classes, [G, G] int64 rows true group, columns
    predicted group). What a K x K matrix says at a glance, at any K: how often the tail is taken for the head."""
    groups = [(g, c) for g, c in shot_groups(train_counts).items() if c]
    group_of = torch.zeros(conf.num_classes, dtype=torch.int64)
    for i, (_, classes) in enumerate(groups):
        group_of[classes] = i
    conf = conf.cpu()
    g = len(groups)
    flat = group_of[conf.true] * g + group_of[conf.pred]  # [M]
    out = torch.zeros(g * g, dtype=torch.int64).index_add_(0, flat, conf.counts).reshape(g, g)
    return [name for name, _ in groups], out.numpy()


def most_confused_classes(conf: Confusion, n: int) -> list[int]:
    """The ``n`` classes involved in the most errors (samples of the class predicted as another, plus samples of
    other classes predicted as it), most first; ties by class id. Classes with no error are left out."""
    correct, support, predicted = conf.cpu().per_class()
    errors = (support - correct) + (predicted - correct)  # [K]
    order = sorted((c for c in range(conf.num_classes) if errors[c] > 0), key=lambda c: (-int(errors[c]), c))
    return order[:n]


def sub_confusion(conf: Confusion, classes: Sequence[int]) -> np.ndarray:
    """[n, n] int64 counts among ``classes`` (rows true, columns predicted, in the given order)."""
    conf = conf.cpu()
    pos = torch.full((conf.num_classes,), -1, dtype=torch.int64)
    pos[list(classes)] = torch.arange(len(classes))
    i, j = pos[conf.true], pos[conf.pred]
    keep = (i >= 0) & (j >= 0)
    n = len(classes)
    return torch.zeros(n * n, dtype=torch.int64).index_add_(0, i[keep] * n + j[keep], conf.counts[keep]).reshape(
        n, n).numpy()
