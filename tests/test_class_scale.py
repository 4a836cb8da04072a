"""What grows with the number of classes, at the real figures: iNaturalist's K = 8,142 (ImageNet-LT's 1,000 and the
CIFAR-100 bound of 100 around the threshold). Counts stay O(N + K) (never a dense K x K), metrics logged per class
stop at CLASS_METRICS_MAX, figures keep a bounded size and the terminal a bounded number of lines, and every number
equals a hand-written reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from rwray import plots
from rwray.metrics import (CLASS_METRICS_MAX, Confusion, class_columns, group_confusion, macro_f1,
                           most_confused_classes, per_class_accuracy, split_metrics, sub_confusion, summarize)
from rwray.train.batches import Batch
from rwray.train.epoch import evaluate

INAT_K = 8142


def long_tail_counts(k: int, head: int = 1000, tail: int = 2) -> list[int]:
    """[K] training counts falling exponentially from ``head`` to ``tail``."""
    return [max(tail, round(head * (tail / head) ** (c / (k - 1)))) for c in range(k)]


def predictions(k: int, n: int, right: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] targets (every class about as often) and [n] predictions, right with probability ``right``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    wrong = torch.randint(0, k, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < right, y, wrong), y


def reference(p: np.ndarray, y: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-class counts by plain numpy: correct, support, predicted [K]."""
    return {"correct": np.bincount(y[p == y], minlength=k), "support": np.bincount(y, minlength=k),
            "predicted": np.bincount(p, minlength=k)}


def test_sparse_counts_equal_a_dense_matrix_and_every_metric_its_formula():
    k = 50
    p, y = predictions(k, 3000, 0.6)
    conf = Confusion.of(p, y, k)
    dense = torch.bincount(y * k + p, minlength=k * k).reshape(k, k)
    assert torch.equal(conf.dense(), dense)
    ref = reference(p.numpy(), y.numpy(), k)
    correct, support, predicted = (v.numpy() for v in conf.per_class())
    assert (correct == ref["correct"]).all() and (support == ref["support"]).all()
    assert (predicted == ref["predicted"]).all()
    acc = ref["correct"] / ref["support"]
    counts = long_tail_counts(k, 500, 5)
    s = summarize(conf, counts)
    assert s["top1"] == pytest.approx((p == y).double().mean().item(), abs=1e-12)
    assert s["balanced_acc"] == pytest.approx(acc.mean(), abs=1e-12)
    many = [c for c in range(k) if counts[c] > 100]
    few = [c for c in range(k) if counts[c] < 20]
    assert s["many_acc"] == pytest.approx(acc[many].mean(), abs=1e-12)
    assert s["few_acc"] == pytest.approx(acc[few].mean(), abs=1e-12)
    f1 = 2 * ref["correct"] / (ref["support"] + ref["predicted"])
    assert macro_f1(conf) == pytest.approx(f1.mean(), abs=1e-12)
    assert Confusion.from_state(conf.state_dict()).pairs.equal(conf.pairs)
    assert Confusion.from_state(dense).counts.equal(conf.counts)  # a checkpoint written with a dense matrix


class MaxNumel(TorchDispatchMode):
    """The largest tensor any torch op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_evaluating_at_inaturalist_k_allocates_nothing_k_by_k():
    k, n, d = INAT_K, 4000, 8
    torch.manual_seed(0)
    model = torch.nn.Linear(d, k)
    x = torch.randn(n, d)
    y = model(x).argmax(1).detach()
    y[::3] = torch.randint(0, k, (len(y[::3]),))  # a third relabelled: mostly wrong there
    batches = [Batch(x[i:i + 500], y[i:i + 500], torch.arange(i, min(i + 500, n))) for i in range(0, n, 500)]
    with MaxNumel() as seen:
        counts = evaluate(model, batches, k)
    assert seen.largest <= 500 * k  # the logits of one batch; a dense matrix would be k * k = 66 million
    conf = counts.confusion
    assert conf.pairs.numel() <= n and conf.total() == n
    preds = model(x).argmax(1).detach()
    ref = reference(preds.numpy(), y.numpy(), k)
    correct, support, _ = (v.numpy() for v in conf.per_class())
    assert (correct == ref["correct"]).all() and (support == ref["support"]).all()
    m = split_metrics("test", conf, None, long_tail_counts(k))
    assert m["test/top1"] == pytest.approx(ref["correct"].sum() / n, abs=1e-12)
    present = ref["support"] > 0
    assert m["test/balanced_acc"] == pytest.approx((ref["correct"][present] / ref["support"][present]).mean(),
                                                   abs=1e-12)
    assert m["test/worst_class_acc"] == 0.0
    assert not any("/class_acc/" in key for key in m) and len(m) <= 10


def _rank_evaluates(rank: int, world: int, k: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, k)
    x, y = torch.randn(600, 4), torch.randint(0, k, (600,))
    mine = slice(rank, None, world)  # the eval split divided by index % world, as the loop does
    conf = evaluate(model, [Batch(x[mine], y[mine], torch.arange(600)[mine])], k).confusion
    return {"pairs": conf.pairs, "counts": conf.counts}


def test_two_workers_count_exactly_what_one_counts(gloo):
    k = 1000
    ranks, whole = gloo(_rank_evaluates, k, meanwhile=lambda: _rank_evaluates(0, 1, k))
    for r in ranks:
        assert torch.equal(r["pairs"], whole["pairs"]) and torch.equal(r["counts"], whole["counts"])


@pytest.mark.parametrize("k", [10, CLASS_METRICS_MAX, CLASS_METRICS_MAX + 1, INAT_K])
def test_per_class_metrics_stop_at_the_bound_and_the_table_carries_them(k):
    p, y = predictions(k, 20 * k, 0.5)
    conf = Confusion.of(p, y, k)
    m = split_metrics("val", conf, None, long_tail_counts(k))
    per_class = [key for key in m if key.startswith("val/class_acc/")]
    assert len(per_class) == (k if k <= CLASS_METRICS_MAX else 0)
    cols = class_columns({"val": conf, "test": conf})
    assert set(cols) == {f"{s}_{c}" for s in ("val", "test") for c in ("support", "correct", "predicted", "acc")}
    assert all(len(v) == k for v in cols.values())
    acc = per_class_accuracy(conf).numpy()
    np.testing.assert_array_equal(cols["val_acc"], acc)
    if k <= CLASS_METRICS_MAX:
        assert [m[f"val/class_acc/{c}"] for c in range(k)] == pytest.approx(acc.tolist(), abs=0)


def test_shot_group_confusion_and_the_most_confused_classes_by_hand():
    # classes 0 (many: 500), 1 (medium: 50), 2 and 3 (few: 5, 2); rows true, columns predicted
    dense = torch.tensor([[8, 2, 0, 0],
                          [1, 5, 0, 4],
                          [0, 0, 3, 0],
                          [3, 0, 0, 1]])
    conf = Confusion.from_dense(dense)
    groups, g = group_confusion(conf, [500, 50, 5, 2])
    assert groups == ["many", "medium", "few"]
    assert g.tolist() == [[8, 2, 0], [1, 5, 4], [3, 0, 4]]
    # errors per class: out (support - correct) + in (predicted - correct): 0: 2+4, 1: 5+2, 2: 0+0, 3: 3+4
    assert most_confused_classes(conf, 3) == [1, 3, 0]
    assert most_confused_classes(conf, 10) == [1, 3, 0]  # class 2 made no error and took none
    assert sub_confusion(conf, [3, 1]).tolist() == [[1, 0], [4, 5]]


def _pixels(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("k", [10, INAT_K])
def test_figures_stay_bounded_at_any_number_of_classes(tmp_path, k):
    counts = long_tail_counts(k)
    names = [f"class{c}" for c in range(k)]
    p, y = predictions(k, 6 * k, 0.5)
    conf = Confusion.of(p, y, k)
    acc = per_class_accuracy(conf).tolist()
    w, h = _pixels(plots.per_class_accuracy(acc, counts, names, "t", tmp_path / "acc.png"))
    assert w * h <= 1300 * 500
    groups, g = group_confusion(conf, counts)
    worst = most_confused_classes(conf, 30)
    w, h = _pixels(plots.confusion_overview(groups, g, [names[c] for c in worst], sub_confusion(conf, worst),
                                            conf.per_class()[1][worst].tolist(), "t", tmp_path / "cm.png"))
    assert w * h <= 2000 * 1200
    scores = np.random.default_rng(0).random(len(y))
    w, h = _pixels(plots.score_boxes_per_class(scores, y.numpy(), counts, "t", "score", tmp_path / "box.png"))
    assert w * h <= 5000 * 600


def test_binned_accuracy_plot_bins_head_to_tail():
    order = list(range(INAT_K))
    bins = plots.class_bins(order)
    assert len(bins) == plots.CLASSES_DRAWN and [c for b in bins for c in b] == order
    assert {len(b) for b in bins} == {81, 82}  # 8,142 = 42 x 82 + 58 x 81
    assert plots.class_bins([3, 1, 2]) == [[3], [1], [2]]


def test_the_terminal_lists_the_worst_classes_not_all_of_them():
    from rwray.inference import WORST_SHOWN, table_rows

    k = INAT_K
    p, y = predictions(k, 10 * k, 0.7)
    conf = Confusion.of(p, y, k)
    names = [f"species {c}" for c in range(k)]
    metrics = split_metrics("test", conf, None, long_tail_counts(k))
    rows = table_rows(metrics, "test", names, conf)
    listed = [r for r in rows if r[0].startswith("class ")]
    assert len(listed) == WORST_SHOWN and len(rows) <= 10 + WORST_SHOWN
    acc = per_class_accuracy(conf).numpy()
    worst = float(acc[~np.isnan(acc)].min())
    assert float(listed[0][1]) == pytest.approx(100 * worst, abs=0.005)
    assert float(listed[0][1]) == pytest.approx(100 * metrics["test/worst_class_acc"], abs=0.005)
    small = table_rows(split_metrics("test", Confusion.of(p % 10, y % 10, 10), None, [5] * 10), "test",
                       names[:10], Confusion.of(p % 10, y % 10, 10))
    assert len([r for r in small if r[0].startswith("class ")]) == 10  # small K: every class, as before
    assert not math.isnan(metrics["test/macro_f1"])
