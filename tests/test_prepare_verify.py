"""`rwray data prepare` and `rwray data verify` agree: what prepare writes (array and image-file sources alike) verify
accepts, and a set verify would reject (a class without training samples) prepare refuses before writing anything,
in verify's own words. Messages naming classes, files or shards give the count and the first few names, so they
stay short at 1,000 (ImageNet-LT) and 8,142 (iNaturalist 2018) classes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import image_fixtures as fx
from rwray import cli
from rwray.data import SOURCES, BuilderParams, Manifest, prepare, verify
from rwray.data.checks import check_staged, class_count_problems
from rwray.data.sources import DigitsParams, SyntheticParams
from rwray.errors import DataError
from rwray.inference import Model, check_data
from rwray.paths import check_shard_files
from rwray.text import ITEM_CHARS, LIST_CHARS, clip, plural, some
from test_import_graph import imports, module_names

BOUND = 1000  # characters: a message about 1,000 or 8,142 classes stays this short

IMAGE_WRITERS = {"image_folder": fx.write_image_folder, "image_list": fx.write_image_list,
                 "imagenet_lt": fx.write_imagenet_lt, "places_lt": fx.write_places_lt,
                 "inat2018": fx.write_inat2018, "clothing1m": fx.write_clothing1m, "imagenet9": fx.write_imagenet9,
                 "iwildcam": fx.write_iwildcam}
ONE_WORKER = BuilderParams(rows_per_shard=16, rows_per_group=4, workers=1)  # several shards and groups, no pool


def _source(params: dict):
    return SOURCES[params["name"]].params.model_validate(params)


def _statement(msg: str) -> str:
    """The class-count sentence of a verify message: between "manifest.json: " and ". Fix:"."""
    found = re.search(r"manifest\.json: (.*? zero training samples: .*?)\. Fix:", msg)
    assert found, msg
    return found.group(1)


def _edit(d: Path, fn) -> None:
    data = json.loads((d / "manifest.json").read_text())
    fn(data)
    (d / "manifest.json").write_text(json.dumps(data))


def _widen(d: Path, names: list[str]) -> None:
    """Give a prepared 10-class digits directory ``len(names)`` classes: the first 10 keep their samples, the rest
    have none (labels 0..9 stay in range, so the empty classes are verify's only problem)."""
    def fn(m):
        m["classes"], m["num_classes"] = names, len(names)
        for s in m["splits"].values():
            s["class_counts"] = s["class_counts"] + [0] * (len(names) - 10)
    _edit(d, fn)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return prepare(DigitsParams(), tmp_path_factory.mktemp("digits") / "d", BuilderParams(rows_per_shard=200)).dir


# ------------------------------------------------------------------------------------------------ the text helper


def test_plural_some_and_clip_by_hand():
    assert (plural(1, "class", "classes"), plural(990, "class", "classes"), plural(2, "file")) == \
        ("1 class", "990 classes", "2 files")
    assert some(["a", "b"]) == "a, b" and some([]) == ""
    names = [f"n{i:08d}" for i in range(990)]
    assert some(names) == "n00000000, n00000001, n00000002, n00000003, n00000004, ... and 985 more"
    assert some(range(7), 3, "; ") == "0; 1; 2; ... and 4 more"
    long = "x" * 40 + "/" + "y" * 600
    assert len(clip(long)) == ITEM_CHARS == 100 and clip(long).startswith("x" * 40) and clip(long).endswith("y" * 20)
    assert "..." in clip(long) and clip("short") == "short"
    # bounded whatever the count and the item length: 5 items of ITEM_CHARS, separators and the tail
    assert len(some([long] * 8142)) == 5 * (ITEM_CHARS + 2) + len("... and 8137 more")
    # a lone item keeps up to LIST_CHARS (a deep path stays whole), two share them
    assert len(some([long])) == LIST_CHARS and len(some([long] * 2)) == 2 * LIST_CHARS // 2 + 2
    assert some(["/a/" + "d" * 300 + "/shard.parquet"]) == "/a/" + "d" * 300 + "/shard.parquet"


def test_the_text_helper_is_a_leaf():
    mods = module_names()
    assert imports("rwray.text", mods["rwray.text"], set(mods)) == set()


# ---------------------------------------------------------------------------------- prepare -> verify, every source


@pytest.mark.parametrize("params,builder", [
    (DigitsParams(), BuilderParams(imbalance="exp", factor=10, rows_per_shard=150)),
    (DigitsParams(), BuilderParams(label_noise="symmetric", noise_rate=0.3, rows_per_shard=400)),  # clean_label
    (SOURCES["biased-digits"].params(), BuilderParams(val_per_class=5)),  # bias column, test_unbiased split
    (SyntheticParams(num_classes=25, image_shape=(3, 4, 4), train_per_class=6, test_per_class=2),
     BuilderParams(val_per_class=0)),  # an empty val split: one empty shard
], ids=["digits-lt", "digits-noisy", "biased-digits", "synthetic-no-val"])
def test_what_prepare_writes_from_arrays_verify_accepts(tmp_path, params, builder):
    m = prepare(params, tmp_path / "d", builder)
    assert verify(m.dir).sha256 == m.sha256  # checksums included
    assert min(m.class_counts("train")) >= 1
    r = CliRunner().invoke(cli.app, ["data", "verify", str(m.dir)])
    assert r.exit_code == 0 and "ok (" in r.output, r.output


@pytest.mark.parametrize("name", list(IMAGE_WRITERS))
def test_what_prepare_writes_from_image_files_verify_accepts(tmp_path, name):
    f = IMAGE_WRITERS[name](tmp_path / "src")
    m = prepare(_source(f["params"]), tmp_path / "d", ONE_WORKER)
    assert verify(m.dir).sha256 == m.sha256
    assert {s: m.num_samples(s) for s in m.data["splits"]} == f["counts"]
    r = CliRunner().invoke(cli.app, ["data", "verify", str(m.dir)])
    assert r.exit_code == 0 and "ok (" in r.output, r.output


# ------------------------------------------------------------------ refused by prepare, in verify's words


def _lt_without_train_of(root: Path, dropped: set[int], num_classes: int = 5) -> dict:
    """An ImageNet-LT fixture whose train list has no line of the ``dropped`` classes (val and test keep theirs)."""
    f = fx.write_imagenet_lt(root, num_classes=num_classes)
    train = f["root"] / "ImageNet_LT_train.txt"
    train.write_text("".join(ln + "\n" for ln in train.read_text().splitlines() if int(ln.split()[1]) not in dropped))
    return f


def test_an_image_source_with_a_class_without_train_images_is_refused_in_verifys_words(tmp_path, digits):
    f = _lt_without_train_of(tmp_path / "src", {1, 3})
    source = _source(f["params"])
    listing = SOURCES.build(source)
    counts = np.bincount(listing.splits["train"].labels, minlength=5)
    assert counts.tolist()[1] == counts.tolist()[3] == 0

    calls = []
    out = tmp_path / "out"
    with pytest.raises(DataError) as refused:
        prepare(source, out, ONE_WORKER, progress=lambda *a: calls.append(a))
    assert calls == [] and not out.exists()  # refused before the first shard: no image read, nothing on disk
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging directory left either

    # verify on a directory with the same classes and train counts: the same sentence, word for word
    d = tmp_path / "same-counts"
    shutil.copytree(digits, d)  # classes "0".."9", like the listing's "0".."4" (class 1 has no train folder)
    _edit(d, lambda m: m["splits"]["train"].__setitem__("class_counts", counts.tolist() + [5] * 5))
    with pytest.raises(DataError) as rejected:
        verify(d)
    sentence = _statement(str(rejected.value))
    assert sentence == "2 classes have zero training samples: 1, 3; methods that divide by class counts fail, so " \
                       "every class needs at least one (a smaller imbalance factor or noise rate, a larger source, " \
                       "or training images for them)"
    assert sentence in str(refused.value) and f"Nothing was written to {out}" in str(refused.value)
    assert class_count_problems(counts, listing.classes, 5) == [sentence]


def test_an_array_source_with_an_empty_tail_class_is_refused_in_verifys_words(tmp_path, digits):
    # n_max = (1797 - 500 test - 200 val) // 10 = 109; int(109 * 200 ** (-c / 9)) is 0 for c = 8 (0.98), 9 (0.545)
    with pytest.raises(DataError) as refused:
        prepare(DigitsParams(), tmp_path / "tail", BuilderParams(imbalance="exp", factor=200))
    assert not (tmp_path / "tail").exists()
    d = tmp_path / "zeroed"
    shutil.copytree(digits, d)
    _edit(d, lambda m: [m["splits"]["train"]["class_counts"].__setitem__(c, 0) for c in (8, 9)])
    with pytest.raises(DataError) as rejected:
        verify(d)
    assert _statement(str(rejected.value)) in str(refused.value)


def test_imagenet_lt_with_1000_classes_and_10_trained_is_refused_briefly_on_the_cli(tmp_path):
    f = fx.write_imagenet_lt(tmp_path / "src", num_classes=10, per_class=(2, 1, 1))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli.app, ["data", "prepare", "imagenet_lt", "--root", str(f["root"]), "-p",
                                     f"image_root={f['params']['image_root']}", "-p", "num_classes=1000",
                                     "--out", str(out), "--workers", "1"])
    text = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2, r.output
    assert text.startswith("error: DataError ") and "wrote" not in text and not out.exists()
    assert "990 classes have zero training samples: 10, 11, 12, 13, 14, ... and 985 more;" in text
    assert len(text) < BOUND


# ----------------------------------------------------------------------------- long lists stay short in messages


@pytest.mark.parametrize("k", [1000, 8142])
def test_verify_names_the_count_of_empty_classes_in_a_bounded_message(tmp_path, digits, k):
    d = tmp_path / "wide"
    shutil.copytree(digits, d)
    names = [f"Animalia Chordata Aves Passeriformes species {c:05d}" for c in range(k)]  # iNat-like long names
    _widen(d, names)
    with pytest.raises(DataError) as e:
        verify(d)
    msg = str(e.value)
    assert f"{k - 10} classes have zero training samples: {names[10]}, {names[11]}, " in msg
    assert f"... and {k - 15} more;" in msg and names[15] not in msg
    assert "1 problem(s)" in msg and len(msg) < BOUND


def test_val_per_class_too_large_for_1000_classes_is_one_short_message(tmp_path):
    src = SyntheticParams(num_classes=1000, image_shape=(1, 2, 2), train_per_class=3, test_per_class=1)
    with pytest.raises(DataError) as e:
        prepare(src, tmp_path / "d", BuilderParams(val_per_class=3))
    msg = str(e.value)
    assert "val_per_class=3 leaves no training images for 1000 classes (class_0: 3 in the train pool, " in msg
    assert "... and 995 more); lower val_per_class below 3" in msg and len(msg) < BOUND


def test_an_empty_long_tail_over_1000_classes_is_one_short_message(tmp_path):
    # n_max = 2 per class after val; exp IF 100: n_c = int(2 * 0.01^(c/999)) is 0 from c = 151 on (2 * 0.01^x < 1
    # for x > log(0.5)/log(0.01) = 0.1505, i.e. c >= 151): 849 classes empty
    src = SyntheticParams(num_classes=1000, image_shape=(1, 2, 2), train_per_class=3, test_per_class=1)
    with pytest.raises(DataError) as e:
        prepare(src, tmp_path / "d", BuilderParams(val_per_class=1, imbalance="exp", factor=100))
    msg = str(e.value)
    assert "849 classes have zero training samples: class_151, class_152, " in msg and "... and 844 more" in msg
    assert len(msg) < BOUND and not (tmp_path / "d").exists()


def test_check_data_names_how_many_of_1000_classes_differ(tmp_path, digits):
    manifest = Manifest.load(digits)
    wide = tmp_path / "wide1000"
    shutil.copytree(digits, wide)
    _widen(wide, [f"n{c:08d}" for c in range(1000)])
    model = Model(lambda: None, [f"other{c}" for c in range(1000)], [1] * 1000, manifest.image_shape, None, "x",
                  None)
    with pytest.raises(DataError) as e:
        check_data(model, Manifest.load(wide), "test")
    msg = str(e.value)
    assert "another class list: the model's 1000 classes against the data's 1000 (1000 positions differ; " in msg
    assert "first differences 0: 'other0' vs 'n00000000'; 1: 'other1' vs 'n00000001'; 2: " in msg
    assert "; ... and 997 more)" in msg and len(msg) < BOUND


def test_many_missing_shards_are_one_problem_with_a_count(tmp_path):
    m = prepare(DigitsParams(), tmp_path / "d", BuilderParams(rows_per_shard=5))
    shards = [p for p in m.dir.iterdir() if p.suffix == ".parquet"]
    n = len(shards)  # train 1797 - 500 test - 200 val = 1097: ceil(1097/5) + 200/5 + 500/5 = 220 + 40 + 100
    assert n == 360
    for p in shards:
        p.unlink()
    with pytest.raises(DataError) as e:
        verify(m.dir)
    msg = str(e.value)
    assert "1 problem(s)" in msg and f"({n} shard files): listed in the manifest but missing from {m.dir}" in msg
    assert "train-00000.parquet, train-00001.parquet, train-00002.parquet, train-00003.parquet, train-00004.parquet, "\
           f"... and {n - 5} more" in msg
    assert len(msg) < BOUND


def test_verify_shows_at_most_50_problems_then_a_count(tmp_path):
    m = prepare(DigitsParams(), tmp_path / "d", BuilderParams(rows_per_shard=20))
    for p in m.dir.glob("*.parquet"):  # every shard unreadable: one problem each
        p.write_bytes(b"not parquet")
    n = len(list(m.dir.glob("*.parquet")))  # train ceil(1097 / 20) = 55, val 10, test 25: 90
    with pytest.raises(DataError) as e:
        verify(m.dir, checksums=False)
    msg = str(e.value)
    assert f"({n} problem(s))" in msg and msg.count("\n  - ") == 50 and msg.endswith(f"... and {n - 50} more")


def test_shard_files_outside_the_directory_are_counted_not_all_listed(tmp_path):
    names = [f"../elsewhere/train-{i:05d}.parquet" for i in range(1000)]
    with pytest.raises(DataError) as e:
        check_shard_files(tmp_path, names)
    msg = str(e.value)
    assert "lists files outside itself (1000): ../elsewhere/train-00000.parquet (resolves to " in msg
    assert "... and 995 more" in msg and "train-00005" not in msg and len(msg) < BOUND


# ---------------------------------------------------------------------------------- the writer's last check


def test_a_staged_directory_verify_rejects_is_never_moved_into_place(tmp_path, digits):
    staged = tmp_path / "staged"
    shutil.copytree(digits, staged)
    (staged / "val-00000.parquet").unlink()
    check_staged(digits, tmp_path / "out")  # a good one passes
    with pytest.raises(DataError) as e:
        check_staged(staged, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith(f"refusing to write {tmp_path / 'out'}: the shards prepared for it fail verification")
    assert "val-00000.parquet: listed in the manifest but missing" in msg


def test_the_closing_line_gives_the_per_class_range_for_many_classes(tmp_path):
    out = tmp_path / "d"
    r = CliRunner().invoke(cli.app, ["data", "prepare", "synthetic", "--out", str(out), "-p", "num_classes=30",
                                     "-p", "image_shape=[1,4,4]", "-p", "train_per_class=8", "-p",
                                     "test_per_class=1", "--val-per-class", "2", "--imbalance", "exp", "--factor",
                                     "5"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    # n_max = 30 * (8 - 2) // 30 = 6; n_c = int(6 * 5 ** (-c / 29)): 6 for the head, int(6 / 5) = 1 for the tail
    assert "train per class 1..6 over 30 classes" in text
    assert CliRunner().invoke(cli.app, ["data", "verify", str(out)]).exit_code == 0
