"""BatchNorm over the global batch (`model.sync_bn`): every worker normalises with the mean and variance of all
workers' samples, as one process holding the whole batch would.

Why: a recipe tuned on one GPU with batch 128 normalised over 128 images; spread over 8 workers of 16, plain
BatchNorm normalises over 16, which is noisier and, for small per-worker batches, changes what the model learns.

On CUDA this is torch's own `nn.SyncBatchNorm` (fused kernels, NCCL). torch's refuses other devices, so on CPU
workers (gloo) `GlobalBatchNorm2d` does the same arithmetic with one differentiable all-reduce of the per-channel
(Σx, Σx², n) per forward. Evaluation (eval mode) and a single process run plain BatchNorm in both.
"""

from __future__ import annotations

import torch
from torch import nn

from rwray import dist


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are over all workers' samples (same parameters, buffers and
    state-dict keys, so checkpoints load into either)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        if not (self.training and dist.is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        n_local = xf.new_full((1,), float(x.numel() // c))
        # One all-reduce: [2C + 1] = (Σx [C], Σx² [C], n). Its backward all-reduces the gradient, which is exactly
        # d(global statistic)/d(each worker's input).
        stats = dist.all_reduce_sum_grad(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n_local]))
        n = stats[2 * c]
        mean = stats[:c] / n  # [C]
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # [C] biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` made global-batch (before the model is wrapped for data parallelism)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap(model)


def _swap(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap(child))
    return module
