"""Per-sample losses: each maps (logits [B, K], targets [B]) to one loss per sample [B].

No loss reduces over the batch: the weighted reduction happens once, in `rwray.methods.base.weighted_loss`.
A loss that changes with the epoch (deferred re-weighting) overrides `begin_epoch`.
"""

from __future__ import annotations

import torch
from torch import nn


class PerSampleLoss(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # [B, K], [B] -> [B]
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        pass

    def predict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits used for prediction/evaluation (raw by default; Balanced Softmax trains on adjusted ones)."""
        return logits
