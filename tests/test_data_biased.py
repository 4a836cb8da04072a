"""Colour-biased digits: exact colour proportions, pixels, seeding, real IDX files, and the shards' extra split."""

from __future__ import annotations

import gzip
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rwray.data import SOURCES, BuilderParams, RawData, prepare, verify
from rwray.data import mnist
from rwray.data.biased import COLOURS, assign_colours, biased_sets, colourise
from rwray.data.sources import BiasedDigitsParams, BiasedMnistParams, ExtraSplit
from rwray.data.splits import build_splits
from rwray.errors import DataError

PAPER_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (225, 225, 0), (225, 0, 225), (0, 255, 255), (255, 128, 0),
                 (255, 0, 128), (128, 0, 255), (128, 128, 128)]


def round_half_up(rho: float, n: int) -> int:
    """ρ·n rounded half up, in exact decimal arithmetic (ρ as written, not its binary approximation)."""
    return int(Fraction(str(rho)) * n + Fraction(1, 2))


# ------------------------------------------------------------------------------------------------- construction


# Class sizes chosen so that several ρ·n land exactly on .5 (0.995·100, 0.997·500, 0.1·15, 0.1·25).
SIZES = [100, 500, 15, 25, 1000, 7, 1, 0, 333, 260]


@pytest.mark.parametrize("rho", [0.99, 0.995, 0.997, 0.999, 0.1, 1.0, 0.0])
def test_each_class_gets_its_colour_on_exactly_rho_of_its_samples(rho):
    assert COLOURS.tolist() == [list(c) for c in PAPER_COLOURS]
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(10), SIZES))
    colours = assign_colours(labels, rho, np.random.default_rng(0))
    assert colours.shape == labels.shape and colours.dtype == np.int64
    for c, n in enumerate(SIZES):
        got = colours[labels == c]
        n_own = round_half_up(rho, n)
        assert (got == c).sum() == n_own, (c, n)
        # the rest is dealt over the nine other colours as evenly as possible
        others = np.bincount(got[got != c], minlength=10)[[k for k in range(10) if k != c]]  # [9]
        assert others.sum() == n - n_own
        assert others.max() - others.min() <= 1
        assert sorted(others.tolist()) == sorted([(n - n_own) // 9 + (i < (n - n_own) % 9) for i in range(9)])


def test_exact_half_cases_round_up():
    # the cases a naive float floor(ρ·n + 0.5) could get wrong: 0.995·100 = 99.4999999... in binary
    for rho, n, want in [(0.995, 100, 100), (0.997, 500, 499), (0.1, 15, 2), (0.1, 25, 3), (0.99, 50, 50)]:
        colours = assign_colours(np.zeros(n, dtype=np.int64), rho, np.random.default_rng(0))
        assert (colours == 0).sum() == want


def test_colourise_draws_a_white_digit_on_the_colour():
    gray = np.array([[[0, 7], [255, 0]], [[1, 0], [0, 0]]], dtype=np.uint8)  # [2, 2, 2]
    out = colourise(gray, np.array([3, 9]))
    assert out.shape == (2, 3, 2, 2) and out.dtype == np.uint8
    # image 0: colour 3 = (225, 225, 0) where gray == 0, white elsewhere
    np.testing.assert_array_equal(out[0, :, 0, 0], [225, 225, 0])
    np.testing.assert_array_equal(out[0, :, 0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, :, 1, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, :, 1, 1], [225, 225, 0])
    # image 1: the faintest non-zero pixel is digit (binarised at > 0), background grey (128, 128, 128)
    np.testing.assert_array_equal(out[1, :, 0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[1, :, 1, 1], [128, 128, 128])


def test_sets_are_seeded_and_independent_streams():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 3, size=(400, 4, 4)).astype(np.uint8)
    labels = np.repeat(np.arange(10), 40)
    a = biased_sets(gray, labels, gray[:100], labels[::4], 0.9, 0.1, seed=3)
    b = biased_sets(gray, labels, gray[:100], labels[::4], 0.9, 0.1, seed=3)
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_array_equal(x, y)
    c = biased_sets(gray, labels, gray[:100], labels[::4], 0.9, 0.1, seed=4)
    assert not np.array_equal(a["train"][2], c["train"][2])
    assert not np.array_equal(a["test_unbiased"][2], c["test_unbiased"][2])
    # another training rho leaves both test sets untouched
    d = biased_sets(gray, labels, gray[:100], labels[::4], 0.5, 0.1, seed=3)
    assert not np.array_equal(a["train"][2], d["train"][2])
    for k in ("test", "test_unbiased"):
        np.testing.assert_array_equal(a[k][0], d[k][0])
        np.testing.assert_array_equal(a[k][2], d[k][2])
    np.testing.assert_array_equal(a["test"][2], labels[::4])  # biased test: rho = 1


# ---------------------------------------------------------------------------------------------------- IDX files


def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding written out by hand: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 sizes, raw values."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(root: Path, n_train: int = 120, n_test: int = 40, gz: bool = True, seed: int = 0) -> dict:
    """Small MNIST-format files (28x28, the real layout) with balanced labels: train and t10k, images and labels."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": (rng.random((n_train, 28, 28)) < 0.2).astype(np.uint8) * rng.integers(1, 256, (n_train, 28, 28)).astype(np.uint8),
        "train_labels": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
        "test_images": (rng.random((n_test, 28, 28)) < 0.2).astype(np.uint8) * 200,
        "test_labels": rng.permutation(np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, name in mnist.FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz,layout", [(True, "flat"), (False, "torchvision")])
def test_reads_real_idx_files(tmp_path, gz, layout):
    root = tmp_path / "m"
    arrays = write_mnist(root if layout == "flat" else root / "MNIST" / "raw", gz=gz)
    got = mnist.read_mnist(root)
    for key in mnist.FILES:
        np.testing.assert_array_equal(getattr(got, key), arrays[key])
    assert got.train_images.dtype == np.uint8 and got.train_labels.dtype == np.int64
    assert got.train_images.shape == (120, 28, 28) and got.test_labels.shape == (40,)
    # the first bytes are the documented magic numbers 0x00000803 / 0x00000801
    name = mnist.FILES["train_images"]
    raw = gzip.decompress((root / f"{name}.gz").read_bytes()) if gz else (root / "MNIST" / "raw" / name).read_bytes()
    assert struct.unpack(">I", raw[:4])[0] == 0x803


def test_idx_errors_name_the_problem(tmp_path):
    write_mnist(tmp_path, gz=False)
    name = mnist.FILES["test_labels"]
    (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:-3])  # truncated
    with pytest.raises(DataError, match="truncated or corrupt"):
        mnist.read_mnist(tmp_path)
    (tmp_path / name).write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        mnist.read_mnist(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*download=True"):
        mnist.read_mnist(tmp_path)
    # other IDX element types: int32, big-endian on disk
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    parsed = mnist.parse_idx(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + arr.tobytes())
    np.testing.assert_array_equal(parsed, [[0, 1, 2], [3, 4, 5]])


# --------------------------------------------------------------------------------------------- sources + shards


def _read(m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in m.shard_paths(split)])


def test_biased_mnist_shards_have_the_extra_split_and_bias_column(tmp_path):
    arrays = write_mnist(tmp_path / "mnist", n_train=200, n_test=50)
    src = BiasedMnistParams(root=tmp_path / "mnist", rho=0.9, seed=2)
    m = prepare(src, tmp_path / "shards", BuilderParams(val_per_class=3, rows_per_shard=64))
    m = verify(m.dir)  # the extra split's shards are checked too
    assert m.columns == ["image", "label", "index", "bias"] and m.extra_columns == ["bias"]
    assert set(m.data["splits"]) == {"train", "val", "test", "test_unbiased"}
    assert sorted(m.eval_splits) == ["test", "test_unbiased", "val"]
    assert m.image_shape == (3, 28, 28) and m.data_info().extra_columns == ("bias",)
    assert m.num_samples("test") == m.num_samples("test_unbiased") == 50
    assert m.num_samples("train") + m.num_samples("val") == 200 and m.class_counts("val") == [3] * 10

    raw = SOURCES.build(src)
    test, unb = _read(m, "test"), _read(m, "test_unbiased")
    # biased test: every image on its class colour; unbiased: the same images and labels, colours from rho = 0.1
    np.testing.assert_array_equal(test["bias"].to_numpy(), test["label"].to_numpy())
    np.testing.assert_array_equal(unb["label"].to_numpy(), arrays["test_labels"])
    np.testing.assert_array_equal(unb["bias"].to_numpy(), raw.extra_test_splits["test_unbiased"].columns["bias"])
    own = (unb["bias"].to_numpy() == unb["label"].to_numpy()).sum()
    assert own == 10 * round_half_up(0.1, 5)  # 5 test images per class
    # pixels: stored image = colourise(grey test image, stored colour)
    imgs = unb["image"].combine_chunks().flatten().to_numpy().reshape(50, 3, 28, 28)
    np.testing.assert_array_equal(imgs, colourise(arrays["test_images"], unb["bias"].to_numpy()))
    # train and val come from the same rho = 0.9 pool: the bias column is the pool's colour of each index
    pool_colour = raw.extra_train_columns["bias"]
    for split in ("train", "val"):
        t = _read(m, split)
        np.testing.assert_array_equal(t["bias"].to_numpy(), pool_colour[t["index"].to_numpy()])
    labels = arrays["train_labels"].astype(np.int64)
    for c in range(10):
        assert (pool_colour[labels == c] == c).sum() == round_half_up(0.9, 20)  # 20 per class in the pool


def test_biased_mnist_missing_files_say_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*download=True"):
        SOURCES.build(BiasedMnistParams(root=tmp_path))
    with pytest.raises(ValueError):
        BiasedMnistParams(root=tmp_path, rho=1.5)


def test_biased_digits_train_pool_proportions_and_determinism():
    p = BiasedDigitsParams(rho=0.99)
    raw = SOURCES.build(p)
    assert raw.train_images.shape[1:] == (3, 8, 8) and raw.test_images.shape == (500, 3, 8, 8)
    colours = raw.extra_train_columns["bias"]
    for c in range(10):
        n = int((raw.train_labels == c).sum())
        assert (colours[raw.train_labels == c] == c).sum() == round_half_up(0.99, n)
    np.testing.assert_array_equal(raw.extra_test_columns["bias"], raw.test_labels)
    again = SOURCES.build(p)
    np.testing.assert_array_equal(again.train_images, raw.train_images)
    np.testing.assert_array_equal(again.extra_test_splits["test_unbiased"].images, raw.extra_test_splits["test_unbiased"].images)
    other = SOURCES.build(BiasedDigitsParams(rho=0.99, seed=1))
    assert not np.array_equal(other.extra_train_columns["bias"], colours)


def test_val_rho_colours_the_val_split_carved_from_train_with_the_unbiased_test_construction():
    """val_rho 0.1: the val images are the same train-pool digits, each class on its own colour for exactly
    round(0.1 · n) of them and the rest spread over the nine others; train and both test sets are unchanged."""
    b = BuilderParams(val_per_class=20)
    plain = build_splits(SOURCES.build(BiasedDigitsParams(rho=0.99)), b)
    fair = build_splits(SOURCES.build(BiasedDigitsParams(rho=0.99, val_rho=0.1)), b)
    for name in ("train", "test", "test_unbiased"):
        np.testing.assert_array_equal(fair[name].images, plain[name].images)
    v, pv = fair["val"], plain["val"]
    np.testing.assert_array_equal(v.index, pv.index)  # the same digits were carved out
    np.testing.assert_array_equal(v.images.min(axis=1) == 255, pv.images.min(axis=1) == 255)  # same white digits
    for c in range(10):
        colours = v.extras["bias"][v.labels == c]  # [20]
        assert (colours == c).sum() == 2  # round(0.1 * 20)
        assert np.bincount(colours[colours != c], minlength=10).max() <= 3  # 18 over nine colours: 2 each
        assert (pv.extras["bias"][pv.labels == c] == c).sum() >= 19  # the default: biased like train (rho .99)
    np.testing.assert_array_equal(v.images[:, :, 0, 0], COLOURS[v.extras["bias"]])  # corner pixel: background


def test_label_noise_reaches_extra_splits_and_raw_data_is_validated():
    x = np.zeros((20, 1, 2, 2), dtype=np.uint8)
    y = np.arange(20) % 2
    bias = np.arange(20) % 3
    raw = RawData(x, y, x[:6], y[:6], ["a", "b"], {"bias": bias}, {"bias": bias[:6]},
                  {"shifted": (x[:4], y[:4], {"bias": bias[:4]})})
    assert isinstance(raw.extra_test_splits["shifted"], ExtraSplit)
    splits = build_splits(raw, BuilderParams(val_per_class=2, label_noise="symmetric", noise_rate=0.4))
    assert list(splits) == ["train", "val", "test", "shifted"]
    for s in splits.values():  # one schema: every split has bias and clean_label
        assert sorted(s.extras) == ["bias", "clean_label"]
    np.testing.assert_array_equal(splits["shifted"].extras["bias"], bias[:4])
    np.testing.assert_array_equal(splits["shifted"].index, np.arange(4))
    np.testing.assert_array_equal(splits["val"].extras["bias"], bias[splits["val"].index])
    with pytest.raises(DataError, match="same"):
        RawData(x, y, x[:6], y[:6], ["a", "b"], {"bias": bias}, {})
    with pytest.raises(DataError, match="reserved"):
        RawData(x, y, x[:6], y[:6], ["a", "b"], {"label": y}, {"label": y[:6]})
    with pytest.raises(DataError, match="extra split name"):
        RawData(x, y, x[:6], y[:6], ["a", "b"], extra_test_splits={"val": (x[:4], y[:4], {})})
    with pytest.raises(DataError, match=r"column 'bias' must be \[4\]"):
        RawData(x, y, x[:6], y[:6], ["a", "b"], {"bias": bias}, {"bias": bias[:6]},
                {"shifted": (x[:4], y[:4], {"bias": bias[:3]})})
