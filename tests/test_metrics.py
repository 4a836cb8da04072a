import math

import pytest
import torch

from rwray.metrics import Confusion, per_class_accuracy, shot_groups, summarize


def confusion_matrix(p, y, k):
    """The sparse counts of predictions ``p`` against targets ``y``."""
    return Confusion.of(p, y, k)


def test_confusion_matrix_and_summary_by_hand():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    cm = confusion_matrix(p, y, 3)
    assert cm.dense().tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]
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
    merged = parts[0] + parts[1] + parts[2]
    whole = confusion_matrix(p, y, 4)
    assert torch.equal(merged.pairs, whole.pairs) and torch.equal(merged.counts, whole.counts)
    assert torch.equal(whole.dense(), torch.bincount(y * 4 + p, minlength=16).reshape(4, 4))


def test_the_worst_class_is_the_lowest_accuracy_of_a_present_class():
    from rwray.metrics import split_metrics

    # rows = true class, cols = predicted: class 0 3/4, class 1 1/2, class 2 absent from the split
    cm = Confusion.from_dense(torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]]))
    m = split_metrics("val", cm, None, [10, 5, 1])
    assert m["val/worst_class_acc"] == 0.5
    assert "val/worst_class_acc" not in split_metrics("val", Confusion.empty(3), None, [1, 1, 1])


def test_macro_f1_matches_sklearn_over_the_true_classes_present():
    """WILDS' iWildCam metric: sklearn f1_score(average="macro", labels=the true labels present)."""
    from sklearn.metrics import f1_score

    from rwray.metrics import macro_f1

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (300,), generator=g)
    y[y == 4] = 0  # class 4 absent from the truth: left out, though predicted
    p = torch.where(torch.rand(300, generator=g) < 0.6, y, torch.randint(0, 7, (300,), generator=g))
    cm = confusion_matrix(p, y, 7)
    want = f1_score(y.numpy(), p.numpy(), average="macro", labels=sorted(set(y.tolist())))
    assert macro_f1(cm) == pytest.approx(want, abs=1e-12)
    assert math.isnan(macro_f1(Confusion.empty(3)))


def test_cluster_unbiased_acc_is_the_mean_over_cells_with_ten_samples_then_over_clusterings():
    """ReBias's 9-class ImageNet unbiased accuracy (clovaai/rebias evaluator), by hand on [R=2, 2, K=2, C=2]."""
    from rwray.metrics import cluster_unbiased_acc

    correct = torch.tensor([[[9, 1], [5, 0]], [[10, 0], [0, 4]]])
    total = torch.tensor([[[10, 9], [20, 0]], [[10, 0], [0, 40]]])  # cells under 10 samples do not count
    counts = torch.stack([correct, total], dim=1)  # [R, 2, K, C]
    want = ((9 / 10 + 5 / 20) / 2 + (10 / 10 + 4 / 40) / 2) / 2
    assert cluster_unbiased_acc(counts) == pytest.approx(want, abs=1e-12)
    assert math.isnan(cluster_unbiased_acc(torch.zeros(1, 2, 2, 2, dtype=torch.int64)))


def test_evaluate_counts_cluster_cells_leaving_unknown_clusters_out():
    from rwray.metrics import split_metrics
    from rwray.train.batches import Batch
    from rwray.train.epoch import evaluate

    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.eye(3)[[0, 1, 2, 0, 1]]  # predictions 0, 1, 2, 0, 1
    y = torch.tensor([0, 1, 1, 0, 2])  # right, right, wrong, right, wrong
    c1 = torch.tensor([0, 1, 1, -1, 0])  # the 4th sample has no cluster: left out
    b = Batch(x, y, torch.arange(5), {"cluster1": c1, "cluster2": torch.zeros(5, dtype=torch.long)})
    counts = evaluate(model, [b], 3, cluster_columns=("cluster1", "cluster2"), num_clusters=2)
    assert counts.clusters.shape == (2, 2, 3, 2)
    assert counts.clusters[0, 1].tolist() == [[1, 0], [0, 2], [1, 0]]  # totals per (class, cluster)
    assert counts.clusters[0, 0].tolist() == [[1, 0], [0, 1], [0, 0]]
    assert counts.clusters[1, 1].sum() == 5
    m = split_metrics("test", counts.confusion, None, [1, 1, 1], counts.clusters)
    assert "test/cluster_unbiased_acc" not in m  # no cell reaches 10 samples here
