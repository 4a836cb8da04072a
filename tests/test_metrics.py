import math

import pytest
import torch

from rwray.metrics import confusion_matrix, per_class_accuracy, shot_groups, summarize


def test_confusion_matrix_and_summary_by_hand():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    cm = confusion_matrix(p, y, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]
    s = summarize(cm, train_counts=[500, 50, 5])
    assert math.isclose(s["top1"], 5 / 7)
    assert math.isclose(s["balanced_acc"], (3 / 4 + 1 / 2 + 1) / 3)
    assert math.isclose(s["many_acc"], 0.75) and math.isclose(s["medium_acc"], 0.5) and math.isclose(s["few_acc"], 1.0)


def test_shot_group_boundaries():
    # many: > 100, medium: 20..100 inclusive, few: < 20
    assert shot_groups([101, 100, 20, 19]) == {"many": [0], "medium": [1, 2], "few": [3]}


def test_absent_class_is_excluded_not_zero():
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)
    acc = per_class_accuracy(cm)
    assert torch.isnan(acc[2])
    s = summarize(cm, [5, 5, 5])
    assert s["balanced_acc"] == 1.0 and "many_acc" not in s


def test_summed_confusion_matrices_equal_global_one():
    # what the all-reduce does: per-worker matrices add up to the single-process matrix
    g = torch.Generator().manual_seed(0)
    y, p = torch.randint(0, 4, (100,), generator=g), torch.randint(0, 4, (100,), generator=g)
    parts = [confusion_matrix(p[i::3], y[i::3], 4) for i in range(3)]
    assert torch.equal(sum(parts), confusion_matrix(p, y, 4))


def test_the_worst_class_is_the_lowest_accuracy_of_a_present_class():
    from rwray.metrics import split_metrics

    # rows = true class, cols = predicted: class 0 3/4, class 1 1/2, class 2 absent from the split
    cm = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    m = split_metrics("val", cm, None, [10, 5, 1])
    assert m["val/worst_class_acc"] == 0.5
    assert "val/worst_class_acc" not in split_metrics("val", torch.zeros(3, 3, dtype=torch.long), None, [1, 1, 1])


def test_macro_f1_matches_sklearn_over_the_true_classes_present():
    """WILDS' iWildCam metric: sklearn f1_score(average="macro", labels=the true labels present)."""
    from sklearn.metrics import f1_score

    from rwray.metrics import confusion_matrix, macro_f1

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (300,), generator=g)
    y[y == 4] = 0  # class 4 absent from the truth: left out, though predicted
    p = torch.where(torch.rand(300, generator=g) < 0.6, y, torch.randint(0, 7, (300,), generator=g))
    cm = confusion_matrix(p, y, 7)
    want = f1_score(y.numpy(), p.numpy(), average="macro", labels=sorted(set(y.tolist())))
    assert macro_f1(cm) == pytest.approx(want, abs=1e-12)
    assert macro_f1(torch.zeros(3, 3, dtype=torch.int64)) != macro_f1(torch.zeros(3, 3, dtype=torch.int64))  # NaN
