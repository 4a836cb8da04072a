"""Shared by the format readers: cached existence checks, folder listings, the `relpath label` list parser and a
seeded per-class carve. Nothing here opens an image (the shard writer decodes them in parallel later).

Every function appends to a caller's ``problems`` list instead of raising, so a reader reports all problems at once
(`rwray.data.listing.raise_all`), each as ``<file>:<line>: <what>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared lower-cased: ImageNet's are .JPEG


class FileIndex:
    """Answers "does this file exist" from one listing per folder: a million `os.stat` calls on a network file
    system take minutes, one `scandir` per folder (1000 for ImageNet) takes seconds."""

    def __init__(self) -> None:
        self._dirs: dict[str, frozenset[str] | None] = {}

    def files_in(self, folder: str) -> frozenset[str] | None:
        """Names of the plain files (symlinks followed) in ``folder``; None when it is not a folder."""
        if folder not in self._dirs:
            try:
                with os.scandir(folder) as it:
                    self._dirs[folder] = frozenset(e.name for e in it if e.is_file())
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                self._dirs[folder] = None
        return self._dirs[folder]

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(os.path.abspath(path))
        names = self.files_in(folder)
        return names is not None and name in names


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_files(folder: str) -> list[str]:
    """Sorted image file names directly in ``folder`` (not recursive: every supported layout is flat per class)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and is_image(e.name))


def subfolders(folder: str) -> list[str]:
    """Sorted names of the sub-folders of ``folder``, hidden ones (.ipynb_checkpoints, ...) left out."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def need_file(path: Path, what: str, problems: list[str]) -> bool:
    """One clear problem for a missing input file (not a traceback later)."""
    if path.is_file():
        return True
    problems.append(f"{path}: {what} does not exist" if not path.exists() else f"{path}: {what} is not a file")
    return False


def need_dir(path: Path, what: str, problems: list[str]) -> bool:
    if path.is_dir():
        return True
    problems.append(f"{path}: {what} does not exist" if not path.exists() else f"{path}: {what} is not a folder")
    return False


def read_pairs(path: Path, problems: list[str]) -> list[tuple[int, str, int]] | None:
    """The ``relpath label`` lines of a list file as (line number, relpath, label); blank lines skipped; syntax
    problems reported per line. None (and one problem) when the file is missing."""
    if not need_file(path, "list file", problems):
        return None
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            parts = raw.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError
                out.append((lineno, parts[0], int(parts[1])))
            except ValueError:
                problems.append(f'{path.name}:{lineno}: expected "relpath label", got {raw.strip()[:80]!r}')
    return out


def read_keys(path: Path, problems: list[str]) -> list[tuple[int, str]] | None:
    """The one-relpath-per-line key lists (Clothing1M) as (line number, relpath)."""
    if not need_file(path, "key list", problems):
        return None
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            parts = raw.split()
            if len(parts) == 1:
                out.append((lineno, parts[0]))
            elif parts:
                problems.append(f'{path.name}:{lineno}: expected one relpath, got {raw.strip()[:80]!r}')
    return out


def by_line(problems: list[str]) -> list[str]:
    """One file's problems in line order (syntax problems are found in a first pass, the rest in a second)."""
    return sorted(problems, key=lambda p: int(m.group(1)) if (m := re.match(r"[^:]*:(\d+):", p)) else 0)


def label_problem(label: int, num_classes: int | None) -> str | None:
    if num_classes is None:
        return f"label {label} is negative" if label < 0 else None
    return None if 0 <= label < num_classes else f"label {label} outside [0, {num_classes})"


def check_pairs(path: Path, pairs: list[tuple[int, str, int]], image_root: str, num_classes: int | None,
                index: FileIndex, problems: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Absolute files, labels and relpaths of parsed list lines; a missing file or a label out of range is a problem
    of that line (num_classes None: only negative labels are)."""
    files, labels, rels = [], [], []
    for lineno, rel, label in pairs:
        full = os.path.abspath(os.path.join(image_root, rel))
        if not index.exists(full):
            problems.append(f"{path.name}:{lineno}: file {rel} does not exist")
        if (bad := label_problem(label, num_classes)) is not None:
            problems.append(f"{path.name}:{lineno}: {bad}")
        files.append(full)
        labels.append(label)
        rels.append(rel)
    if not pairs:
        problems.append(f"{path.name}: holds no samples")
    return files, labels, rels


def names_from_folders(rels: list[str], labels: list[int], num_classes: int) -> list[str]:
    """Class names from the train paths' parent folders (ImageNet wnids, Places scene names) when every class has
    exactly one folder and no two share one; else "0", "1", ... (lists carry no names of their own)."""
    seen: dict[int, set[str]] = {}
    for rel, label in zip(rels, labels):
        seen.setdefault(label, set()).add(os.path.basename(os.path.dirname(rel)))
    names = [next(iter(seen[c])) if len(seen.get(c, ())) == 1 else "" for c in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(c) for c in range(num_classes)]


def carve_per_class(labels: np.ndarray, per_class: int, min_count: int, seed: int) -> np.ndarray:
    """[n] bool: ``per_class`` samples of every class with at least ``min_count`` samples, drawn with
    ``numpy.random.default_rng(seed)`` class by class in label order (the same seed gives the same carve)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if members.size >= min_count:
            out[rng.choice(members, size=per_class, replace=False)] = True
    return out
