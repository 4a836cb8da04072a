"""Shard building on the real (shipped) digits data: contents, determinism, atomicity and every verify error."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rwray.data import SOURCES, BuilderParams, Manifest, RawData, prepare, verify
from rwray.data import write as write_mod
from rwray.data.longtail import longtail_counts
from rwray.data.sources import DigitsParams, SyntheticParams
from rwray.errors import DataError

LT = BuilderParams(imbalance="exp", factor=10, rows_per_shard=200)  # several shards per split


@pytest.fixture(scope="module")
def digits_raw() -> RawData:
    return SOURCES.build(DigitsParams())


@pytest.fixture(scope="module")
def lt_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lt") / "digits-lt"
    prepare(DigitsParams(), out, LT)
    return out


@pytest.fixture
def broken(lt_dir, tmp_path) -> Path:
    """A private copy of the prepared directory that a test may corrupt."""
    return Path(shutil.copytree(lt_dir, tmp_path / "copy"))


def _read_split(m: Manifest, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in m.shard_paths(split)])


# ---------------------------------------------------------------------------------------------------------- sources


def test_digits_source_shapes_scaling_and_stratified_test(digits_raw):
    from sklearn.datasets import load_digits

    r = digits_raw
    assert r.train_images.dtype == np.uint8 and r.train_images.shape == (1797 - 500, 1, 8, 8)
    assert r.test_images.shape == (500, 1, 8, 8)
    np.testing.assert_array_equal(np.bincount(r.test_labels), [50] * 10)
    assert r.classes == [str(c) for c in range(10)] and r.train_labels.dtype == np.int64
    # every source image is a scaled digits image: 16 -> 255, 8 -> 128 (round half to even of 127.5)
    d = load_digits()
    scaled = np.rint(d.images * 255 / 16).astype(np.uint8)
    assert scaled.max() == 255 and np.all(np.isin(scaled[d.images == 8], [128]))
    assert r.train_images.sum(dtype=np.int64) + r.test_images.sum(dtype=np.int64) == scaled.sum(dtype=np.int64)
    # seeded: same seed same split, another seed another split
    np.testing.assert_array_equal(SOURCES.build(DigitsParams()).test_images, r.test_images)
    assert not np.array_equal(SOURCES.build(DigitsParams(seed=1)).test_images, r.test_images)
    with pytest.raises(DataError, match="test_per_class"):
        SOURCES.build(DigitsParams(test_per_class=500))


def test_synthetic_source_is_seeded_and_learnable():
    p = SyntheticParams(num_classes=3, image_shape=(2, 6, 5), train_per_class=40, test_per_class=10, seed=3)
    a, b = SOURCES.build(p), SOURCES.build(p)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert a.train_images.shape == (120, 2, 6, 5) and a.test_images.shape == (30, 2, 6, 5)
    np.testing.assert_array_equal(np.bincount(a.train_labels), [40] * 3)
    # learnable: nearest class mean (from train) classifies the test set well above chance (1/3)
    x = a.train_images.reshape(120, -1).astype(float)
    means = np.stack([x[a.train_labels == c].mean(0) for c in range(3)])  # [3, D]
    xt = a.test_images.reshape(30, -1).astype(float)
    pred = ((xt[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == a.test_labels).mean() > 0.8
    with pytest.raises(ValueError):
        SyntheticParams(num_classes=1)


# -------------------------------------------------------------------------------------------------------- manifest


def test_manifest_contents_for_long_tailed_digits(lt_dir, digits_raw):
    m = verify(lt_dir)
    data = json.loads((lt_dir / "manifest.json").read_text())
    assert data["format"] == "rwray-shards/1" and data["num_classes"] == 10 and data["image_shape"] == [1, 8, 8]
    assert data["source"] == {"name": "digits", "test_per_class": 50, "seed": 0}
    assert data["builder"] == LT.model_dump(mode="json") and data["columns"] == ["image", "label", "index"]
    assert "time" not in (lt_dir / "manifest.json").read_text()

    # val: balanced 20 per class, taken first; train: long tail on the rest with n_max = pool // C
    assert m.class_counts("val") == [20] * 10
    pool = np.bincount(digits_raw.train_labels, minlength=10) - 20  # [10] available after val
    n_max = int(pool.sum()) // 10
    expected = np.minimum(longtail_counts(n_max, 10, "exp", 10), pool)  # capped at what a class has
    assert m.class_counts("train") == expected.tolist()
    assert m.class_counts("train")[0] > 5 * m.class_counts("train")[-1]
    assert m.class_counts("test") == [50] * 10
    for split in ("train", "val", "test"):
        t = _read_split(m, split)
        assert t.num_rows == m.num_samples(split) == sum(s["rows"] for s in data["splits"][split]["shards"])
        np.testing.assert_array_equal(np.bincount(t["label"].to_numpy(), minlength=10), m.class_counts(split))
        assert [Path(p).name for p in m.shard_paths(split)] == [
            f"{split}-{k:05d}.parquet" for k in range(-(-t.num_rows // 200))
        ]
        assert all(Path(p).is_absolute() for p in m.shard_paths(split))

    train_ids = _read_split(m, "train")["index"].to_numpy()
    val_ids = _read_split(m, "val")["index"].to_numpy()
    assert len(set(train_ids)) == train_ids.size and len(set(val_ids)) == val_ids.size
    assert not set(train_ids) & set(val_ids)
    np.testing.assert_array_equal(_read_split(m, "test")["index"].to_numpy(), np.arange(500))

    # mean / std per channel over the train split, [0, 1] units
    x = _read_split(m, "train")["image"].combine_chunks().flatten().to_numpy().astype(float) / 255
    assert data["mean"] == pytest.approx([x.mean()], abs=1e-12) and data["std"] == pytest.approx([x.std()], abs=1e-12)

    info = m.data_info()
    assert info.num_classes == 10 and info.class_counts == tuple(m.class_counts("train"))
    assert info.image_shape == (1, 8, 8) and info.num_train == m.num_samples("train") and info.extra_columns == ()
    assert m.sha256 == hashlib.sha256((lt_dir / "manifest.json").read_bytes()).hexdigest()


def test_images_and_labels_read_back_exactly(lt_dir, digits_raw):
    m = Manifest.load(lt_dir)
    for split, images, labels in (
        ("train", digits_raw.train_images, digits_raw.train_labels),
        ("val", digits_raw.train_images, digits_raw.train_labels),
        ("test", digits_raw.test_images, digits_raw.test_labels),
    ):
        t = _read_split(m, split)
        assert t.schema.field("image").type == pa.list_(pa.uint8(), 64)
        assert t.schema.metadata is None or b"pandas" not in t.schema.metadata
        idx = t["index"].to_numpy()
        got = t["image"].combine_chunks().flatten().to_numpy().reshape(-1, 1, 8, 8)  # [n, C, H, W]
        np.testing.assert_array_equal(got, images[idx])
        np.testing.assert_array_equal(t["label"].to_numpy(), labels[idx])


def test_a_split_read_as_one_table_gives_the_workers_tensors(lt_dir, digits_raw):
    """How a small split reaches a worker (rwray.train.batches.arrow_rows): every shard's rows, one tensor a column;
    a table of several chunks, one of them a slice, keeps each row's bytes."""
    import torch

    from rwray.train.batches import arrow_rows

    t = pq.read_table(Manifest.load(lt_dir).shard_paths("train"))
    assert t["image"].num_chunks > 1
    t = pa.concat_tables([t.slice(0, 5), t.slice(5)])  # a sliced chunk: its offset must be honoured
    rows = arrow_rows(t)
    n = t.num_rows
    assert set(rows) == {"image", "label", "index"}
    assert rows["image"].dtype == torch.uint8 and rows["image"].shape == (n, 64)  # [N, C*H*W] as stored
    idx = t["index"].to_numpy()
    np.testing.assert_array_equal(rows["image"].numpy().reshape(-1, 1, 8, 8), digits_raw.train_images[idx])
    assert rows["label"].dtype == torch.int64 and rows["label"].tolist() == digits_raw.train_labels[idx].tolist()
    assert rows["index"].tolist() == idx.tolist()
    rows["image"][0, 0] = 255  # writable: the worker's own copy, not the object store's read-only buffer
    empty = arrow_rows(t.slice(0, 0))
    assert empty["image"].shape == (0, 64) and empty["label"].shape == (0,)


def test_same_inputs_give_byte_identical_directories(tmp_path):
    a = prepare(DigitsParams(), tmp_path / "a", LT)
    b = prepare(DigitsParams(), tmp_path / "b", LT)
    names = sorted(p.name for p in a.dir.iterdir())
    assert names == sorted(p.name for p in b.dir.iterdir()) and "manifest.json" in names
    for n in names:
        assert (a.dir / n).read_bytes() == (b.dir / n).read_bytes(), n
    assert a.sha256 == b.sha256


def test_other_seed_selects_other_samples_with_same_counts(lt_dir, tmp_path):
    a = Manifest.load(lt_dir)
    b = prepare(DigitsParams(), tmp_path / "s1", LT.model_copy(update={"seed": 1}))
    assert a.class_counts("train") == b.class_counts("train")
    for split in ("train", "val"):
        assert not np.array_equal(_read_split(a, split)["index"].to_numpy(), _read_split(b, split)["index"].to_numpy())
    assert a.sha256 != b.sha256


def test_imbalance_none_keeps_the_whole_pool_and_ids_survive(tmp_path, digits_raw, lt_dir):
    m = prepare(DigitsParams(), tmp_path / "bal", BuilderParams(val_per_class=20))
    assert m.num_samples("train") == digits_raw.train_labels.size - 200
    # the val split only depends on the seed, not on the imbalance: same ids as the long-tailed directory
    lt = Manifest.load(lt_dir)
    np.testing.assert_array_equal(_read_split(m, "val")["index"].to_numpy(), _read_split(lt, "val")["index"].to_numpy())
    # long-tailed train ids are a subset of the balanced train ids (ids = positions in the source's train pool)
    assert set(_read_split(lt, "train")["index"].to_numpy()) <= set(_read_split(m, "train")["index"].to_numpy())


def test_label_noise_keeps_clean_labels_in_an_extra_column(tmp_path):
    b = BuilderParams(label_noise="symmetric", noise_rate=0.4, val_per_class=10)
    m = verify(prepare(DigitsParams(), tmp_path / "noisy", b).dir)
    assert m.columns == ["image", "label", "index", "clean_label"] and m.data_info().extra_columns == ("clean_label",)
    train = _read_split(m, "train")
    flipped = train["label"].to_numpy() != train["clean_label"].to_numpy()
    assert 0.3 < flipped.mean() < 0.5  # 1097 samples: std 0.015 around 0.4
    for split in ("val", "test"):  # clean outside train, same schema everywhere
        t = _read_split(m, split)
        np.testing.assert_array_equal(t["label"].to_numpy(), t["clean_label"].to_numpy())
    with pytest.raises(ValueError, match="label_noise"):
        BuilderParams(noise_rate=0.2)
    with pytest.raises(ValueError):
        BuilderParams(factor=0.5)


def test_empty_val_split_and_too_large_val_are_handled(tmp_path):
    m = prepare(DigitsParams(), tmp_path / "noval", BuilderParams(val_per_class=0))
    assert m.num_samples("val") == 0 and len(m.shard_paths("val")) == 1  # one empty shard keeps the schema
    assert pq.read_table(m.shard_paths("val")[0]).num_rows == 0
    verify(m.dir)
    with pytest.raises(DataError, match="val_per_class"):
        prepare(DigitsParams(), tmp_path / "big", BuilderParams(val_per_class=150))
    assert not (tmp_path / "big").exists()
    # int(109 * 200 ** (-8/9)) = int(109 / 200) = 0: the two tail classes would be empty, so prepare refuses up
    # front rather than writing a directory that verify rejects
    with pytest.raises(DataError, match=r"2 classes have zero training samples: 8, 9; "):
        prepare(DigitsParams(), tmp_path / "tail", BuilderParams(imbalance="exp", factor=200))
    assert not (tmp_path / "tail").exists()


# ---------------------------------------------------------------------------------------------- atomic / overwrite


def test_failing_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(write_mod, "_channel_stats", boom)  # fails after all shards were written
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(DigitsParams(), tmp_path / "out", LT)
    assert list(tmp_path.iterdir()) == []  # neither out nor a temporary sibling


def test_existing_output_needs_overwrite_and_failed_overwrite_keeps_old(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = prepare(DigitsParams(), out, LT)
    with pytest.raises(DataError, match="--overwrite") as e:
        prepare(DigitsParams(), out, LT)
    assert "another output directory" in str(e.value)

    monkeypatch.setattr(write_mod, "_channel_stats", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        prepare(DigitsParams(), out, LT.model_copy(update={"seed": 5}), overwrite=True)
    assert Manifest.load(out).sha256 == first.sha256 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()

    second = prepare(DigitsParams(), out, LT.model_copy(update={"seed": 5}), overwrite=True)
    assert second.sha256 != first.sha256 and verify(out).sha256 == second.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare(DigitsParams(), tmp_path / "other", LT)


# -------------------------------------------------------------------------------------------------------- verify


def _problems(dir: Path, checksums: bool = True) -> str:
    with pytest.raises(DataError) as e:
        verify(dir, checksums=checksums)
    return str(e.value)


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def test_verify_missing_directory_suggests_prepare(tmp_path):
    msg = _problems(tmp_path / "nope")
    assert "does not exist" in msg and "rwray data prepare digits --out" in msg


def test_verify_missing_or_unparsable_manifest(broken):
    (broken / "manifest.json").write_text("{not json")
    msg = _problems(broken)
    assert "not valid JSON" in msg and "--overwrite" in msg
    (broken / "manifest.json").unlink()
    msg = _problems(broken)
    assert "manifest.json is missing" in msg and "rwray data prepare" in msg


def test_verify_missing_shard(broken):
    (broken / "train-00001.parquet").unlink()
    msg = _problems(broken)
    assert "train-00001.parquet: listed in the manifest but missing" in msg and "--overwrite" in msg


def test_verify_flipped_bytes_is_a_checksum_mismatch(broken):
    m = Manifest.load(broken)
    path = broken / "val-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = m.split("val")["shards"][0]["sha256"]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    msg = _problems(broken)
    assert "val-00000.parquet: sha256 mismatch" in msg and expected[:12] in msg and actual[:12] in msg
    verify(broken, checksums=False)  # the fast mode trusts the bytes; footers and statistics are still fine


def test_verify_truncated_shard_is_unreadable(broken):
    path = broken / "test-00000.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    msg = _problems(broken, checksums=False)
    assert "test-00000.parquet: pyarrow cannot read it" in msg and "truncated or corrupt" in msg
    assert "sha256 mismatch" in _problems(broken)  # with checksums both problems are reported


def test_verify_label_out_of_range(broken):
    path = broken / "train-00000.parquet"
    t = pq.read_table(path)
    labels = t["label"].to_numpy().copy()
    labels[3] = 10
    _rewrite(path, t.set_column(1, t.schema.field("label"), pa.array(labels, pa.int64())))
    msg = _problems(broken, checksums=False)
    assert "train-00000.parquet: label values span [0, 10], outside [0, 10)" in msg
    msg = _problems(broken)
    assert "sha256 mismatch" in msg and "outside [0, 10)" in msg and "2 problem(s)" in msg


def test_verify_label_range_falls_back_to_reading_without_statistics(broken):
    path = broken / "train-00000.parquet"
    t = pq.read_table(path)
    labels = t["label"].to_numpy().copy()
    labels[0] = -1
    pq.write_table(t.set_column(1, t.schema.field("label"), pa.array(labels, pa.int64())), path, write_statistics=False)
    assert pq.ParquetFile(path).metadata.row_group(0).column(1).statistics is None
    assert "label values span [-1, " in _problems(broken, checksums=False)


def test_verify_wrong_image_width(broken):
    path = broken / "val-00000.parquet"
    t = pq.read_table(path)
    flat = t["image"].combine_chunks().flatten()  # [n * 64]
    narrow = pa.FixedSizeListArray.from_arrays(flat.slice(0, t.num_rows * 63), 63)  # [n] rows of 63 bytes
    _rewrite(path, t.set_column(0, pa.field("image", narrow.type, nullable=False), narrow))
    msg = _problems(broken, checksums=False)
    assert "val-00000.parquet: image column" in msg and "width 63" in msg and "64 = C*H*W" in msg


def test_verify_class_with_zero_training_samples(broken):
    data = json.loads((broken / "manifest.json").read_text())
    data["splits"]["train"]["class_counts"][9] = 0
    (broken / "manifest.json").write_text(json.dumps(data))
    msg = _problems(broken)
    assert "1 class has zero training samples: 9; " in msg and "smaller imbalance factor" in msg


def test_verify_reports_every_problem_at_once(broken):
    (broken / "train-00000.parquet").unlink()
    path = broken / "test-00001.parquet"
    path.write_bytes(path.read_bytes()[:50])
    msg = _problems(broken)
    lines = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert len(lines) == 3  # missing shard, checksum, unreadable
    assert "train-00000.parquet" in lines[0] and "test-00001.parquet" in msg and "3 problem(s)" in msg
