"""List-file datasets: any ``relpath label`` lists (`image_list`) and the OLTR long-tail lists of ImageNet-LT and
Places-LT (`imagenet_lt`, `places_lt`: ``ImageNet_LT_{train,val,test}.txt`` as in BalancedMetaSoftmax
``data/ImageNet_LT/``, e.g. ``train/n01440764/n01440764_762.JPEG 0``). All three share one parser
(`common.read_pairs` + `common.check_pairs`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from rwray.data.imagesources.common import (FileIndex, by_line, check_pairs, names_from_folders, need_dir, need_file,
                                            read_pairs)
from rwray.data.listing import REQUIRED_SPLITS, FileListing, FileSplit, raise_all
from rwray.registry import Params


class ImageListParams(Params):
    name: Literal["image_list"] = "image_list"
    root: Path = Field(description="folder the lists' image paths are relative to")
    train_list: Path = Field(description="`relpath label` lines; a relative path is relative to root")
    val_list: Path = Field(description="as train_list")
    test_list: Path = Field(description="as train_list")
    num_classes: int | None = Field(None, ge=1, description="default: the largest label + 1 (or the classes_file's)")
    classes_file: Path | None = Field(None, description="one class name per line (relative: to root)")


class ImageNetLTParams(Params):
    name: Literal["imagenet_lt"] = "imagenet_lt"
    root: Path = Field(description="folder holding ImageNet_LT_{train,val,test}.txt")
    image_root: Path | None = Field(None, description="the ImageNet folder the lists' paths are relative to "
                                                      "(default: root)")
    num_classes: int = Field(1000, ge=1)


class PlacesLTParams(Params):
    name: Literal["places_lt"] = "places_lt"
    root: Path = Field(description="folder holding Places_LT_{train,val,test}.txt")
    image_root: Path | None = Field(None, description="the Places-365 folder the lists' paths are relative to "
                                                      "(default: root)")
    num_classes: int = Field(365, ge=1)


def read_lists(lists: dict[str, Path], image_root: str, num_classes: int | None, problems: list[str]):
    """{split: (files, labels, relpaths)} of the list files that exist; every problem of every list appended."""
    index, out = FileIndex(), {}
    for split, path in lists.items():
        mine: list[str] = []
        pairs = read_pairs(path, mine)
        if pairs is not None:
            out[split] = check_pairs(path, pairs, image_root, num_classes, index, mine)
        problems += by_line(mine)
    return out


def _listing(read: dict, classes: list[str], notes: list[str] | None = None) -> FileListing:
    return FileListing(classes, {s: FileSplit(read[s][0], read[s][1]) for s in REQUIRED_SPLITS}, notes=notes or [])


def build_image_list(p: ImageListParams) -> FileListing:
    """Three ``relpath label`` list files; images relative to root."""
    root = Path(os.path.abspath(p.root))
    problems: list[str] = []
    need_dir(root, "image root", problems)
    names = None
    if p.classes_file is not None:
        cf = root / p.classes_file
        if need_file(cf, "classes file", problems):
            names = [ln.strip() for ln in cf.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if p.num_classes is not None and p.num_classes != len(names):
                problems.append(f"{cf.name}: {len(names)} class names, but num_classes={p.num_classes}")
    k = p.num_classes if p.num_classes is not None else (len(names) if names is not None else None)
    lists = {"train": p.train_list, "val": p.val_list, "test": p.test_list}
    read = read_lists({s: root / f for s, f in lists.items()}, str(root), k, problems)
    if problems:
        raise_all(f"image_list at {root}", problems)
    if k is None:  # no count given: the largest label of any split decides
        k = 1 + max(max(r[1], default=-1) for r in read.values())
    classes = names if names is not None else names_from_folders(read["train"][2], read["train"][1], k)
    return _listing(read, classes)


def _build_oltr(root: Path, image_root: Path | None, num_classes: int, prefix: str, what: str) -> FileListing:
    root = Path(os.path.abspath(root))
    images = Path(os.path.abspath(image_root)) if image_root is not None else root
    problems: list[str] = []
    if need_dir(root, f"{what} list folder", problems) and images != root:
        need_dir(images, f"{what} image root", problems)
    read = read_lists({s: root / f"{prefix}_{s}.txt" for s in REQUIRED_SPLITS}, str(images), num_classes, problems)
    if problems:
        raise_all(f"{what} at {root}", problems)
    return _listing(read, names_from_folders(read["train"][2], read["train"][1], num_classes))


def build_imagenet_lt(p: ImageNetLTParams) -> FileListing:
    """ImageNet-LT (Liu et al. 2019, OLTR): 115,846 / 20,000 / 50,000 images of 1,000 classes."""
    return _build_oltr(p.root, p.image_root, p.num_classes, "ImageNet_LT", "imagenet_lt")


def build_places_lt(p: PlacesLTParams) -> FileListing:
    """Places-LT (OLTR): 62,500 / 7,300 / 36,500 images of 365 classes."""
    return _build_oltr(p.root, p.image_root, p.num_classes, "Places_LT", "places_lt")
