"""Training features the loop offers every method: gradient clipping, label smoothing, a weight EMA, fp16 with a
loss scale, channels_last and torch.compile, each against torch's own semantics written out step by step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet as Tiny

from rwray.datainfo import DataInfo
from rwray.losses import LOSSES
from rwray.losses.ce import CEParams
from rwray.methods import METHODS
from rwray.methods.erm import ERMParams
from rwray.metrics import TRAIN_CLIPPED, TRAIN_GRAD_NORM
from rwray.train.batches import Batch
from rwray.train.epoch import train_epoch

INFO = DataInfo(3, (5, 5, 5), (1, 2, 2), 15)


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


def test_fp16_skips_the_updates_whose_scaled_gradients_overflow_and_halves_the_scale():
    """train.amp=fp16: gradients are taken of loss x scale in float16; a step whose gradients overflowed is
    skipped (weights and EMA untouched) and the scale halved, until the scaled gradients fit."""
    from rwray.metrics import TRAIN_SKIPPED
    from rwray.train.epoch import weight_ema

    torch.manual_seed(0)
    model = Tiny()
    ema = weight_ema(model, 0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # 1e12 x a gradient of ~1 is inf in float16
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = train_epoch(model, METHODS.build(ERMParams(), INFO), opt, batches(2), epoch=0, amp="fp16", scaler=scaler,
                    ema=ema)
    assert m[TRAIN_SKIPPED] == 1.0 and scaler.get_scale() == 2.0**38  # both steps skipped, halved twice
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k])
    assert int(ema.n_averaged) == 0  # the average never moved
    for _ in range(20):  # after enough halvings the scaled gradients fit and the updates happen
        m = train_epoch(model, METHODS.build(ERMParams(), INFO), opt, batches(2), epoch=1, amp="fp16",
                        scaler=scaler, ema=ema)
        if m[TRAIN_SKIPPED] == 0.0:
            break
    assert 1.0 < scaler.get_scale() < 2.0**38
    ema = weight_ema(model, 0.5)
    m = train_epoch(model, METHODS.build(ERMParams(), INFO), opt, batches(2), epoch=2, amp="fp16", scaler=scaler,
                    ema=ema)
    assert m[TRAIN_SKIPPED] == 0.0 and int(ema.n_averaged) == 2
    assert not torch.equal(model.fc.weight, start["fc.weight"])


def test_fp16_without_overflow_takes_the_float32_step_up_to_float16_rounding():
    torch.manual_seed(0)
    half, full = Tiny(), Tiny()
    full.load_state_dict(half.state_dict())
    from rwray.metrics import TRAIN_SKIPPED

    erm = METHODS.build(ERMParams(), INFO)
    m = train_epoch(half, erm, torch.optim.SGD(half.parameters(), lr=0.1), batches(), 0, amp="fp16",
                    scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert m[TRAIN_SKIPPED] == 0.0
    train_epoch(full, erm, torch.optim.SGD(full.parameters(), lr=0.1), batches(), 0)
    torch.testing.assert_close(half.fc.weight, full.fc.weight, rtol=2e-2, atol=2e-3)


# ----- memory layout and torch.compile -----------------------------------------------------------------------------
def small_cnn_and_batches():
    from rwray.models import MODELS
    from rwray.models.small_cnn import SmallCNNParams

    info = DataInfo(3, (5, 5, 5), (3, 8, 8), 15)
    g = torch.Generator().manual_seed(2)
    data = [Batch(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g), torch.arange(4))
            for _ in range(3)]
    torch.manual_seed(0)
    return MODELS.build(SmallCNNParams(width=8), info), info, data


def test_channels_last_trains_the_same_model_and_batches_come_in_that_layout():
    from rwray.train.batches import Images

    model, info, data = small_cnn_and_batches()
    ref, _, _ = small_cnn_and_batches()  # the same initial weights
    model = model.to(memory_format=torch.channels_last)
    last = [Batch(b.x.contiguous(memory_format=torch.channels_last), b.y, b.index) for b in data]
    train_epoch(model, METHODS.build(ERMParams(), info), torch.optim.SGD(model.parameters(), lr=0.1), last, 0)
    train_epoch(ref, METHODS.build(ERMParams(), info), torch.optim.SGD(ref.parameters(), lr=0.1), data, 0)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    rows = {"image": torch.randint(0, 255, (2, 3 * 8 * 8), dtype=torch.uint8), "label": torch.tensor([0, 1]),
            "index": torch.tensor([5, 6])}
    x = Images(info, [0.5] * 3, [0.25] * 3, torch.device("cpu"), channels_last=True)(rows).x
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (2, 3, 8, 8)


def test_a_compiled_model_trains_as_the_eager_one_and_unwraps_to_the_module():
    from rwray import dist
    from rwray.train.compiling import compile_model

    model, info, data = small_cnn_and_batches()
    ref, _, _ = small_cnn_and_batches()
    compiled = compile_model(model, "erm", True, "eager", torch.device("cpu"))  # dynamo capture, no codegen
    assert compiled is not model and dist.unwrap(compiled) is model
    assert set(dist.unwrap(compiled).state_dict()) == set(ref.state_dict())  # no '_orig_mod.' prefix
    train_epoch(compiled, METHODS.build(ERMParams(), info), torch.optim.SGD(compiled.parameters(), lr=0.1), data, 0)
    train_epoch(ref, METHODS.build(ERMParams(), info), torch.optim.SGD(ref.parameters(), lr=0.1), data, 0)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_where_it_cannot_run_is_one_message_naming_the_setting():
    from rwray.errors import CompileUnavailable
    from rwray.train.compiling import compile_model

    with pytest.raises(CompileUnavailable, match="train.compile=false") as e:
        compile_model(Tiny(), "erm", True, "no-such-backend", torch.device("cpu"))
    assert "no-such-backend" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CompileUnavailable, match="method 'batch_reweight'"):
        compile_model(Tiny(), "batch_reweight", METHODS["batch_reweight"].build.supports_compile, "eager",
                      torch.device("cpu"))


def test_an_epoch_reports_where_its_time_went():
    """time/data_wait_s counts the time spent blocked on the input (here a loader sleeping 50 ms before each of
    3 batches), time/train_s the whole epoch; the one worker's samples/s is its samples over that."""
    import time

    from rwray.metrics import DATA_WAIT_FRAC, DATA_WAIT_S, TRAIN_S, WORKER_SAMPLES_PER_S

    def slow():
        for b in batches():
            time.sleep(0.05)
            yield b

    torch.manual_seed(0)
    model = Tiny()
    m = train_epoch(model, METHODS.build(ERMParams(), INFO), torch.optim.SGD(model.parameters(), lr=0.1), slow(), 0)
    assert m[DATA_WAIT_S] >= 0.15 and m[TRAIN_S] >= m[DATA_WAIT_S]
    assert m[DATA_WAIT_FRAC] == pytest.approx(m[DATA_WAIT_S] / m[TRAIN_S])
    assert m[f"{WORKER_SAMPLES_PER_S}0"] == pytest.approx(12 / m[TRAIN_S])
