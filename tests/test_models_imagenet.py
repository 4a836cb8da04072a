"""ImageNet-scale models (resnet10/50/152, resnext50_32x4d, bagnet18) and ``model.weights`` loading. CPU, small
inputs (3x64x64, batches of 2): shapes, torchvision key compatibility, BagNet-18's receptive field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from pydantic import TypeAdapter
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from rwray.datainfo import DataInfo
from rwray.errors import CheckpointError
from rwray.models import MODELS, ModelConfig
from rwray.models.bagnet import BagNet, receptive_field
from rwray.models.layers import NormedLinear
from rwray.models.weights import load_weights

NEW = ["resnet10", "resnet50", "resnet152", "resnext50_32x4d", "bagnet18"]
DIM = {"resnet10": 512, "resnet50": 2048, "resnet152": 2048, "resnext50_32x4d": 2048, "bagnet18": 512}
BAGNET18_RF = 5  # documented in rwray/models/bagnet.py and docs/models.md


def info(k: int = 5, c: int = 3) -> DataInfo:
    return DataInfo(k, (1,) * k, (c, 64, 64), k)


def build(name: str, k: int = 5, c: int = 3, **params) -> nn.Module:
    return MODELS.build(MODELS[name].params(**params), info(k, c))


@pytest.mark.parametrize("name", NEW)
def test_forward_shapes(name):
    model = build(name).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 5)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 5) and feats.shape == (2, DIM[name]) == (2, model.feature_dim)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == DIM[name]


@pytest.mark.parametrize("name", ["resnet10", "bagnet18"])
def test_options_head_dropout_channels_norm(name):
    model = build(name, c=1, normed_head=True, dropout=0.5, norm="group")
    assert isinstance(model.fc, NormedLinear)
    logits, feats = model(torch.randn(2, 1, 64, 64), return_features=True)  # one input channel: conv1 replaced
    assert logits.shape == (2, 5) and feats.shape == (2, DIM[name])
    assert logits.abs().max() <= 1 + 1e-5  # cosine logits


def test_resnet10_is_torchvision_resnet_basicblock_1111():
    ours, theirs = build("resnet10", k=1000), ResNet(BasicBlock, [1, 1, 1, 1])
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 5_418_792
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet50", "resnet152", "resnext50_32x4d"])
def test_state_dicts_are_torchvisions(name):
    ours, theirs = build(name, k=1000), getattr(torchvision.models, name)(weights=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    if name == "resnet50":  # both directions, strict, and the same function afterwards
        theirs.load_state_dict(ours.state_dict())
        fresh = build(name, k=1000)
        fresh.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(fresh.eval()(x), theirs.eval()(x))


@pytest.mark.parametrize("name", ["resnet10", "bagnet18"])
def test_fast_gram_matches_the_reference(name):
    """No in-place op hides a norm layer's output from the per-sample-gradient hooks (torchvision's ReLUs are)."""
    from rwray.gram import gram

    torch.manual_seed(0)
    model = build(name, k=3, norm="group").double()  # GroupNorm: per-sample gradients without batch coupling
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.double), torch.tensor([0, 1, 2])

    def loss(logits, t):
        return nn.functional.cross_entropy(logits, t, reduction="none")

    torch.testing.assert_close(gram(model, x, y, loss, impl="fast"), gram(model, x, y, loss, impl="reference"))


def _file(tmp_path: Path, state: dict, name: str = "w.pt", prefix: str = "", wrap: str | None = None) -> Path:
    state = {prefix + k: v for k, v in state.items()}
    path = tmp_path / name
    torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    return path


@pytest.mark.parametrize("prefix,wrap", [("module.", "state_dict"), ("module._orig_mod.", None), ("", "model")])
def test_weights_with_wrapper_prefix_and_another_head(tmp_path, capsys, prefix, wrap):
    source = ResNet(BasicBlock, [1, 1, 1, 1])  # 1000-class head, like ImageNet weights
    path = _file(tmp_path, source.state_dict(), prefix=prefix, wrap=wrap)
    torch.manual_seed(0)
    fresh = build("resnet10", k=9)
    torch.manual_seed(0)
    model = build("resnet10", k=9, weights=path)
    note = capsys.readouterr().err
    assert "fc.weight [1000, 512]" in note and "fc.weight [9, 512]" in note and "fresh head" in note
    torch.testing.assert_close(model.fc.weight, fresh.fc.weight)  # the head stays the model's own
    got = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(got[key], value)


def test_weights_with_the_same_head_load_it(tmp_path, capsys):
    source = build("bagnet18", k=9)
    model = load_weights(build("bagnet18", k=9), _file(tmp_path, source.state_dict()))
    assert "head" not in capsys.readouterr().err
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = _file(tmp_path, build("bagnet18").state_dict())
    with pytest.raises(CheckpointError) as e:
        build("resnet10", weights=path)
    msg = str(e.value)
    assert str(path) in msg and "55 unknown to the model (conv2.weight, " in msg and "Fix:" in msg
    assert "of another shape (file vs model) (conv1.weight [64, 3, 1, 1] vs [64, 3, 7, 7]" in msg
    with pytest.raises(CheckpointError, match=r"46 missing from the file \(conv2.weight, layer1.0.downsample"):
        build("bagnet18", weights=_file(tmp_path, build("resnet10").state_dict(), "r.pt"))


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04truncated"])
def test_corrupt_and_missing_files_are_clear_errors(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    for path, words in ((bad, "not a readable torch file"), (tmp_path / "nope.pt", "no such file")):
        with pytest.raises(CheckpointError) as e:
            build("resnet10", weights=path)
        assert str(path) in str(e.value) and words in str(e.value) and "Fix:" in str(e.value)


def test_non_tensor_content_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3, "acc": 0.5}, path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_weights(build("resnet10"), path)


def test_weights_path_is_made_absolute_where_the_config_is_read():
    cfg = TypeAdapter(ModelConfig).validate_python({"name": "resnext50_32x4d", "weights": "w/x.pt"})
    assert cfg.weights == (Path.cwd() / "w/x.pt").resolve() and cfg.weights.is_absolute()
    assert TypeAdapter(ModelConfig).validate_python({"name": "bagnet18"}).weights is None


def test_bagnet18_receptive_field_measured_by_gradient():
    model = BagNet(3, 4).eval()  # eval: BatchNorm's batch statistics would couple every position
    assert receptive_field(model) == BAGNET18_RF
    i, j = 3, 4  # one unit of the [512, 6, 6] map of a 52x52 input
    seen = torch.zeros(52, 52, dtype=torch.bool)
    for _ in range(3):  # union over inputs: a ReLU could zero one path for one input
        x = torch.randn(1, 3, 52, 52, requires_grad=True)
        model.feature_map(x)[0, :, i, j].sum().backward()
        seen |= x.grad.abs().sum(dim=(0, 1)) > 0  # [52, 52] input pixels with an effect on the unit
    rows, cols = seen.any(dim=1).nonzero().flatten(), seen.any(dim=0).nonzero().flatten()
    assert len(rows) == len(cols) == BAGNET18_RF and seen.sum() == BAGNET18_RF**2
    assert (rows[0].item(), cols[0].item()) == (8 * i, 8 * j)  # window starts at 8x the unit's index
    docs = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    assert f"{BAGNET18_RF} x {BAGNET18_RF}" in docs.read_text()
