"""Decoupled training's second stage: a frozen representation stays bit-for-bit the first stage's (weights and
BatchNorm statistics) while the classifier trains; a checkpoint of another model is refused before any worker;
a cRT run on Ray keeps the features and retrains the head."""

from __future__ import annotations

import pytest
import torch

from conftest import job
from rwray.datainfo import DataInfo
from rwray.errors import ConfigError
from rwray.methods import METHODS
from rwray.methods.erm import ERMParams
from rwray.models import MODELS
from rwray.models.small_cnn import SmallCNNParams
from rwray.train import checkpoint
from rwray.train.batches import Batch
from rwray.train.decoupled import freeze_features, prepare_stage
from rwray.train.epoch import train_epoch

INFO = DataInfo(3, (5, 5, 5), (1, 8, 8), 15)


def batches() -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    return [Batch(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8))
            for _ in range(3)]


@pytest.mark.parametrize("normed", [False, True])
def test_a_frozen_representation_keeps_weights_and_batchnorm_statistics_and_the_head_trains(normed):
    torch.manual_seed(0)
    model = MODELS.build(SmallCNNParams(width=8, normed_head=normed), INFO)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_features(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                          weight_decay=1e-3)
    train_epoch(model, METHODS.build(ERMParams(), INFO), opt, batches(), 0)
    after = model.state_dict()
    frozen = [k for k in before if not k.startswith("fc.")]
    assert any("running_mean" in k for k in frozen)  # BatchNorm statistics are among what must not move
    for k in frozen:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert model.training  # the loop's own flag is untouched; the frozen parts run in eval mode regardless


def test_frozen_mode_train_keeps_weights_but_batchnorm_runs_on_batch_statistics_as_upstream():
    """frozen_mode train (Balanced Meta-Softmax's loop): no weight moves, but the first BatchNorm normalises each
    batch with its own statistics and its running mean moves by exactly momentum · (batch mean − running mean)."""
    torch.manual_seed(0)
    model = MODELS.build(SmallCNNParams(width=8), INFO)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_features(model, "train")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                          weight_decay=1e-3)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    conv_out = {}
    bn.register_forward_pre_hook(lambda m, a: conv_out.setdefault("x", a[0].detach().clone()))
    one = batches()[:1]
    train_epoch(model, METHODS.build(ERMParams(), INFO), opt, one, 0)
    after = model.state_dict()
    name = next(k for k, m in model.named_modules() if m is bn)
    x = conv_out["x"]  # [B, C, H, W] what the first BatchNorm saw
    expected = (1 - bn.momentum) * before[f"{name}.running_mean"] + bn.momentum * x.mean(dim=(0, 2, 3))  # [C]
    torch.testing.assert_close(after[f"{name}.running_mean"], expected)
    weights = [k for k, p in model.named_parameters() if not k.startswith("fc.")]
    assert weights and all(torch.equal(after[k], before[k]) for k in weights)  # weights frozen as in eval mode
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def test_frozen_mode_needs_a_frozen_representation(tmp_path, digits_dir):
    with pytest.raises(ConfigError, match="frozen_mode") as e:
        job(tmp_path, digits_dir, train={"frozen_mode": "train"})
    assert "trainable: classifier or scales" in str(e.value)


def test_init_from_loads_the_first_stage_and_reinit_draws_a_new_head(tmp_path):
    torch.manual_seed(0)
    first = MODELS.build(SmallCNNParams(width=8), INFO)
    state = {"model": first.state_dict()}
    second = prepare_stage(MODELS.build(SmallCNNParams(width=8), INFO), 3, tmp_path, "classifier", True, state)
    for k, v in first.state_dict().items():
        assert torch.equal(second.state_dict()[k], v) != k.startswith("fc.")  # all but the head equal
    assert [n for n, p in second.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_a_checkpoint_of_another_model_is_refused_before_any_worker(tmp_path, digits_dir):
    from rwray.train.preflight import ensure_data, resolve_paths

    cfg = job(tmp_path, digits_dir, model={"name": "small_cnn", "width": 16})
    other = MODELS.build(SmallCNNParams(width=8), DataInfo(10, (1,) * 10, (1, 8, 8), 10))
    folder = tmp_path / "runs" / "ray" / "first" / "checkpoint_0"
    checkpoint.save(folder, {"model": other.state_dict()}, cfg.to_yaml())
    second = resolve_paths(job(tmp_path, digits_dir, model={"name": "small_cnn", "width": 16},
                               train={"init_from": str(folder), "trainable": "classifier"}))
    with pytest.raises(ConfigError, match="holds another model than this job's") as e:
        ensure_data(second)
    assert "size mismatch" in str(e.value) and "Fix:" in str(e.value)


def test_crt_on_ray_keeps_the_first_stage_features_and_retrains_the_head(tmp_path, digits_dir, ray_local):
    """Stage 1: ERM. Stage 2 (cRT): init_from stage 1's last checkpoint, classifier only, re-initialised,
    class-balanced batches, 2 workers; and stage 2 as BALMS (meta_sampler). The features of the second stages'
    checkpoints are stage 1's, bit for bit."""
    from rwray.train.launch import run

    first = run(job(tmp_path, digits_dir, name="stage1", train={"epochs": 1}))
    second = run(job(tmp_path, digits_dir, name="stage2", data={"sampler": "class_balanced"},
                     train={"epochs": 1, "init_from": first.checkpoint_path, "trainable": "classifier",
                            "reinit_classifier": True}))
    # BALMS: the Meta Sampler's class weights on uniform batches, its rates learned on the all-gathered batch
    balms = run(job(tmp_path, digits_dir, name="stage2-balms", method={"name": "meta_sampler", "init_pow": 0.3},
                    train={"epochs": 1, "init_from": first.checkpoint_path, "trainable": "classifier",
                           "reinit_classifier": True}))
    a = checkpoint.load(first.checkpoint_path)["model"]
    for second_stage in (second, balms):
        b = checkpoint.load(second_stage.checkpoint_path)["model"]
        for k in a:
            assert torch.equal(a[k], b[k]) != k.startswith("fc."), k
        assert 0 <= second_stage.metrics["val/balanced_acc"] <= 1
    assert balms.metrics["meta/loss"] > 0 and balms.metrics["meta/classes_in_meta_set"] == 10
    assert balms.metrics["meta/weight_max"] > balms.metrics["meta/weight_min"]  # init_pow 0.3: rare classes weigh more


def test_a_second_stage_without_a_first_is_refused():
    from rwray import config as C

    with pytest.raises(ConfigError, match="set train.init_from"):
        C.validate({"name": "x", "data": {"dir": "d"}, "train": {"trainable": "classifier"}})


@pytest.mark.parametrize("normed", [False, True])
def test_lws_learns_only_per_class_scales_starting_from_the_first_stage_logits(normed, tmp_path):
    torch.manual_seed(0)
    first = MODELS.build(SmallCNNParams(width=8, normed_head=normed), INFO)
    first.eval()
    x = batches()[0].x
    with torch.no_grad():
        want = first(x)
    lws = prepare_stage(MODELS.build(SmallCNNParams(width=8, normed_head=normed), INFO), 3, tmp_path, "scales",
                        False, {"model": first.state_dict()})
    lws.eval()
    with torch.no_grad():
        torch.testing.assert_close(lws(x), want)  # scales start at 1: the first stage's classifier exactly
    assert [n for n, p in lws.named_parameters() if p.requires_grad] == ["fc.scale"]
    before = {k: v.clone() for k, v in lws.state_dict().items()}
    lws.train()
    opt = torch.optim.SGD([p for p in lws.parameters() if p.requires_grad], lr=0.5)
    train_epoch(lws, METHODS.build(ERMParams(), INFO), opt, batches(), 0)
    for k, v in lws.state_dict().items():
        assert torch.equal(v, before[k]) == (k != "fc.scale"), k
