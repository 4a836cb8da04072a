"""GroupDRO against Sagawa et al.'s online algorithm written out by hand, its groups, and 2 workers = 1."""

from __future__ import annotations

import math

import pytest
import torch

from rwray.datainfo import DataInfo
from rwray.errors import DataError
from rwray.methods import METHODS, StepInputs, weighted_loss
from rwray.methods.group_dro import GroupDROParams, group_dro_weights

INFO = DataInfo(3, (50, 20, 5), (1, 2, 2), 75, extra_columns=("bias",))
LOSSES = [0.2, 1.5, 0.7, 2.5, 0.1, 0.9]
GROUPS = [0, 1, 0, 2, 0, 1]


def hand_step(losses, groups, q, eta):
    """The paper's Algorithm 1 for one batch: per-group mean losses, q_g * exp(eta * l_g), normalised; the
    objective sum_g q_g * l_g."""
    g_loss = []
    for g in range(len(q)):
        mine = [l for l, k in zip(losses, groups) if k == g]
        g_loss.append(sum(mine) / len(mine) if mine else 0.0)
    raw = [qg * math.exp(eta * lg) for qg, lg in zip(q, g_loss)]
    new_q = [r / sum(raw) for r in raw]
    return new_q, sum(qg * lg for qg, lg in zip(new_q, g_loss))


def test_weights_reproduce_the_papers_update_and_objective():
    q = [1 / 3] * 3
    w, new_q, _ = group_dro_weights(torch.tensor(LOSSES), torch.tensor(GROUPS), torch.tensor(q, dtype=torch.float64),
                                    eta=0.5)
    want_q, want_objective = hand_step(LOSSES, GROUPS, q, 0.5)
    torch.testing.assert_close(new_q, torch.tensor(want_q, dtype=torch.float64))
    # the loop's one reduction, mean_i(w_i * l_i), is the q-weighted sum of group losses
    assert float((w * torch.tensor(LOSSES)).mean()) == pytest.approx(want_objective, rel=1e-6)


def test_the_method_keeps_q_across_steps_and_in_its_state():
    method = METHODS.build(GroupDROParams(eta=0.5), INFO)
    q = [1 / 3] * 3
    y = torch.tensor(GROUPS)  # group = class
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        z = (3 * torch.randn(6, 3, generator=g)).requires_grad_()
        ce = [-math.log(math.exp(row[t]) / sum(math.exp(v) for v in row)) for row, t in zip(z.tolist(), GROUPS)]
        out = method.step(StepInputs(None, None, y, torch.arange(6), z, torch.empty(6, 0), 0, step))  # type: ignore
        q, objective = hand_step(ce, GROUPS, q, 0.5)
        assert weighted_loss(out).item() == pytest.approx(objective, rel=1e-5)
        assert out.metrics["gdro/worst_group_loss"] == pytest.approx(max(
            sum(c for c, k in zip(ce, GROUPS) if k == grp) / GROUPS.count(grp) for grp in range(3)), rel=1e-5)
    torch.testing.assert_close(method.q, torch.tensor(q, dtype=torch.float64))
    fresh = METHODS.build(GroupDROParams(eta=0.5), INFO)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.q, method.q)
    assert set(method.end_epoch(0)) == {"gdro/q_0", "gdro/q_1", "gdro/q_2"}


def test_groups_from_a_column_and_crossed_with_the_class():
    y, bias = torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 1])
    inputs = StepInputs(None, None, y, torch.arange(4), torch.zeros(4, 3), torch.empty(4, 0), 0, 0,  # type: ignore
                        {"bias": bias})
    column = METHODS.build(GroupDROParams(group="bias", num_groups=3), INFO)
    assert column.num_groups == 3 and column.group_ids(inputs).tolist() == [2, 0, 1, 1]
    cells = METHODS.build(GroupDROParams(group="bias", num_groups=3, cross_class=True), INFO)
    assert cells.num_groups == 9 and cells.group_ids(inputs).tolist() == [2, 3, 7, 4]  # y * 3 + bias
    with pytest.raises(DataError, match="outside 0..1"):
        METHODS.build(GroupDROParams(group="bias", num_groups=2), INFO).group_ids(inputs)
    with pytest.raises(DataError, match="'location' is not in the data"):
        METHODS.build(GroupDROParams(group="location", num_groups=4), INFO)


def test_bad_settings_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set num_groups"):
        GroupDROParams(group="bias")
    with pytest.raises(ValidationError, match="no column"):
        GroupDROParams(cross_class=True)


# ----- 1 worker vs 2 workers, for real (gloo on 127.0.0.1) ----------------------------------------------------------
def _rank(rank: int, world: int) -> dict:
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    out = []
    for step in range(3):
        losses = torch.tensor(LOSSES) * (step + 1)
        half = slice(rank * 3, rank * 3 + 3)  # rank 0: groups 0, 1, 0; rank 1: groups 2, 0, 1
        w, q, _ = group_dro_weights(losses[half], torch.tensor(GROUPS)[half], q, 0.5)
        out.append(w)
    return {"w": out, "q": q}


def test_two_workers_equal_one_worker(gloo):
    ranks = gloo(_rank)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    for step in range(3):
        w, q, _ = group_dro_weights(torch.tensor(LOSSES) * (step + 1), torch.tensor(GROUPS), q, 0.5)
        torch.testing.assert_close(torch.cat([r["w"][step] for r in ranks]), w)
    for r in ranks:
        torch.testing.assert_close(r["q"], q)


def test_a_job_whose_data_lacks_what_it_asks_fails_before_any_worker(tmp_path, digits_dir):
    """Checked on the driver against the manifest (rwray.train.preflight.check_fit): a group column the data does
    not have, or selection on bias cells of data without a bias column."""
    from conftest import job

    from rwray.errors import ConfigError
    from rwray.train.preflight import ensure_data

    with pytest.raises(DataError, match="group column 'bias' is not in the data"):
        ensure_data(job(tmp_path, digits_dir, method={"name": "group_dro", "group": "bias", "num_groups": 10}))
    with pytest.raises(ConfigError, match="needs a 'bias' column"):
        ensure_data(job(tmp_path, digits_dir, train={"select_metric": "val/bias/worst_cell_acc"}))
    assert ensure_data(job(tmp_path, digits_dir, method={"name": "group_dro"},
                           train={"select_metric": "val/worst_class_acc"})).num_samples("val") > 0
