"""The readers of the large datasets' real formats (`rwray.data.imagesources`) on tiny fixtures written in those
formats (`image_fixtures`): splits, counts, labels, columns, notes, and every problem reported at once with its
file and line. No Ray, no image decoded."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import image_fixtures as fx
from rwray.data.imagesources import FILE_SOURCES
from rwray.data.imagesources.imagenet9 import super_class_of_index
from rwray.errors import DataError

SOURCES = {name: (params, build) for name, params, build, _ in FILE_SOURCES}
WRITERS = {"image_folder": fx.write_image_folder, "image_list": fx.write_image_list,
           "imagenet_lt": fx.write_imagenet_lt, "places_lt": fx.write_places_lt, "inat2018": fx.write_inat2018,
           "clothing1m": fx.write_clothing1m, "imagenet9": fx.write_imagenet9, "iwildcam": fx.write_iwildcam}


def build(params: dict):
    p, b = SOURCES[params["name"]]
    return b(p(**params))


def failure(params: dict) -> str:
    with pytest.raises(DataError) as e:
        build(params)
    return str(e.value)


def test_every_source_is_listed_with_its_own_name():
    assert list(SOURCES) == list(WRITERS)
    for name, (params, _) in SOURCES.items():
        assert params.model_fields["name"].default == name


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_fixture_reads_back_with_its_counts_and_classes(tmp_path, name):
    f = WRITERS[name](tmp_path)
    listing = build(f["params"])
    assert {s: len(v) for s, v in listing.splits.items()} == f["counts"]
    assert list(listing.splits)[:3] == ["train", "val", "test"]
    assert listing.classes == list(f["classes"])
    for s in listing.splits.values():
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in s.files)
        assert s.labels.dtype == np.int64 and np.unique(s.index).size == len(s)


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_missing_root_is_one_clear_problem(tmp_path, name):
    params = dict(WRITERS[name](tmp_path / "d")["params"], root=str(tmp_path / "nowhere"))
    msg = failure(params)
    assert str(tmp_path / "nowhere") in msg and "Traceback" not in msg


def test_image_folder_labels_follow_sorted_train_folders(tmp_path):
    f = fx.write_image_folder(tmp_path)
    listing = build(f["params"])
    train = listing.splits["train"]
    assert [Path(p).parent.name for p in train.files] == [listing.classes[y] for y in train.labels]
    assert not any(p.endswith(".txt") for p in train.files)  # README.txt skipped; .JPEG and .png read
    assert {Path(p).suffix for p in train.files} == {".jpg", ".JPEG", ".png"}


def test_image_folder_rejects_a_class_train_lacks_and_a_missing_split(tmp_path):
    f = fx.write_image_folder(tmp_path)
    (tmp_path / "val" / "zebra").mkdir()
    (tmp_path / "test").rename(tmp_path / "tests")
    msg = failure(f["params"])
    assert "2 problems" in msg and "val/zebra: class folder not in train/" in msg and "test folder" in msg


def test_image_list_defaults_num_classes_to_the_largest_label(tmp_path):
    f = fx.write_image_list(tmp_path)
    params = {k: v for k, v in f["params"].items() if k != "classes_file"}
    listing = build(params)
    assert len(listing.classes) == 4 and listing.classes == f["classes"]  # named from the train folders
    assert failure(dict(f["params"], num_classes=3)).count("classes.txt: 4 class names, but num_classes=3") == 1


def test_oltr_lists_take_class_names_from_train_folders(tmp_path):
    f = fx.write_imagenet_lt(tmp_path)
    listing = build(f["params"])
    assert np.bincount(listing.splits["train"].labels).tolist() == f["train_per_class"]
    assert [p.split(os.sep)[-3] for p in listing.splits["test"].files] == ["val"] * f["counts"]["test"]


def test_list_problems_are_reported_together_with_file_and_line(tmp_path):
    f = fx.write_imagenet_lt(tmp_path)
    lists, images = Path(f["params"]["root"]), Path(f["params"]["image_root"])
    train = (lists / "ImageNet_LT_train.txt").read_text().splitlines()
    for line in (train[2], train[5]):  # lines 3 and 6
        (images / line.split()[0]).unlink()
    val = lists / "ImageNet_LT_val.txt"
    good = val.read_text().splitlines()[0].split()[0]
    val.write_text(val.read_text() + f"{good} 1003\njust_a_path.JPEG\n")
    n = len(val.read_text().splitlines())
    msg = failure(f["params"])
    assert "4 problems" in msg
    assert f"ImageNet_LT_train.txt:3: file {train[2].split()[0]} does not exist" in msg
    assert f"ImageNet_LT_train.txt:6: file {train[5].split()[0]} does not exist" in msg
    assert f"ImageNet_LT_val.txt:{n - 1}: label 1003 outside [0, 5)" in msg
    assert f"ImageNet_LT_val.txt:{n}: expected \"relpath label\"" in msg


def test_a_missing_list_file_is_named(tmp_path):
    f = fx.write_places_lt(tmp_path)
    (Path(f["params"]["root"]) / "Places_LT_test.txt").unlink()
    msg = failure(f["params"])
    assert "1 problem:" in msg and "Places_LT_test.txt: list file does not exist" in msg


def test_inat_carves_val_from_train_and_tests_on_official_val(tmp_path):
    f = fx.write_inat2018(tmp_path)
    listing = build(f["params"])
    assert listing.mean == (0.466, 0.471, 0.380) and listing.std == (0.195, 0.194, 0.192)
    val, train = listing.splits["val"], listing.splits["train"]
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1]  # only classes with >= val_min_train=10 train images
    assert not set(val.index) & set(train.index) and all(i % 7 == 1000 % 7 for i in val.index)  # image ids
    assert "val: 4 train2018 images carved" in listing.notes[0] and "official val2018" in listing.notes[0]
    again = build(f["params"])
    assert again.splits["val"].index.tolist() == val.index.tolist()  # seeded
    assert build(dict(f["params"], seed=1)).splits["val"].index.tolist() != val.index.tolist()


def test_inat_problems_name_the_file_and_entry(tmp_path):
    f = fx.write_inat2018(tmp_path)
    d = json.loads((tmp_path / "train2018.json").read_text())
    for im in d["images"][:2]:
        (tmp_path / im["file_name"]).unlink()
    d["annotations"][3]["category_id"] = 40
    del d["annotations"][4]
    (tmp_path / "train2018.json").write_text(json.dumps(d))
    (tmp_path / "val2018.json").write_text("{\n  \"images\": [,\n")
    msg = failure(f["params"])
    assert "5 problems" in msg and "train2018.json: annotations[3]: category_id 40 outside [0, 4)" in msg
    assert re.search(r"train2018.json: images\[0\]: file .* does not exist", msg)
    assert "train2018.json: images[4]: image" in msg and "has no annotation" in msg
    assert "val2018.json:2: not valid JSON" in msg


def test_clothing1m_noisy_train_carries_known_clean_labels(tmp_path):
    f = fx.write_clothing1m(tmp_path)
    listing = build(f["params"])
    train, test = listing.splits["train"], listing.splits["test"]
    assert train.labels.tolist() == f["noisy_labels"]
    known = train.columns["clean_label"] >= 0
    assert known.sum() == f["known"]
    assert train.columns["clean_label"][known].tolist() == f["true_labels"][: f["known"]]
    assert (test.columns["clean_label"] == test.labels).all()
    clean = build(dict(f["params"], train="clean")).splits["train"]
    assert len(clean) == f["clean_train"] and (clean.columns["clean_label"] == clean.labels).all()


def test_clothing1m_problems_are_reported_together(tmp_path):
    f = fx.write_clothing1m(tmp_path)
    keys = (tmp_path / "noisy_train_key_list.txt").read_text().splitlines()
    for k in keys[:2]:
        (tmp_path / k).unlink()
    kv = tmp_path / "clean_label_kv.txt"
    kv.write_text(kv.read_text().replace(" 13\n", " 14\n", 1) + "images/0/00/x.jpg\n")
    with open(tmp_path / "clean_val_key_list.txt", "a") as out:
        out.write(keys[-1] + "\n")  # a noisy-only key: the clean kv file has no label for it
    msg = failure(f["params"])
    n_kv, n_val = len(kv.read_text().splitlines()), f["counts"]["val"] + 1
    assert "5 problems" in msg and f"noisy_train_key_list.txt:1: file {keys[0]} does not exist" in msg
    assert "noisy_train_key_list.txt:2:" in msg and "clean_label_kv.txt:" in msg and "label 14 outside [0, 14)" in msg
    assert f"clean_label_kv.txt:{n_kv}: expected \"relpath label\"" in msg
    assert f"clean_val_key_list.txt:{n_val}: key {keys[-1]} has no label in clean_label_kv.txt" in msg


def test_imagenet9_selection_matches_the_seed():
    table = super_class_of_index()
    assert len(table) == 42 and np.bincount(list(table.values())).tolist() == [5, 5, 3, 5, 5, 5, 5, 4, 5]
    assert {i for i, c in table.items() if c == 0} == {151, 207, 234, 235, 254}


def test_imagenet9_splits_labels_and_clusters(tmp_path):
    f = fx.write_imagenet9(tmp_path)
    listing = build(f["params"])
    for s in listing.splits.values():
        assert [f["wnids"][Path(p).parent.name] for p in s.files] == s.labels.tolist()
    test = listing.splits["test"]
    got = {"/".join(Path(p).parts[-2:]): tuple(int(test.columns[c][i]) for c in ("cluster1", "cluster2", "cluster3"))
           for i, p in enumerate(test.files)}
    assert {k: v for k, v in got.items() if v != (-1, -1, -1)} == {k: v for k, v in f["clusters"].items() if k in got}
    assert sum(v == (-1, -1, -1) for v in got.values()) == 2 and "2 of 84" in listing.notes[1]
    for s in ("train", "val", "imagenet_a"):
        assert (listing.splits[s].columns["cluster1"] == -1).all()
    assert "cluster1" not in build(dict(f["params"], clusters_csv=None)).splits["test"].columns


def test_imagenet9_needs_all_1000_wnids_and_a_well_formed_csv(tmp_path):
    f = fx.write_imagenet9(tmp_path)
    csv_path = Path(f["params"]["clusters_csv"])
    csv_path.write_text(csv_path.read_text() + "n00000030/x.JPEG,frog,one,2,3\n")
    msg = failure(f["params"])
    assert f"9class_imagenet_val.csv:{len(csv_path.read_text().splitlines())}: expected" in msg
    (f["root"] / "train" / "n00000999").rmdir()
    assert "999 class folders, expected ImageNet's 1000" in failure(f["params"])


@pytest.mark.parametrize("with_y", [True, False])
def test_iwildcam_splits_labels_and_locations(tmp_path, with_y):
    f = fx.write_iwildcam(tmp_path, with_y=with_y)
    listing = build(f["params"])
    assert listing.classes == ["0", "3", "7", "12"]
    rows = f["rows"]
    for name, s in listing.splits.items():
        mine = [r for r in rows if r[1] == name]
        assert s.index.tolist() == [r[0] for r in mine]  # the metadata row: WILDS's sample index
        assert s.labels.tolist() == [["0", "3", "7", "12"].index(str(r[-1])) for r in mine]
        assert s.columns["location"].tolist() == [r[2] for r in mine]


def test_iwildcam_problems_are_reported_together(tmp_path):
    f = fx.write_iwildcam(tmp_path)
    meta = tmp_path / "metadata.csv"
    lines = meta.read_text().splitlines()
    for line in lines[1:3]:
        (tmp_path / "train" / line.split(",")[6]).unlink()
    lines[4] = lines[4].rsplit(",", 2)[0] + ",-1,0"
    lines[5] = "5,train,0"
    meta.write_text("\n".join(lines) + "\n")
    msg = failure(f["params"])
    assert "4 problems" in msg and "metadata.csv:2: file train/" in msg and "metadata.csv:3: file train/" in msg
    assert "metadata.csv:5: label y=-1 is negative" in msg and "metadata.csv:6: a malformed row" in msg
