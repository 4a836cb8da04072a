"""CIFAR reader on tiny directories written in torchvision's real on-disk format (pickled dicts, bytes keys)."""

import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rwray.data import SOURCES, BuilderParams, prepare, verify
from rwray.data import cifar
from rwray.data.sources import Cifar10Params, Cifar100Params
from rwray.errors import DataError

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj: dict, protocol: int) -> None:
    blob = pickle.dumps(obj, protocol=protocol)
    if protocol <= 2:
        # The original archive was pickled by Python 2 / numpy 1, naming numpy.core.multiarray; numpy 2 writes
        # numpy._core. Rewrite the (newline-terminated, unframed) GLOBAL opcode so the legacy name is exercised.
        blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy._core" not in blob
    path.write_bytes(blob)


def _batch(rng: np.random.Generator, n: int, num_classes: int, label_key: bytes) -> dict:
    labels = rng.permutation(np.arange(n) % num_classes)  # balanced, shuffled
    return {
        b"batch_label": b"training batch",
        label_key: [int(v) for v in labels],  # a plain list of ints, as in the archive
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),  # (N, 3072): R plane, G plane, B plane
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar10(root: Path, protocol: int = 4, per_batch: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    batches = [_batch(rng, per_batch, 10, b"labels") for _ in range(5)]
    for i, b in enumerate(batches, 1):
        _dump(base / f"data_batch_{i}", b, protocol)
    test = _batch(rng, per_batch, 10, b"labels")
    _dump(base / "test_batch", test, protocol)
    _dump(base / "batches.meta", {b"label_names": [n.encode() for n in C10_NAMES], b"num_vis": 3072}, protocol)
    return {
        "train_data": np.concatenate([b[b"data"] for b in batches]),
        "train_labels": np.concatenate([b[b"labels"] for b in batches]),
        "test_data": test[b"data"],
        "test_labels": np.array(test[b"labels"]),
    }


def write_cifar100(root: Path, protocol: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    train, test = _batch(rng, 500, 100, b"fine_labels"), _batch(rng, 100, 100, b"fine_labels")
    for d in (train, test):
        d[b"coarse_labels"] = [v // 5 for v in d[b"fine_labels"]]  # present in the archive, ignored by the reader
    _dump(base / "train", train, protocol)
    _dump(base / "test", test, protocol)
    names = [f"fine_{i}" for i in range(100)]
    meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"] * 20}
    _dump(base / "meta", meta, protocol)
    return {
        "train_data": train[b"data"],
        "train_labels": np.array(train[b"fine_labels"]),
        "test_data": test[b"data"],
        "test_labels": np.array(test[b"fine_labels"]),
        "names": names,
    }


def _split(m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in m.shard_paths(split)])


def _check_roundtrip(m, written: dict) -> None:
    for split, data, labels in (
        ("train", written["train_data"], written["train_labels"]),
        ("val", written["train_data"], written["train_labels"]),
        ("test", written["test_data"], written["test_labels"]),
    ):
        t = _split(m, split)
        idx = t["index"].to_numpy()
        flat = t["image"].combine_chunks().flatten().to_numpy().reshape(-1, 3072)  # [n, 3072] CHW flattened
        np.testing.assert_array_equal(flat, data[idx])  # the shard row is exactly the archive row
        np.testing.assert_array_equal(t["label"].to_numpy(), labels[idx])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reader_is_bit_exact_for_every_pickle_protocol(tmp_path, protocol):
    written = write_cifar10(tmp_path, protocol=protocol)
    raw = SOURCES.build(Cifar10Params(root=tmp_path))
    assert raw.classes == C10_NAMES
    assert raw.train_images.shape == (100, 3, 32, 32) and raw.train_images.dtype == np.uint8
    assert raw.train_labels.dtype == np.int64 and raw.test_images.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(raw.train_images.reshape(100, 3072), written["train_data"])
    np.testing.assert_array_equal(raw.train_labels, written["train_labels"])
    np.testing.assert_array_equal(raw.test_images.reshape(20, 3072), written["test_data"])
    # CHW plane order: the first 1024 bytes of a row are the red channel, row-major 32x32
    np.testing.assert_array_equal(raw.train_images[7, 0], written["train_data"][7, :1024].reshape(32, 32))
    np.testing.assert_array_equal(raw.train_images[7, 2, 31], written["train_data"][7, -32:])


def test_cifar10_prepare_roundtrip(tmp_path):
    written = write_cifar10(tmp_path / "root")
    m = verify(prepare(Cifar10Params(root=tmp_path / "root"), tmp_path / "shards", BuilderParams(val_per_class=2)).dir)
    assert m.image_shape == (3, 32, 32) and m.classes == C10_NAMES
    assert m.class_counts("val") == [2] * 10 and m.class_counts("train") == [8] * 10 and m.num_samples("test") == 20
    _check_roundtrip(m, written)
    x = written["train_data"][_split(m, "train")["index"].to_numpy()].reshape(-1, 3, 1024) / 255.0
    assert m.mean == pytest.approx(x.mean(axis=(0, 2)).tolist(), abs=1e-12)


def test_cifar100_prepare_roundtrip_uses_fine_labels(tmp_path):
    written = write_cifar100(tmp_path / "root")
    b = BuilderParams(val_per_class=1, label_noise="asymmetric", noise_rate=0.2)
    m = verify(prepare(Cifar100Params(root=tmp_path / "root"), tmp_path / "shards", b).dir)
    assert m.num_classes == 100 and m.classes == written["names"] and m.class_counts("val") == [1] * 100
    assert m.num_samples("train") == 400 and m.data_info().extra_columns == ("clean_label",)
    t = _split(m, "train")
    idx = t["index"].to_numpy()
    np.testing.assert_array_equal(t["clean_label"].to_numpy(), written["train_labels"][idx])
    changed = t["label"].to_numpy() != t["clean_label"].to_numpy()
    assert 0.1 < changed.mean() < 0.3  # 400 samples: std 0.02 around 0.2
    np.testing.assert_array_equal(t["label"].to_numpy()[changed], (t["clean_label"].to_numpy()[changed] + 1) % 100)
    written = dict(written, train_labels=written["train_labels"].copy())
    written["train_labels"][idx] = t["label"].to_numpy()  # compare train against the noisy labels actually written
    _check_roundtrip(m, written)


def test_missing_file_names_the_file_root_and_fix(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        SOURCES.build(Cifar10Params(root=tmp_path))
    msg = str(e.value)
    assert "data_batch_3" in msg and str(tmp_path) in msg and "data_batch_1" not in msg.split("Fix")[0]
    assert "cifar-10-python.tar.gz" in msg and "download=True" in msg and "--download" in msg


def test_missing_directory_and_prepare_writes_nothing(tmp_path):
    with pytest.raises(DataError, match=r"cifar-100-python/ is missing under root") as e:
        prepare(Cifar100Params(root=tmp_path / "empty"), tmp_path / "out")
    assert "--download" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_download_is_only_called_when_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(root: Path, variant: str) -> None:  # stands in for the network fetch
        calls.append((root, variant))
        write_cifar10(root)

    monkeypatch.setattr(cifar, "download", fake_download)
    raw = SOURCES.build(Cifar10Params(root=tmp_path / "dl", download=True))
    assert calls == [(tmp_path / "dl", "cifar10")] and raw.train_images.shape[0] == 100
    SOURCES.build(Cifar10Params(root=tmp_path / "dl", download=True))
    assert len(calls) == 1  # files present: no second download


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20, b"payload": _Evil(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(evil))
    with pytest.raises(DataError, match=r"data_batch_2: refusing to unpickle global (posix|os|nt)\.system"):
        SOURCES.build(Cifar10Params(root=tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # builtins.eval('1+1')
        b"c_codecs\nencode\n(X\x03\x00\x00\x00abcX\x04\x00\x00\x00zlibtR.",  # _codecs.encode with a non-latin1 codec
        b"cnumpy\nload\n(S'x'\ntR.",  # numpy globals beyond the three array ones
    ],
)
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(cifar.ForbiddenGlobal, match="refusing"):
        cifar.restricted_loads(payload)


def test_restricted_unpickler_still_reads_sets_and_bytes():
    obj = {b"k": {1, 2}, "f": frozenset([3]), "b": bytearray(b"xy"), "a": np.arange(3, dtype=np.int16)}
    for protocol in (2, 4, 5):
        back = cifar.restricted_loads(pickle.dumps(obj, protocol=protocol))
        assert back[b"k"] == {1, 2} and back["f"] == frozenset([3]) and back["b"] == bytearray(b"xy")
        np.testing.assert_array_equal(back["a"], obj["a"])


def test_truncated_pickle_is_a_data_error(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR pickle"):
        SOURCES.build(Cifar10Params(root=tmp_path))
