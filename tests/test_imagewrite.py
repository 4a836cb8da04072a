"""The image-shard writer: real JPEG folders in -> JPEG-bytes Parquet shards out (row groups, seeded placement,
checksums, channel statistics), every unreadable image reported at once with nothing written, optional resize."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from image_fixtures import corrupt_image, write_image_folder, write_imagenet_lt
from rwray.data import SOURCES, BuilderParams, prepare, verify
from rwray.errors import DataError


def _source(params: dict):
    return SOURCES[params["name"]].params.model_validate(params)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    fx = write_image_folder(root, num_classes=3, per_class=(20, 4, 4))
    out = root / "shards"
    m = prepare(_source(fx["params"]), out, BuilderParams(rows_per_shard=32, rows_per_group=8, workers=2, seed=3))
    return fx, m


def test_layout_row_groups_and_manifest(folder):
    fx, m = folder
    assert m.encoded and sorted(m.eval_splits) == ["test", "val"]
    assert [m.num_samples(s) for s in ("train", "val", "test")] == [60, 12, 12]
    assert m.class_counts("train") == [20, 20, 20]
    shards = m.split("train")["shards"]
    assert [s["rows"] for s in shards] == [32, 28] and [s["row_groups"] for s in shards] == [[8] * 4, [8, 8, 8, 4]]
    for s in shards:  # the manifest's row groups are the file's
        md = pq.ParquetFile(m.dir / s["file"]).metadata
        assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == s["row_groups"]
    assert m.row_groups("train")[:2] == [(str(m.dir / "train-00000.parquet"), 0, 8),
                                         (str(m.dir / "train-00000.parquet"), 1, 8)]
    assert verify(m.dir) == m


def test_train_rows_placed_by_a_seeded_permutation_eval_in_listing_order(folder):
    _, m = folder
    train = pq.read_table(m.shard_paths("train"), columns=["index", "label"])
    ids = train["index"].to_numpy()
    assert (ids == np.random.default_rng(3).permutation(60)).all()  # BuilderParams.seed places the samples
    val = pq.read_table(m.shard_paths("val"), columns=["index"])["index"].to_numpy()
    assert (val == np.arange(12)).all()


def test_bytes_are_the_files_and_stats_are_exact(folder):
    fx, m = folder
    from rwray.data.imagesources.folder import ImageFolderParams, build_image_folder

    listing = build_image_folder(ImageFolderParams.model_validate(fx["params"]))
    t = pq.read_table(m.shard_paths("train"), columns=["image", "index"])
    by_id = dict(zip(t["index"].to_pylist(), t["image"].to_pylist()))
    files = listing.splits["train"].files
    assert all(by_id[i] == open(files[i], "rb").read() for i in range(len(files)))
    pixels = np.concatenate([np.asarray(Image.open(f).convert("RGB")).reshape(-1, 3) for f in files]) / 255.0
    assert m.mean == pytest.approx(pixels.mean(0).tolist(), abs=1e-9)
    assert m.std == pytest.approx(pixels.std(0).tolist(), abs=1e-9)


def test_unreadable_images_all_reported_and_nothing_written(tmp_path):
    fx = write_imagenet_lt(tmp_path / "src")
    lines = (fx["root"] / "ImageNet_LT_train.txt").read_text().split()
    bad = [fx["params"]["image_root"] + "/" + rel for rel in lines[0:6:2][:2]]
    for f in bad:
        corrupt_image(Path(f))
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(_source(fx["params"]), out, BuilderParams(rows_per_group=4, workers=1))
    msg = str(e.value)
    assert "2 problems" in msg and all(f in msg for f in bad) and "unreadable image" in msg
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_resize_shrinks_the_shorter_side_and_is_off_by_default(tmp_path):
    fx = write_image_folder(tmp_path / "src", num_classes=2, per_class=(3, 1, 1))
    m = prepare(_source(fx["params"]), tmp_path / "small", BuilderParams(resize=12, workers=1))
    for data in pq.read_table(m.shard_paths("train"), columns=["image"])["image"].to_pylist():
        img = Image.open(io.BytesIO(data))
        assert min(img.size) == 12 and img.format == "JPEG"
    meta = json.loads((m.dir / "manifest.json").read_text())
    assert meta["builder"]["resize"] == 12 and BuilderParams().resize is None


def test_imbalance_is_refused_for_image_files(tmp_path):
    fx = write_image_folder(tmp_path / "src", num_classes=2, per_class=(3, 1, 1))
    with pytest.raises(DataError, match="come with their own splits"):
        prepare(_source(fx["params"]), tmp_path / "x", BuilderParams(imbalance="exp", factor=2))
    assert not (tmp_path / "x").exists()


def test_clothing1m_unknown_clean_labels_are_minus_one_and_verify(tmp_path):
    from image_fixtures import write_clothing1m

    fx = write_clothing1m(tmp_path / "src")
    m = verify(prepare(_source(fx["params"]), tmp_path / "c1m", BuilderParams(workers=1)).dir)
    t = pq.read_table(m.shard_paths("train"), columns=["label", "clean_label"])
    clean = t["clean_label"].to_numpy()
    assert (clean == -1).any() and (clean >= 0).any()  # known for some noisy-train images only
    assert m.extra_columns == ["clean_label"]
