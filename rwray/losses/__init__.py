"""Registry of per-sample base losses (one file each)."""

from rwray.losses import balanced_softmax, ce, class_balanced, focal, ldam, symmetric, truncated_lq
from rwray.losses.base import PerSampleLoss
from rwray.registry import Registry, union_of

LOSSES: Registry[PerSampleLoss] = Registry("loss")
LOSSES.add("ce", ce.CEParams, ce.CrossEntropy, "cross-entropy")
LOSSES.add("cb_ce", class_balanced.CBCEParams, class_balanced.ClassBalancedCE, "class-balanced CE (effective number), optional DRW")
LOSSES.add("focal", focal.FocalParams, focal.FocalLoss, "focal loss (1 - p_t)^gamma * CE")
LOSSES.add("ldam", ldam.LDAMParams, ldam.LDAMLoss, "label-distribution-aware margins, optional DRW")
LOSSES.add("balanced_softmax", balanced_softmax.BalancedSoftmaxParams, balanced_softmax.BalancedSoftmax, "CE on logits + tau*log n; predicts with raw logits")
LOSSES.add("sce", symmetric.SCEParams, symmetric.SymmetricCE, "symmetric CE: alpha*CE + beta*reverse CE (noisy labels)")
LOSSES.add("lq", truncated_lq.LqParams, truncated_lq.TruncatedLq, "truncated Lq / generalized CE (noisy labels)")

LossConfig = union_of(LOSSES)

__all__ = ["LOSSES", "LossConfig", "PerSampleLoss"]
