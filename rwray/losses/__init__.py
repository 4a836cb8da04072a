"""Registry of per-sample base losses (one file each)."""

from rwray.losses import ce
from rwray.losses.base import PerSampleLoss
from rwray.registry import Registry, union_of

LOSSES: Registry[PerSampleLoss] = Registry("loss")
LOSSES.add("ce", ce.CEParams, ce.CrossEntropy, "cross-entropy")

LossConfig = union_of(LOSSES)

__all__ = ["LOSSES", "LossConfig", "PerSampleLoss"]
