"""τ-norm (Kang et al. 2020), decoupled training's third second stage: the first-stage classifier's weight rows
rescaled to w_k / ‖w_k‖^τ, its bias dropped, and the model evaluated once without training. The math against a
hand-written formula; the config's checks; an evaluation-only run on Ray whose metrics are an independent evaluation
of the first stage normalised by hand; and a `rwray tune` sweep over τ that selects on validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import job
from rwray import config as C
from rwray.datainfo import DataInfo
from rwray.errors import ConfigError
from rwray.models import MODELS
from rwray.models.layers import NormedLinear
from rwray.models.small_cnn import SmallCNNParams
from rwray.train import checkpoint
from rwray.train.decoupled import apply_tau_norm, prepare_stage, tau_normalize

INFO = DataInfo(3, (5, 5, 5), (1, 8, 8), 15)


def by_hand(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_k / ‖w_k‖₂^τ, one row at a time, from the definition."""
    return torch.stack([row / math.sqrt(sum(float(v) ** 2 for v in row)) ** tau for row in weight])


# ------------------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_tau_normalize_is_each_row_over_its_norm_to_the_tau(tau):
    w = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.0, -0.4], [1.0, 2.0, 2.0], [-6.0, 8.0, 0.0]],
                     dtype=torch.float64)  # [K=4, D=3], norms 5, 0.5, 3, 10
    got = tau_normalize(w, tau)
    torch.testing.assert_close(got, by_hand(w, tau), rtol=1e-12, atol=0)
    if tau == 0:
        assert torch.equal(got, w)  # τ = 0 leaves the rows as they are, bit for bit
    if tau == 1:
        torch.testing.assert_close(got.norm(dim=1), torch.ones(4, dtype=torch.float64))
    if tau == 0.5:  # the norms shrink to their square roots: the head / tail spread is halved on a log scale
        torch.testing.assert_close(got.norm(dim=1), torch.tensor([5.0, 0.5, 3.0, 10.0], dtype=torch.float64).sqrt())


def test_a_zero_row_stays_zero():
    w = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.equal(tau_normalize(w, 1.0), torch.tensor([[0.0, 0.0], [0.6, 0.8]]))


def test_apply_tau_norm_rescales_the_weight_and_drops_the_bias():
    torch.manual_seed(0)
    head = nn.Linear(6, 3)
    w = head.weight.detach().clone()
    apply_tau_norm(head, 0.5)
    torch.testing.assert_close(head.weight.detach(), by_hand(w, 0.5))
    assert torch.equal(head.bias.detach(), torch.zeros(3))  # classifier-balancing's tau_norm.py scores x · ŵᵀ


def test_a_cosine_head_is_refused():
    with pytest.raises(ConfigError, match="normed_head: true is a cosine classifier"):
        apply_tau_norm(NormedLinear(6, 3), 1.0)


def test_prepare_stage_loads_the_first_stage_then_normalises_its_classifier(tmp_path):
    torch.manual_seed(0)
    first = MODELS.build(SmallCNNParams(width=8), INFO)
    second = prepare_stage(MODELS.build(SmallCNNParams(width=8), INFO), 3, tmp_path, "none", False,
                           {"model": first.state_dict()}, tau_norm=1.0)
    a, b = first.state_dict(), second.state_dict()
    for k in a:
        if not k.startswith("fc."):
            assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(b["fc.weight"], by_hand(a["fc.weight"], 1.0))
    assert torch.equal(b["fc.bias"], torch.zeros(3))
    # nothing is frozen: the evaluation-only loop takes no step, and DDP needs a parameter that wants gradients
    assert all(p.requires_grad for p in second.parameters())


# ---------------------------------------------------------------------------------------------------- the config


def _problems(**train) -> list[str]:
    with pytest.raises(ConfigError) as e:
        C.validate({"data": {"dir": "d"}, "model": {"name": "small_cnn"}, "train": train})
    return e.value.problems


def test_every_tau_norm_problem_is_reported_at_once_at_its_path():
    assert C.validate({"data": {"dir": "d"}, "model": {"name": "small_cnn"},
                       "train": {"init_from": "c", "trainable": "none", "tau_norm": 0.0, "epochs": 1}}
                      ).train.tau_norm == 0.0
    got = _problems(tau_norm=1.0)  # no first stage, and trainable left at all
    assert [p.split(":")[0] for p in got] == ["train.init_from", "train.trainable"]
    assert "set train.init_from" in got[0] and "set train.trainable: none" in got[1]
    got = _problems(init_from="c", trainable="none", reinit_classifier=True)  # epochs left at 10
    assert [p.split(":")[0] for p in got] == ["train.tau_norm", "train.reinit_classifier", "train.epochs"]
    assert "set train.tau_norm" in got[0] and "set train.epochs: 1 (got 10)" in got[2]
    assert _problems(init_from="c", trainable="classifier", tau_norm=0.5)[0].startswith(
        "train.trainable: tau_norm rescales the first stage's classifier without training it")
    assert _problems(init_from="c", trainable="none", epochs=1, tau_norm=-0.5) == [
        "train.tau_norm: Input should be greater than or equal to 0 (got -0.5)"]


# --------------------------------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, digits_dir, ray_local):
    """(root, result) of a 2-epoch ERM first stage under root/runs: every second stage here writes there too."""
    from rwray.train.launch import run

    root = tmp_path_factory.mktemp("tau")
    return root, run(job(root, digits_dir, name="stage1", scaling={"num_workers": 1}, train={"epochs": 2}))


def _normalised_by_hand(cfg, first_state: dict, tau: float, digits_dir) -> dict[str, float]:
    """top1 and balanced accuracy of the first stage with its classifier normalised by hand, on the val and test
    shards read here (not through the loop's input)."""
    import pyarrow.parquet as pq

    from rwray.data import Manifest
    from rwray.train.batches import Images, arrow_rows

    m = Manifest.load(digits_dir)
    info = m.data_info()
    model = MODELS.build(cfg.model, info)
    model.load_state_dict(first_state)
    with torch.no_grad():
        model.fc.weight.copy_(by_hand(first_state["fc.weight"].double(), tau).float())
        model.fc.bias.zero_()
    model.eval()
    out = {}
    for split in ("val", "test"):
        batch = Images(info, m.mean, m.std, torch.device("cpu"))(arrow_rows(pq.read_table(m.shard_paths(split))))
        with torch.no_grad():
            pred = model(batch.x).argmax(1)
        right = (pred == batch.y).double()
        recalls = [right[batch.y == c].mean() for c in range(info.num_classes) if (batch.y == c).any()]
        out[f"{split}/top1"] = float(right.mean())
        out[f"{split}/balanced_acc"] = float(torch.stack(recalls).mean())
    return out


def test_a_tau_norm_run_only_evaluates_the_normalised_first_stage(stage1, digits_dir):
    """Two workers, τ = 0.5: no step (the optimizer has no state, no train/* metric), one epoch logged as epoch 0,
    a checkpoint whose features are stage 1's bit for bit, and val / test metrics equal to an independent
    evaluation of stage 1 with its classifier normalised by hand."""
    from mlflow import MlflowClient

    from rwray.train.launch import run

    root, first = stage1
    cfg = job(root, digits_dir, name="tau-0.5", train={"epochs": 1, "init_from": first.checkpoint_path,
                                                        "trainable": "none", "tau_norm": 0.5})
    res = run(cfg)
    assert not [k for k in res.metrics if k.startswith("train/")]
    assert res.metrics["best/epoch"] == 0
    state = checkpoint.load(res.checkpoint_path)
    assert state["epoch"] == 0 and state["optimizer"]["state"] == {}
    a, b = checkpoint.load(first.checkpoint_path)["model"], state["model"]
    for k in a:
        if not k.startswith("fc."):
            assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(b["fc.weight"].double(), by_hand(a["fc.weight"].double(), 0.5), rtol=1e-6, atol=1e-7)
    want = _normalised_by_hand(cfg, a, 0.5, digits_dir)
    for key, value in want.items():
        assert res.metrics[key] == pytest.approx(value, abs=1e-12), key
    assert res.metrics["best/test/top1"] == pytest.approx(want["test/top1"], abs=1e-12)  # best is this epoch
    client = MlflowClient(res.tracking_uri)
    assert [(p.step, p.value) for p in client.get_metric_history(res.run_id, "val/top1")] == [
        (0, pytest.approx(want["val/top1"], abs=1e-12))]
    assert client.get_run(res.run_id).info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(res.run_id, "checkpoints/best")] == ["checkpoints/best/state.pt"]


def test_a_tau_sweep_selects_tau_on_validation(stage1, digits_dir):
    """`rwray tune` over train.tau_norm: every trial completes its one epoch, and the best trial (best.yaml) is the
    τ with the highest validation balanced accuracy."""
    from rwray.sweep import load_best, sweep

    root, first = stage1
    cfg = job(root, digits_dir, name="tau-sweep", scaling={"num_workers": 1},
              train={"epochs": 1, "init_from": first.checkpoint_path, "trainable": "none", "tau_norm": 1.0},
              tune={"space": {"train.tau_norm": {"grid": [0.0, 1.0]}}, "num_samples": 1, "search": "grid",
                    "scheduler": {"name": "fifo"}})
    res = sweep(cfg)
    assert sorted(r["train.tau_norm"] for r in res.rows) == [0.0, 1.0]
    assert {r["status"] for r in res.rows} == {"completed"}
    best = max(res.rows, key=lambda r: r["val/balanced_acc"])
    assert load_best(res.best_config_path).train.tau_norm == best["train.tau_norm"] == res.best["train.tau_norm"]


def test_an_evaluation_only_epoch_line_says_so_instead_of_loss_and_throughput():
    from rwray.train.progress import progress_line

    m = {"val/balanced_acc": 0.5, "test/balanced_acc": 0.25, "best/val/balanced_acc": 0.5, "best/epoch": 0}
    assert progress_line(0, 1, m, "val/balanced_acc") == (
        "epoch   1/1  evaluation only  val bal-acc  50.0  test bal-acc  25.0  best val/balanced_acc=50.0 @ 1")
