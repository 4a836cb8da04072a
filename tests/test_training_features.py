"""Training features the loop offers every method: gradient clipping and label smoothing, against torch's own
semantics written out step by step."""

from __future__ import annotations

import math

import pytest
import torch

from rwray.datainfo import DataInfo
from rwray.losses import LOSSES
from rwray.losses.ce import CEParams
from rwray.methods import METHODS
from rwray.methods.erm import ERMParams
from rwray.metrics import TRAIN_CLIPPED, TRAIN_GRAD_NORM
from rwray.train.batches import Batch
from rwray.train.epoch import train_epoch

INFO = DataInfo(3, (5, 5, 5), (1, 2, 2), 15)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, return_features=False):
        feats = x.flatten(1)
        return (self.fc(feats), feats) if return_features else self.fc(feats)


def batches(n: int = 3) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch(3.0 * torch.randn(4, 1, 2, 2, generator=g), torch.randint(0, 3, (4,), generator=g),
                  torch.arange(4 * i, 4 * i + 4)) for i in range(n)]


def by_hand(model: Tiny, data: list[Batch], lr: float, max_norm: float | None) -> list[float]:
    """Plain SGD, mean CE per batch, and clipping as torch.nn.utils.clip_grad_norm_ documents it: the total norm
    over all gradients, each scaled by max_norm / (total + 1e-6) when that is below 1. -> norms before clipping."""
    norms = []
    for b in data:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(b.x), b.y).backward()
        total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
        norms.append(total)
        scale = 1.0 if max_norm is None else min(1.0, max_norm / (total + 1e-6))
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * scale * p.grad
    return norms


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_scales_each_update_to_the_max_norm_and_reports_the_norms(max_norm):
    torch.manual_seed(0)
    ours, ref = Tiny(), Tiny()
    ref.load_state_dict(ours.state_dict())
    metrics = train_epoch(ours, METHODS.build(ERMParams(), INFO), torch.optim.SGD(ours.parameters(), lr=0.1),
                          batches(), epoch=0, clip_grad_norm=max_norm)
    norms = by_hand(ref, batches(), 0.1, max_norm)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert metrics[TRAIN_GRAD_NORM] == pytest.approx(sum(norms) / 3, rel=1e-5)
    assert metrics[TRAIN_CLIPPED] == pytest.approx(sum(n > max_norm for n in norms) / 3)
    assert (metrics[TRAIN_CLIPPED] == 1.0) == (max_norm == 0.5)  # the small bound clips every step here


def test_without_clipping_the_update_is_untouched_and_no_norm_is_reported():
    torch.manual_seed(0)
    ours, ref = Tiny(), Tiny()
    ref.load_state_dict(ours.state_dict())
    metrics = train_epoch(ours, METHODS.build(ERMParams(), INFO), torch.optim.SGD(ours.parameters(), lr=0.1),
                          batches(), epoch=0)
    by_hand(ref, batches(), 0.1, None)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert TRAIN_GRAD_NORM not in metrics and TRAIN_CLIPPED not in metrics


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_label_smoothing_matches_hand_formula(eps):
    """l_i = -sum_k q_k log p_ik with q = (1 - eps) onehot(y) + eps / K."""
    z = [[2.0, 1.0, 0.1], [0.5, -0.3, 0.8], [-1.0, 3.0, 0.0]]
    y = [0, 2, 1]
    want = []
    for row, t in zip(z, y):
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        logp = [v - log_z for v in row]
        want.append(-sum(((1 - eps) * (k == t) + eps / 3) * lp for k, lp in enumerate(logp)))
    got = LOSSES.build(CEParams(label_smoothing=eps), INFO)(torch.tensor(z), torch.tensor(y))
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_training_feature_settings_are_validated():
    from pydantic import ValidationError

    from rwray import config as C

    with pytest.raises(ValidationError):
        CEParams(label_smoothing=1.0)
    with pytest.raises(C.ConfigError) as e:
        C.validate({"name": "x", "data": {"dir": "d"}, "train": {"clip_grad_norm": 0}})
    assert "train.clip_grad_norm" in str(e.value)


def test_the_weight_ema_is_the_hand_computed_moving_average_of_every_update():
    """After updates giving weights t1, t2, t3: ema = t1, then d*ema + (1 - d)*t (torch.optim.swa_utils'
    EMA, which starts from the first update's weights). Buffers (BatchNorm statistics) are averaged the same way."""
    from rwray.train.epoch import weight_ema

    class WithNorm(Tiny):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(4)

        def forward(self, x, return_features=False):
            feats = self.norm(x.flatten(1))
            return (self.fc(feats), feats) if return_features else self.fc(feats)

    torch.manual_seed(0)
    decay = 0.8
    model = WithNorm()
    ema = weight_ema(model, decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    for b in batches():  # one update per batch, the state after each recorded
        train_epoch(model, METHODS.build(ERMParams(), INFO), opt, [b], epoch=0, ema=ema)
        snapshots.append({k: v.detach().clone().float() for k, v in model.state_dict().items()})
    want = dict(snapshots[0])
    for snap in snapshots[1:]:
        want = {k: decay * want[k] + (1 - decay) * snap[k] for k in want}
    got = ema.module.state_dict()
    for k in ("fc.weight", "fc.bias", "norm.running_mean", "norm.running_var"):
        torch.testing.assert_close(got[k].float(), want[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["fc.weight"], model.fc.weight)  # an average, not the last weights
