"""model.sync_bn: BatchNorm over the global batch. Two gloo ranks, each holding half of a batch, must produce what
one process gets on the whole batch with plain BatchNorm: outputs, input gradients, parameter gradients (summed
over ranks, as DDP's mean times the world size) and running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwray.models import MODELS
from rwray.models.sync_bn import GlobalBatchNorm2d, convert
from rwray.models.small_cnn import SmallCNNParams
from rwray.datainfo import DataInfo


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 5, 5, generator=g) * 2 + 1  # [B, C, H, W]: 7 rows on rank 0, 5 on rank 1
    up = torch.randn(12, 3, 5, 5, generator=g)  # an upstream gradient, so the backward is not symmetric
    return x, up


SPLIT = 7


def _bn(cls) -> nn.BatchNorm2d:
    bn = cls(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _rank(rank: int, world: int) -> dict:
    x, up = _batch()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    xs = x[part].clone().requires_grad_(True)
    bn = _bn(GlobalBatchNorm2d).train()
    y = bn(xs)
    (y * up[part]).sum().backward()
    return {"y": y.detach(), "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var}


def test_two_ranks_with_global_batchnorm_equal_one_process_with_the_whole_batch(gloo):
    ranks = gloo(_rank)
    x, up = _batch()
    x = x.clone().requires_grad_(True)
    bn = _bn(nn.BatchNorm2d).train()
    y = bn(x)
    (y * up).sum().backward()
    torch.testing.assert_close(torch.cat([ranks[0]["y"], ranks[1]["y"]]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([ranks[0]["dx"], ranks[1]["dx"]]), x.grad, rtol=1e-5, atol=1e-5)
    for r in ranks:  # each rank's parameter gradient is its share; DDP adds them up (as a mean)
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad, rtol=1e-5, atol=1e-5)


def test_on_one_process_and_in_eval_mode_it_is_plain_batchnorm():
    x, _ = _batch()
    for mode in ("train", "eval"):
        a, b = _bn(GlobalBatchNorm2d), _bn(nn.BatchNorm2d)
        getattr(a, mode)(), getattr(b, mode)()
        torch.testing.assert_close(a(x), b(x))


def test_convert_swaps_every_batchnorm_and_keeps_weights_and_state_dict_keys():
    model = MODELS.build(SmallCNNParams(width=8), DataInfo(3, (5, 5, 5), (1, 8, 8), 15))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    convert(model, torch.device("cpu"))
    assert n and sum(type(m) is GlobalBatchNorm2d for m in model.modules()) == n
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_sync_bn_with_group_norm_is_refused():
    with pytest.raises(ValueError, match="sync_bn synchronises BatchNorm"):
        SmallCNNParams(norm="group", sync_bn=True)
