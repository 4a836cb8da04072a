"""iNaturalist 2018: COCO-style ``train2018.json`` / ``val2018.json`` under root, images relative to root
(``train_val2018/Plantae/7477/<hash>.jpg``). test = the official val2018 (the set papers report on); val is carved
from train, since the official val is the test set."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from rwray.data.imagesources.common import FileIndex, carve_per_class, need_dir, need_file
from rwray.data.listing import FileListing, FileSplit, raise_all
from rwray.registry import Params

INAT_MEAN = (0.466, 0.471, 0.380)  # iNaturalist's published statistics (as in the LDAM-DRW / ABSGD code)
INAT_STD = (0.195, 0.194, 0.192)


class INat2018Params(Params):
    name: Literal["inat2018"] = "inat2018"
    root: Path = Field(description="folder holding train2018.json, val2018.json and train_val2018/")
    val_per_class: int = Field(1, ge=1, description="train images per class moved to the val split")
    val_min_train: int = Field(20, ge=2, description="only classes with at least this many train images give any")
    seed: int = 0


def read_coco(path: Path, root: str, index: FileIndex, problems: list[str]):
    """(category names by id, files, labels, image ids) of one COCO-style file, or None when it is missing or is
    not JSON. Every image needs exactly one annotation whose category is one of the file's categories."""
    if not need_file(path, "annotation file", problems):
        return None
    name = path.name
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        cats = {int(c["id"]): str(c["name"]) for c in d["categories"]}
        images = [(int(im["id"]), str(im["file_name"])) for im in d["images"]]
        anns = [(int(a["image_id"]), int(a["category_id"])) for a in d["annotations"]]
    except json.JSONDecodeError as e:
        problems.append(f"{name}:{e.lineno}: not valid JSON ({e.msg})")
        return None
    except (KeyError, TypeError, ValueError) as e:  # a missing key or a non-integer id
        problems.append(f"{name}: expected images[{{id, file_name}}], annotations[{{image_id, category_id}}], "
                        f"categories[{{id, name}}] ({type(e).__name__}: {e})")
        return None
    if sorted(cats) != list(range(len(cats))):  # labels are the category ids themselves
        problems.append(f"{name}: category ids are not 0..{len(cats) - 1}")
    label_of: dict[int, int] = {}
    for i, (image_id, cat) in enumerate(anns):
        if not 0 <= cat < len(cats):
            problems.append(f"{name}: annotations[{i}]: category_id {cat} outside [0, {len(cats)})")
        if image_id in label_of:
            problems.append(f"{name}: annotations[{i}]: image {image_id} has a second annotation")
        label_of[image_id] = cat
    files, labels, ids = [], [], []
    for i, (image_id, rel) in enumerate(images):
        full = os.path.abspath(os.path.join(root, rel))
        if not index.exists(full):
            problems.append(f"{name}: images[{i}]: file {rel} does not exist")
        if image_id not in label_of:
            problems.append(f"{name}: images[{i}]: image {image_id} has no annotation")
        files.append(full)
        labels.append(label_of.get(image_id, 0))
        ids.append(image_id)
    if len(set(ids)) != len(ids):
        problems.append(f"{name}: image ids are not unique")
    if unknown := set(label_of) - set(ids):
        problems.append(f"{name}: {len(unknown)} annotations name no image (e.g. image_id {min(unknown)})")
    return cats, files, labels, ids


def build_inat2018(p: INat2018Params) -> FileListing:
    root = Path(os.path.abspath(p.root))
    problems: list[str] = []
    if p.val_min_train <= p.val_per_class:
        problems.append(f"val_min_train ({p.val_min_train}) must exceed val_per_class ({p.val_per_class}): "
                        "a class must keep train images")
    index = FileIndex()
    train = test = None
    if need_dir(root, "iNaturalist root", problems):
        train = read_coco(root / "train2018.json", str(root), index, problems)
        test = read_coco(root / "val2018.json", str(root), index, problems)
    if train and test and train[0] != test[0]:
        problems.append(f"val2018.json has {len(test[0])} categories, train2018.json {len(train[0])}: not the same")
    if problems:
        raise_all(f"inat2018 at {root}", problems)
    cats, files, labels, ids = train
    labels, ids = np.asarray(labels, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    is_val = carve_per_class(labels, p.val_per_class, p.val_min_train, p.seed)
    n_cls = int(np.unique(labels[is_val]).size)
    pick = lambda mask: FileSplit([f for f, m in zip(files, mask) if m], labels[mask], index=ids[mask])  # noqa: E731
    note = (f"val: {int(is_val.sum())} train2018 images carved out of train ({p.val_per_class} per class from the "
            f"{n_cls} classes with >= {p.val_min_train} train images, seed {p.seed}); test is the official val2018 "
            "(what papers report)")
    splits = {"train": pick(~is_val), "val": pick(is_val), "test": FileSplit(test[1], test[2], index=test[3])}
    return FileListing([cats[c] for c in range(len(cats))], splits, INAT_MEAN, INAT_STD, notes=[note])
