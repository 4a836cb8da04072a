"""Every registered method x every registered loss trains two steps through the registries, without Ray.

Iterates `METHODS.entries()` and `LOSSES.entries()`, so new entries are covered automatically. Each method is built
from its Params defaults (plus `loss=` where it has a `loss` field); `EXTRA_CONFIGS` adds non-default settings
that switch on code paths the defaults leave off (ABSGD's defaults are ERM).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwray.datainfo import DataInfo
from rwray.methods import METHODS, StepInputs, weighted_loss
from rwray.losses import LOSSES  # noqa: E402

INFO = DataInfo(num_classes=4, class_counts=(60, 25, 10, 3), image_shape=(8, 1, 1), num_train=98)

# method name -> extra keyword sets (each one more case on top of the defaults)
EXTRA_CONFIGS: dict[str, list[dict]] = {
    "absgd": [{"lam": 1.0}, {"lam": -2.0}, {"init_lam": 200.0, "lam": 0.5, "lam_epoch": 1}],
}

# method name -> reason; a method that needs inputs this generic test cannot provide. Empty today.
SKIPS: dict[str, str] = {}


class TinyNet(nn.Module):
    """8 features -> 16 hidden (the 'features') -> 4 logits; the models' forward signature and classifier name."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        f = self.body(x.flatten(1))  # [B, 16]
        logits = self.fc(f)  # [B, 4]
        return (logits, f) if return_features else logits


def cases():
    for m in METHODS.entries():
        extras = [{}] + EXTRA_CONFIGS.get(m.name, [])
        has_loss = "loss" in m.params.model_fields
        for loss in LOSSES.entries() if has_loss else [None]:
            for extra in extras:
                kw = dict(extra)
                if loss is not None:
                    kw["loss"] = loss.params()
                tag = f"{m.name}-{loss.name if loss else 'noloss'}" + ("-" + "-".join(f"{k}={v}" for k, v in extra.items()) if extra else "")
                yield pytest.param(m, kw, id=tag)


@pytest.mark.parametrize("entry,kwargs", list(cases()))
def test_trains_two_steps(entry, kwargs):
    if entry.name in SKIPS:
        pytest.skip(SKIPS[entry.name])
    torch.manual_seed(0)
    model = TinyNet()
    method = METHODS.build(entry.params(**kwargs), INFO)
    method.attach(model, prepare=lambda m: m, device=torch.device("cpu"))
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(1)
    for epoch in range(2):  # two epochs of one step: stage switches at epoch 1 run too
        method.begin_epoch(epoch)
        x = torch.randn(16, 8, 1, 1, generator=g)
        y = torch.tensor([0] * 7 + [1] * 5 + [2] * 3 + [3])
        logits, feats = model(x, return_features=True)
        out = method.step(
            StepInputs(model=model, x=x, y=y, index=torch.arange(16) + 16 * epoch, logits=logits, features=feats, epoch=epoch, step=0)
        )
        assert out.losses.shape == (16,) and out.weights.shape == (16,)
        assert torch.isfinite(out.weights).all() and (out.weights >= 0).all()
        loss = weighted_loss(out)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = method.end_epoch(epoch)
        assert all(isinstance(v, float) for v in metrics.values())
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    assert all(changed), f"parameters unchanged: {changed}"  # gradient reaches every layer
    state = method.state_dict()
    METHODS.build(entry.params(**kwargs), INFO).load_state_dict(state)  # checkpoint state loads into a fresh one
