"""JTT: ERM until the identification stage ends, then the samples it got wrong weighted λ_up; the error set is
gathered from every worker."""

from __future__ import annotations

import torch

from rwray.datainfo import DataInfo
from rwray.methods import METHODS, StepInputs
from rwray.methods.jtt import JTTParams, jtt_weights

INFO = DataInfo(3, (5, 5, 5), (1, 2, 2), 15)
# 6 samples: logits' argmax is right for ids 10, 12, 14 and wrong for 11, 13, 15
Z = torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [0, 0, 3.0], [0, 3.0, 0]])
Y = torch.tensor([0, 1, 1, 0, 2, 2])
IDS = torch.arange(10, 16)


def step(method, sl=slice(None)):
    return method.step(StepInputs(None, None, Y[sl], IDS[sl], Z[sl], torch.empty(len(Y[sl]), 0), 0, 0))  # type: ignore


def test_erm_during_identification_then_the_errors_of_its_last_epoch_are_up_weighted():
    m = METHODS.build(JTTParams(identify_epochs=2, lam_up=5.0), INFO)
    for epoch in (0, 1):
        m.begin_epoch(epoch)
        assert torch.equal(step(m).weights, torch.ones(6))
        end = m.end_epoch(epoch)
    assert end == {"jtt/error_set_size": 3.0} and m.error_set.tolist() == [11, 13, 15]
    m.begin_epoch(2)
    assert step(m).weights.tolist() == [1.0, 5.0, 1.0, 5.0, 1.0, 5.0]
    fresh = METHODS.build(JTTParams(identify_epochs=2, lam_up=5.0), INFO)  # a resumed run keeps the set
    fresh.load_state_dict(m.state_dict())
    fresh.begin_epoch(3)
    assert step(fresh).weights.tolist() == [1.0, 5.0, 1.0, 5.0, 1.0, 5.0]


def test_weights_of_ids_in_and_out_of_the_set():
    w = jtt_weights(torch.tensor([7, 2, 9, 100, 0]), torch.tensor([2, 9, 50]), 3.0, torch.float32)
    assert w.tolist() == [1.0, 3.0, 3.0, 1.0, 1.0]
    assert jtt_weights(torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64), 3.0, torch.float32).tolist() == [1, 1]


def _rank(rank: int, world: int) -> list[int]:
    m = METHODS.build(JTTParams(identify_epochs=1, lam_up=5.0), INFO)
    m.begin_epoch(0)
    step(m, slice(rank * 3, rank * 3 + 3))  # rank 0 sees ids 10-12 (error: 11), rank 1 ids 13-15 (13, 15)
    m.end_epoch(0)
    return m.error_set.tolist()


def test_the_error_set_is_gathered_from_every_worker(gloo):
    assert gloo(_rank) == [[11, 13, 15], [11, 13, 15]]
