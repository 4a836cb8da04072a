"""`rwray data synth`: the published shapes (pure count arithmetic at scale 1, no files), and small synthetic
datasets read back by the unchanged readers of `rwray.data.imagesources` (class counts, split sizes, labels against
the decoded images' colour signature, format details), plus a real prepare + verify of iNaturalist and ImageNet-LT.

Figures below are restated from the published sources (not imported from the code under test): OLTR / the
classifier-balancing lists, the iNaturalist 2018 README, the Clothing1M paper and README, WILDS v2.0."""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rwray import cli
from rwray.data import SOURCES, BuilderParams, prepare, verify
from rwray.data.imagesources import FILE_SOURCES
from rwray.data import synth as synth_pkg
from rwray.data.synth import SYNTHS, Args, long_tail_counts, synthesize, train_profile
from rwray.data.synth.images import mean_colour
from rwray.data.synth.profile import spread, tail_exponent
from rwray.errors import ConfigError, DataError

READERS = {name: (params, build) for name, params, build, _ in FILE_SOURCES}
# name -> (classes, {split: images}, train max, train min): the published figures
PUBLISHED = {
    "imagenet_lt": (1000, {"train": 115_846, "val": 20_000, "test": 50_000}, 1280, 5),
    "places_lt": (365, {"train": 62_500, "val": 7_300, "test": 36_500}, 4980, 5),
    "inat2018": (8142, {"train": 437_513, "val": 24_426}, 1000, 2),
    "clothing1m": (14, {"noisy_train": 1_000_000, "clean_train": 47_570, "clean_val": 14_313, "clean_test": 10_526},
                   None, None),
    "iwildcam": (182, {"train": 129_809, "val": 14_961, "test": 42_791, "id_val": 7_314, "id_test": 8_154},
                 40_000, 1),
    "imagenet9": (9, {"train": 42 * 1300, "val": 42 * 50}, None, None),
}
# Small enough for this machine, large enough that every class of the real class count has a train image.
SCALES = {"imagenet_lt": 0.01, "places_lt": 0.01, "inat2018": 0.02, "clothing1m": 0.002, "iwildcam": 0.01,
          "imagenet9": 0.01}


def scaled(n: int, f: float, floor: int = 1) -> int:
    return max(floor, math.floor(n * f + 0.5))


_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module")
def synthed(tmp_path_factory):
    """name -> (Synthesized, FileListing read back by the real reader), written once per module."""

    def get(name: str):
        if name not in _CACHE:
            s = synthesize(name, tmp_path_factory.mktemp(name) / "raw", scale=SCALES[name], size=16, workers=1)
            params, build = READERS[name]
            _CACHE[name] = (s, build(params(**s.source)))
        return _CACHE[name]

    yield get
    _CACHE.clear()


# ------------------------------------------------------------------------------------------------- count profiles

def test_the_table_lists_every_dataset_at_its_published_shape():
    assert list(SYNTHS) == ["imagenet_lt", "places_lt", "inat2018", "clothing1m", "iwildcam", "imagenet9"]
    for name, (k, splits, top, bottom) in PUBLISHED.items():
        spec = SYNTHS[name]
        assert (spec.classes, spec.splits, spec.train_max, spec.train_min) == (k, splits, top, bottom)


@pytest.mark.parametrize("name", [n for n, v in PUBLISHED.items() if v[2] is not None])
def test_the_long_tail_has_exactly_the_published_total_max_and_min(name):
    k, splits, top, bottom = PUBLISHED[name]
    counts = long_tail_counts(k, splits["train"], top, bottom)
    assert counts.shape == (k,) and int(counts.sum()) == splits["train"]
    assert counts[0] == top and counts[-1] == bottom and np.all(np.diff(counts) <= 0)
    # each count is the formula n_c = min * (max/min)^((1 - c/(K-1))^p) rounded (within one image)
    p = tail_exponent(k, splits["train"], top, bottom)
    x = np.arange(k) / (k - 1)
    assert np.abs(counts - bottom * (top / bottom) ** ((1 - x) ** p)).max() < 1.0 + 1e-9
    assert np.array_equal(train_profile(k, splits["train"], top, bottom), counts)  # scale 1 is the published tail


def test_a_hand_computed_tail():
    # K = 3, 100 .. 1: the middle class at x = 1/2 gets 100^(0.5^p); a total of 111 wants 10, i.e. p = 1
    assert long_tail_counts(3, 111, 100, 1).tolist() == [100, 10, 1]
    assert tail_exponent(3, 111, 100, 1) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="possible totals: 102..201"):
        long_tail_counts(3, 101, 100, 1)  # max + 2 * min = 102 at the least


def test_scaling_keeps_every_class_and_the_scaled_ends():
    c = train_profile(1000, 115_846, 1280, 5, scale=0.1)
    assert c.sum() == 11_585 and c[0] == 128 and c[-1] == 1 and c.min() >= 1
    tiny = train_profile(8142, 437_513, 1000, 2, scale=0.001)  # 438 images for 8,142 classes: one each
    assert tiny.sum() == 8142 and set(tiny.tolist()) == {1}
    # fewer images than classes: each class scaled on its own (at least one), the head keeps its shape
    small = train_profile(8142, 437_513, 1000, 2, scale=0.01)
    published = long_tail_counts(8142, 437_513, 1000, 2)
    assert small.tolist() == [max(1, math.floor(n / 100 + 0.5)) for n in published.tolist()]
    assert small[0] == 10 and small[-1] == 1 and (small >= 2).sum() > 500  # classes iNat's reader can carve val from


def test_reclassing_keeps_the_total_and_the_ratio():
    ten = train_profile(8142, 437_513, 1000, 2, classes=10)
    assert ten.size == 10 and ten.sum() == 437_513 and ten[0] / ten[-1] == pytest.approx(500, rel=0.01)
    wide = train_profile(1000, 115_846, 1280, 5, classes=8142)
    assert wide.size == 8142 and wide.sum() == 115_846 and wide.min() >= 1


def test_eval_splits_spread_evenly_and_cover_some_classes_when_small():
    rng = np.random.default_rng(0)
    assert set(spread(20_000, 1000, rng).tolist()) == {20}
    few = spread(5, 1000, rng)
    picked = np.flatnonzero(few)
    assert few.sum() == 5 and picked.size == 5 and np.all(np.diff(picked) >= 199)  # 1000 / 5 apart, +-1


# ------------------------------------------------------------------------------------ written, read by the readers

def _decoded_mean(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "JPEG" and min(im.size) == 16
        return np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)


def _labels_match_images(split, n: int = 6) -> None:
    """The first n images of a split decode to their label's colour signature (mean within 12 per channel)."""
    for f, y in zip(split.files[:n], split.labels[:n].tolist()):
        assert np.abs(_decoded_mean(f) - mean_colour(y)).max() < 12, (f, y)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_the_reader_reads_the_published_classes_and_scaled_split_sizes(synthed, name):
    s, listing = synthed(name)
    k, splits, _, _ = PUBLISHED[name]
    f = SCALES[name]
    assert len(listing.classes) == k == s.num_classes and len(s.train_counts) == k
    train = np.bincount(listing.splits["train"].labels, minlength=k)
    assert train.min() >= 1  # every class present in train
    got = {sp: len(v) for sp, v in listing.splits.items()}
    if name in ("imagenet_lt", "places_lt", "iwildcam"):
        want = {sp: scaled(n, f, floor=k if sp == "train" else 1) for sp, n in splits.items()}
        assert got == want == s.splits
        assert np.array_equal(train, s.train_counts)
        assert sorted(s.train_counts, reverse=True) == train_profile(k, splits["train"], *PUBLISHED[name][2:],
                                                                     scale=f).tolist()
    elif name == "inat2018":
        n_train = scaled(splits["train"], f, floor=k)
        assert s.splits == {"train": n_train, "val": scaled(splits["val"], f)}
        carved = sum(n >= s.source["val_min_train"] for n in s.train_counts)  # one each from classes >= the bar
        assert got == {"train": n_train - carved, "val": carved, "test": scaled(splits["val"], f)} and carved >= 1
    elif name == "clothing1m":
        assert s.splits == {sp: scaled(n, f, floor=k if sp == "noisy_train" else 1) for sp, n in splits.items()}
        assert got == {"train": s.splits["noisy_train"], "val": s.splits["clean_val"], "test": s.splits["clean_test"]}
        assert np.array_equal(train, s.train_counts)
    else:  # imagenet9: val carved per super-class from ImageNet train, test = ImageNet val, + ImageNet-A
        v = s.source["val_per_class"]
        assert s.splits["train"] == 42 * scaled(1300, f) and s.splits["val"] == 42 * scaled(50, f)
        assert got == {"train": s.splits["train"] - 9 * v, "val": 9 * v, "test": s.splits["val"],
                       "imagenet_a": s.splits["imagenet_a"]}
    for split in listing.splits.values():
        if name != "clothing1m" or split is not listing.splits["train"]:  # clothing train labels are the noisy ones
            _labels_match_images(split)


def test_oltr_lists_have_the_published_path_style(synthed):
    s, _ = synthed("imagenet_lt")
    lists = Path(s.source["root"])
    line = {sp: (lists / f"ImageNet_LT_{sp}.txt").read_text().splitlines()[0] for sp in ("train", "val", "test")}
    assert re.fullmatch(r"train/(n\d{8})/\1_\d+\.JPEG \d+", line["train"])
    assert re.fullmatch(r"train/(n\d{8})/\1_\d+\.JPEG \d+", line["val"])  # val comes out of ImageNet train
    assert re.fullmatch(r"val/n\d{8}/ILSVRC2012_val_\d{8}\.JPEG \d+", line["test"])
    s, _ = synthed("places_lt")
    lists = Path(s.source["root"])
    assert re.fullmatch(r"train/scene_\d{3}/\d{8}\.jpg \d+", (lists / "Places_LT_train.txt").read_text().split("\n")[0])
    assert re.fullmatch(r"val/scene_\d{3}/Places365_val_\d{8}\.jpg \d+",
                        (lists / "Places_LT_test.txt").read_text().split("\n")[0])


def test_inat_json_has_the_readme_keys_and_real_supercategories(synthed):
    s, _ = synthed("inat2018")
    d = json.loads((Path(s.source["root"]) / "train2018.json").read_text())
    assert set(d) == {"info", "images", "categories", "annotations", "licenses"}
    assert set(d["images"][0]) == {"id", "width", "height", "file_name", "license", "rights_holder"}
    assert set(d["annotations"][0]) == {"id", "image_id", "category_id"}
    assert set(d["categories"][0]) == {"id", "name", "supercategory", "kingdom", "phylum", "class", "order", "family",
                                       "genus"}
    per_super: dict[str, int] = {}
    for c in d["categories"]:
        per_super[c["supercategory"]] = per_super.get(c["supercategory"], 0) + 1
    assert per_super == {"Plantae": 2917, "Insecta": 2031, "Aves": 1258, "Actinopterygii": 369, "Fungi": 321,
                         "Reptilia": 284, "Mollusca": 262, "Mammalia": 234, "Animalia": 178, "Amphibia": 144,
                         "Arachnida": 114, "Chromista": 25, "Protozoa": 4, "Bacteria": 1}  # the README's table
    for im, ann in zip(d["images"][:5], d["annotations"][:5]):
        cat = d["categories"][ann["category_id"]]
        assert ann["id"] == ann["image_id"] == im["id"]
        assert re.fullmatch(rf"train_val2018/{cat['supercategory']}/{cat['id']}/[0-9a-f]{{32}}\.jpg", im["file_name"])
        with Image.open(Path(s.source["root"]) / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"])


def test_clothing_kv_files_noise_and_clean_labels(synthed):
    s, listing = synthed("clothing1m")
    root = Path(s.source["root"])
    lines = {f: (root / f).read_text().splitlines() for f in ("noisy_label_kv.txt", "clean_label_kv.txt")}
    clean_total = s.splits["clean_train"] + s.splits["clean_val"] + s.splits["clean_test"]
    assert len(lines["clean_label_kv.txt"]) == clean_total
    assert len(lines["noisy_label_kv.txt"]) == s.splits["noisy_train"] + scaled(37_497, SCALES["clothing1m"])
    assert re.fullmatch(r"images/\d/\d\d/\d+,\d+\.jpg \d+", lines["noisy_label_kv.txt"][0])
    train = listing.splits["train"]
    assert set(train.columns["clean_label"].tolist()) == {-1}  # the noisy train keys have no clean label
    true = np.array([int(np.argmin(np.abs(np.stack([mean_colour(c) for c in range(14)]) - _decoded_mean(f)).sum(1)))
                     for f in train.files[:300]])
    share = float((true != train.labels[:300]).mean())  # the images carry the true class; labels flip ~38.46 %
    assert 0.30 < share < 0.47
    assert listing.classes[8] == "Downcoat" and len(listing.classes) == 14


def test_iwildcam_has_wilds_columns_and_ood_cameras(synthed):
    s, listing = synthed("iwildcam")
    with open(Path(s.source["root"]) / "metadata.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["", "split", "location_remapped", "location", "sequence_remapped", "seq_id", "y", "category_id",
                      "datetime", "filename", "image_id"]
    loc = {sp: set(v.columns["location"].tolist()) for sp, v in listing.splits.items()}
    assert not loc["train"] & (loc["val"] | loc["test"]) and not loc["val"] & loc["test"]
    assert loc["id_val"] <= loc["train"] and loc["id_test"] <= loc["train"]


def test_imagenet9_has_1000_wnid_folders_and_imagenet_a_for_the_overlap(synthed):
    s, listing = synthed("imagenet9")
    root = Path(s.source["root"])
    for split in ("train", "val"):
        folders = sorted(p for p in (root / split).iterdir())
        assert len(folders) == 1000 and sum(any(p.iterdir()) for p in folders) == 42
    assert len(list(Path(s.source["imagenet_a_root"]).iterdir())) == 21  # ImageNet-A has 21 of the 42 wnids
    assert set(listing.splits["test"].columns["cluster1"].tolist()) <= set(range(9))


def test_reclassed_data_keeps_the_split_sizes_and_the_reader_sees_k_classes(tmp_path):
    s = synthesize("imagenet_lt", tmp_path / "k10", scale=0.01, size=8, classes=10, workers=1)
    params, build = READERS["imagenet_lt"]
    listing = build(params(**s.source))
    assert s.source["num_classes"] == 10 and len(listing.classes) == 10
    assert {sp: len(v) for sp, v in listing.splits.items()} == {"train": 1158, "val": 200, "test": 500}
    counts = np.bincount(listing.splits["train"].labels, minlength=10)
    assert np.array_equal(counts, s.train_counts) and counts.max() / counts.min() == pytest.approx(1280 / 5, rel=0.01)


# ------------------------------------------------------------------------------ determinism, prepare, atomicity, CLI

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_seed_gives_the_same_bytes_and_another_seed_others(tmp_path):
    a = synthesize("places_lt", tmp_path / "a", scale=0.006, size=8, workers=1)  # 638 images: two chunks
    b = synthesize("places_lt", tmp_path / "b", scale=0.006, size=8, workers=2)  # chunks, not workers, seed images
    c = synthesize("places_lt", tmp_path / "c", scale=0.006, size=8, seed=1, workers=1)
    assert a.files == 638
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and a.train_counts == b.train_counts
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")
    assert c.splits == a.splits  # the sizes do not depend on the seed


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_plan_is_a_function_of_the_seed(name):
    small = {n: f / 2 for n, f in SCALES.items()}[name]
    a, b = (SYNTHS[name].plan(Args(scale=small, size=8, seed=0)) for _ in range(2))
    c = SYNTHS[name].plan(Args(scale=small, size=8, seed=1))
    assert a.texts == b.texts and a.files == b.files and np.array_equal(a.label_array(), b.label_array())
    assert a.texts != c.texts and a.splits == c.splits


def test_the_package_stays_on_the_data_side():
    for path in Path(synth_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith(("rwray.train", "rwray.tracking", "torch", "ray")) for m in mods), path


@pytest.mark.parametrize("name", ["inat2018", "imagenet_lt"])
def test_prepare_and_verify_read_the_synthetic_dataset(synthed, tmp_path, name):
    s, listing = synthed(name)
    m = verify(prepare(SOURCES[name].params(**s.source), tmp_path / "shards", BuilderParams(workers=1)).dir)
    assert {sp: m.num_samples(sp) for sp in ("train", "val", "test")} == \
        {sp: len(listing.splits[sp]) for sp in ("train", "val", "test")}
    assert m.num_classes == PUBLISHED[name][0]


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError) as e:
        synthesize("imagenet", tmp_path / "x", scale=-1, size=4, classes=1)
    msg = str(e.value)
    assert "4 problems" in msg and "choose one of: imagenet_lt, places_lt, inat2018, clothing1m, iwildcam, " \
                                  "imagenet9" in msg
    with pytest.raises(ConfigError, match="--classes does not apply to imagenet9"):
        synthesize("imagenet9", tmp_path / "x", classes=5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already holds files"):
        synthesize("places_lt", tmp_path / "full", scale=0.001)
    with pytest.raises(DataError, match=r"about 1,072,409,000,000 images, .* GiB free"):  # refused before planning
        synthesize("clothing1m", tmp_path / "huge", scale=1e6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_an_interrupted_synth_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    from rwray.data.synth import run

    def interrupted(root, files, *a, **kw):
        (Path(root) / files[0]).parent.mkdir(parents=True)
        (Path(root) / files[0]).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize("places_lt", tmp_path / "raw", scale=0.001)
    assert list(tmp_path.iterdir()) == []  # neither raw/ nor raw.partial/
    (tmp_path / "raw.partial").mkdir()  # somebody else's folder of that name is not ours to delete
    with pytest.raises(DataError, match="not left by rwray data synth"):
        synthesize("places_lt", tmp_path / "raw", scale=0.001)


def test_the_cli_writes_reports_and_prints_a_prepare_command_that_works(tmp_path):
    out = tmp_path / "raw"
    r = CliRunner().invoke(cli.app, ["data", "synth", "places_lt", "--out", str(out), "--scale", "0.01", "--size",
                                     "8", "--workers", "1"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "splits {'train': 625, 'val': 73, 'test': 365}; 365 classes; train per class 50..1" in text
    command = next(line for line in r.output.splitlines() if line.startswith("rwray data prepare"))
    words = shlex.split(command)
    assert words[:4] == ["rwray", "data", "prepare", "places_lt"]
    p = CliRunner().invoke(cli.app, words[1:] + ["--workers", "1"])
    assert p.exit_code == 0, p.output
    assert "{'train': 625, 'val': 73, 'test': 365}" in " ".join(p.output.split())
    again = CliRunner().invoke(cli.app, ["data", "synth", "places_lt", "--out", str(out)])
    assert again.exit_code == 2 and "already holds files" in again.output and "Traceback" not in again.output
    bad = CliRunner().invoke(cli.app, ["data", "synth", "nope", "--out", str(tmp_path / "n"), "--size", "4"])
    assert bad.exit_code == 2 and "unknown dataset 'nope'" in bad.output
    assert "--size must be between 8 and 4096" in bad.output
    assert not (tmp_path / "n").exists()
