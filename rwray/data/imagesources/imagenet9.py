"""ReBias's 9-class ImageNet (Bahng et al. 2020; clovaai/rebias ``datasets/imagenet.py``): nine super-classes, each a
range of indices into the 1000 sorted ImageNet wnids, dog / bird / monkey cut down to the wnids ImageNet-A also has
(42 wnids). train = ImageNet train of those wnids less a seeded val carve; test = ImageNet val (class folders);
``imagenet_a`` = ImageNet-A's folders among the 42. The seed's texture clusters
(``clusters/9class_imagenet_val.csv``: ``path,category,cluster1,cluster2,cluster3`` with paths ``<wnid>/<file>``
relative to the val folder) become the int columns cluster1..3 (-1 off the test split)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from rwray.data.imagesources.common import carve_per_class, image_files, need_dir, need_file, subfolders
from rwray.data.listing import FileListing, FileSplit, raise_all
from rwray.registry import Params

# The seed's super-class names (its CSV's `category` column says "monkey" for the primates).
CLASSES = ["dog", "cat", "frog", "turtle", "bird", "monkey", "fish", "crab", "insect"]
RANGES = [(151, 254), (281, 285), (30, 32), (33, 37), (89, 97), (372, 378), (393, 397), (118, 121), (306, 310)]
KEEP = {0: {151, 207, 234, 235, 254}, 4: {89, 90, 94, 96, 97}, 5: {372, 373, 374, 375, 378}}  # ImageNet-A overlap
CLUSTERS = ("cluster1", "cluster2", "cluster3")


def super_class_of_index() -> dict[int, int]:
    """Sorted-wnid index -> super-class: 42 indices (inclusive ranges, three of them restricted)."""
    out = {}
    for label, (lo, hi) in enumerate(RANGES):
        out.update({i: label for i in range(lo, hi + 1) if i in KEEP.get(label, {i})})
    return out


class ImageNet9Params(Params):
    name: Literal["imagenet9"] = "imagenet9"
    root: Path = Field(description="ImageNet folder with train/<wnid>/ (all 1000) and val/<wnid>/")
    imagenet_a_root: Path | None = Field(None, description="ImageNet-A folder (<wnid>/ sub-folders): an extra split")
    clusters_csv: Path | None = Field(None, description="the seed's clusters/9class_imagenet_val.csv")
    val_per_class: int = Field(50, ge=1, description="train images per super-class moved to the val split")
    seed: int = 0


def read_clusters(path: Path, problems: list[str]) -> dict[tuple[str, str], tuple[str, list[int]]]:
    """(wnid, file) -> (category, [c1, c2, c3]): keyed on the path's last two parts, so ``n0…/x.JPEG``,
    ``val/n0…/x.JPEG`` and absolute paths all match (the seed's row order is filesystem order: never use it)."""
    out: dict[tuple[str, str], tuple[str, list[int]]] = {}
    if not need_file(path, "clusters csv", problems):
        return out
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        want = {"path", "category", *CLUSTERS}
        if not want <= set(reader.fieldnames or ()):
            problems.append(f"{path.name}:1: expected the columns {sorted(want)}, got {reader.fieldnames}")
            return out
        for row in reader:
            parts = (row["path"] or "").replace("\\", "/").split("/")
            try:
                if len(parts) < 2:
                    raise ValueError
                out[(parts[-2], parts[-1])] = (row["category"], [int(row[c]) for c in CLUSTERS])
            except (TypeError, ValueError):
                problems.append(f"{path.name}:{reader.line_num}: expected \"<wnid>/<file>,category,c1,c2,c3\", "
                                f"got {row}")
    return out


def _folder_split(folder: Path, wnids: list[str], label_of: dict[str, int], problems: list[str], must: bool):
    files, labels = [], []
    for w in wnids:
        d = folder / w
        if not d.is_dir():
            if must:
                problems.append(f"{d}: folder of {CLASSES[label_of[w]]} wnid {w} does not exist")
            continue
        names = image_files(str(d))
        if not names and must:
            problems.append(f"{d}: holds no image files")
        files += [str(d / n) for n in names]
        labels += [label_of[w]] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def build_imagenet9(p: ImageNet9Params) -> FileListing:
    root = Path(os.path.abspath(p.root))
    problems: list[str] = []
    if not (need_dir(root / "train", "ImageNet train folder", problems)
            & need_dir(root / "val", "ImageNet val folder (in wnid class folders)", problems)):
        raise_all(f"imagenet9 at {root}", problems)
    all_wnids = subfolders(str(root / "train"))
    if len(all_wnids) != 1000:  # the ranges index the 1000 sorted wnids: any other count shifts every class
        raise_all(f"imagenet9 at {root}", [f"{root / 'train'}: {len(all_wnids)} class folders, expected ImageNet's "
                                           "1000 (the super-classes are index ranges into them)"])
    label_of = {all_wnids[i]: c for i, c in super_class_of_index().items()}
    wnids = sorted(label_of)
    train_files, train_labels = _folder_split(root / "train", wnids, label_of, problems, must=True)
    test_files, test_labels = _folder_split(root / "val", wnids, label_of, problems, must=True)
    for c, name in enumerate(CLASSES):
        if (n := int((train_labels == c).sum())) <= p.val_per_class:
            problems.append(f"{name}: {n} train images, val_per_class={p.val_per_class} would leave none")
    extra = {}
    if p.imagenet_a_root is not None:
        a_root = Path(os.path.abspath(p.imagenet_a_root))
        if need_dir(a_root, "ImageNet-A folder", problems):
            extra["imagenet_a"] = _folder_split(a_root, wnids, label_of, problems, must=False)
            if not extra["imagenet_a"][0]:
                problems.append(f"{a_root}: no folder of the 42 wnids holds images")
    notes = [f"val: {p.val_per_class} ImageNet train images per super-class (seed {p.seed}); test: ImageNet val"]
    test_clusters = None
    if p.clusters_csv is not None:
        table = read_clusters(Path(os.path.abspath(p.clusters_csv)), problems)
        rows = [table.get((os.path.basename(os.path.dirname(f)), os.path.basename(f))) for f in test_files]
        for f, y, row in zip(test_files, test_labels, rows):
            if row is not None and row[0] != CLASSES[y]:  # a shifted wnid order shows up here
                problems.append(f"{Path(p.clusters_csv).name}: {f} is {row[0]} there, {CLASSES[y]} here")
        test_clusters = np.array([r[1] if r else [-1, -1, -1] for r in rows], dtype=np.int64).reshape(-1, 3)
        if missing := sum(r is None for r in rows):
            notes.append(f"clusters: {missing} of {len(rows)} test images have no row in the csv (cluster -1)")
    if problems:
        raise_all(f"imagenet9 at {root}", problems)
    is_val = carve_per_class(train_labels, p.val_per_class, 1, p.seed)
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def split(files, labels, clusters=None):
        cols = {} if test_clusters is None else {
            c: (clusters[:, i] if clusters is not None else np.full(len(files), -1)) for i, c in enumerate(CLUSTERS)}
        return FileSplit(files, labels, columns=cols)

    splits = {"train": split([train_files[i] for i in train_idx], train_labels[train_idx]),
              "val": split([train_files[i] for i in val_idx], train_labels[val_idx]),
              "test": split(test_files, test_labels, test_clusters),
              **{k: split(*v) for k, v in extra.items()}}
    return FileListing(list(CLASSES), splits, notes=notes)
