"""Clothing1M (Xiao et al. 2015) as distributed: ``noisy_label_kv.txt`` / ``clean_label_kv.txt`` (``images/0/00/x.jpg
label``), the key lists ``noisy_train_key_list.txt`` and ``clean_{train,val,test}_key_list.txt`` (one relpath per
line), optionally ``category_names_eng.txt``; images relative to root. 14 classes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from rwray.data.imagesources.common import FileIndex, by_line, label_problem, need_dir, read_keys, read_pairs
from rwray.data.listing import FileListing, FileSplit, raise_all
from rwray.registry import Params

NUM_CLASSES = 14


class Clothing1MParams(Params):
    name: Literal["clothing1m"] = "clothing1m"
    root: Path = Field(description="folder holding the label kv files, the key lists and images/")
    train: Literal["noisy", "clean"] = Field("noisy", description="noisy: the 1M noisy_train keys with noisy labels; "
                                                                  "clean: the 47,570 clean_train keys, clean labels")


def read_kv(path: Path, problems: list[str]) -> dict[str, int] | None:
    """relpath -> label of a kv file; labels out of range and keys labelled twice differently are problems."""
    mine: list[str] = []
    pairs = read_pairs(path, mine)
    out: dict[str, int] = {}
    for lineno, key, label in pairs or ():
        if (bad := label_problem(label, NUM_CLASSES)) is not None:
            mine.append(f"{path.name}:{lineno}: {bad}")
        if out.get(key, label) != label:
            mine.append(f"{path.name}:{lineno}: {key} labelled {label}, and {out[key]} on an earlier line")
        out[key] = label
    problems += by_line(mine)
    return None if pairs is None else out


def keyed_split(root: Path, keys_file: str, kv: dict[str, int] | None, kv_name: str, index: FileIndex,
                problems: list[str]) -> tuple[list[str], list[int], list[str]] | None:
    """Files, labels and keys of one key list, each key labelled by ``kv``; a key the kv file lacks is a problem."""
    keys = read_keys(root / keys_file, problems)
    if keys is None:
        return None
    files, labels = [], []
    for lineno, key in keys:
        full = os.path.abspath(os.path.join(root, key))
        if not index.exists(full):
            problems.append(f"{keys_file}:{lineno}: file {key} does not exist")
        if kv is not None and key not in kv:
            problems.append(f"{keys_file}:{lineno}: key {key} has no label in {kv_name}")
        files.append(full)
        labels.append(kv.get(key, -1) if kv is not None else -1)
    if not keys:
        problems.append(f"{keys_file}: holds no keys")
    return files, labels, [key for _, key in keys]


def build_clothing1m(p: Clothing1MParams) -> FileListing:
    """train: the noisy (or clean) train keys; val / test: the clean val / test keys with clean labels. The int column
    ``clean_label`` is the clean label where clean_label_kv.txt has one, else -1 (most noisy train images)."""
    root = Path(os.path.abspath(p.root))
    problems: list[str] = []
    if not need_dir(root, "Clothing1M root", problems):
        raise_all("clothing1m", problems)
    noisy = read_kv(root / "noisy_label_kv.txt", problems) if p.train == "noisy" else {}
    clean = read_kv(root / "clean_label_kv.txt", problems)
    index = FileIndex()
    train_kv, train_kv_name = (noisy, "noisy_label_kv.txt") if p.train == "noisy" else (clean, "clean_label_kv.txt")
    parts = {"train": keyed_split(root, f"{p.train}_train_key_list.txt", train_kv, train_kv_name, index, problems),
             "val": keyed_split(root, "clean_val_key_list.txt", clean, "clean_label_kv.txt", index, problems),
             "test": keyed_split(root, "clean_test_key_list.txt", clean, "clean_label_kv.txt", index, problems)}
    classes = [str(c) for c in range(NUM_CLASSES)]
    names_file = root / "category_names_eng.txt"
    if names_file.is_file():
        names = [ln.strip() for ln in names_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != NUM_CLASSES:
            problems.append(f"{names_file.name}: {len(names)} names, expected {NUM_CLASSES}")
        classes = names
    if problems:
        raise_all(f"clothing1m at {root}", problems)
    splits = {}
    for split, (files, labels, keys) in parts.items():
        # The clean label of each sample by its key as written: -1 where only the noisy label is known.
        truth = [clean.get(k, -1) for k in keys] if split == "train" else labels
        splits[split] = FileSplit(files, labels, columns={"clean_label": truth})
    return FileListing(classes, splits)
