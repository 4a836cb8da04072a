"""What a file-based source produces: image files and their labels per split, before any image is read.

A `FileListing` is the contract between the readers of the datasets' on-disk formats (`rwray.data.imagesources`:
one folder per class, OLTR list files, iNaturalist JSON, Clothing1M key lists, WILDS CSV) and the image-shard
writer (`rwray.data.imagewrite`), which reads, checks and (optionally) resizes the files in parallel and writes
JPEG-bytes Parquet shards. Readers check what they can without opening an image (missing files, labels out of
range, malformed lines) and report every problem at once, with the file and line.

A leaf apart from `rwray.errors`: numpy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from rwray.errors import DataError

# Every listing has these; a reader may add further evaluation splits (ImageNet-A, WILDS id_val / id_test, ...).
REQUIRED_SPLITS = ("train", "val", "test")
RESERVED = ("image", "label", "index")
MAX_PROBLEMS_SHOWN = 50


@dataclass
class FileSplit:
    files: list[str]  # [n] absolute paths of image files (JPEG, PNG: anything PIL opens)
    labels: np.ndarray  # [n] int64 in [0, num_classes)
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n] int64 (-1: unknown for this sample)
    index: np.ndarray | None = None  # [n] int64 stable ids, unique in the split; None: 0..n-1 in listing order

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.index is None:
            self.index = np.arange(len(self.files), dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        self.columns = {k: np.asarray(v, dtype=np.int64) for k, v in self.columns.items()}

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class FileListing:
    classes: list[str]  # class names; labels index this list
    splits: dict[str, FileSplit]  # train, val, test first, then any extra evaluation splits
    # Per-channel mean / std in [0, 1] to normalise with (a dataset's published ones, e.g. iNaturalist's); None: the
    # writer measures them on the train split.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)  # deviations a user should know (printed by `data prepare`)

    def __post_init__(self) -> None:
        problems = listing_problems(self)
        if problems:
            raise_all("the listing is malformed", problems)


def listing_problems(listing: FileListing) -> list[str]:
    """Shape problems of a listing (a reader's bug or bad parameters), all of them."""
    out = []
    missing = [s for s in REQUIRED_SPLITS if s not in listing.splits]
    if missing:
        out.append(f"splits {missing} are missing (every listing has {list(REQUIRED_SPLITS)})")
    k = len(listing.classes)
    names = None
    for name, s in listing.splits.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            out.append(f"split name {name!r} must match [a-z][a-z0-9_]*")
        n = len(s.files)
        if s.labels.shape != (n,) or s.index.shape != (n,):
            out.append(f"{name}: {n} files, labels {s.labels.shape}, index {s.index.shape}")
            continue
        if n and (s.labels.min() < 0 or s.labels.max() >= k):
            out.append(f"{name}: labels span [{s.labels.min()}, {s.labels.max()}], outside [0, {k})")
        if np.unique(s.index).size != n:
            out.append(f"{name}: index ids are not unique")
        cols = sorted(s.columns)
        if names is None:
            names = cols
        elif cols != names:
            out.append(f"{name} has extra columns {cols}, another split has {names}: all splits need the same")
        for c, v in s.columns.items():
            if c in RESERVED:
                out.append(f"extra column name {c!r} is reserved ({', '.join(RESERVED)})")
            if v.shape != (n,):
                out.append(f"{name} column {c!r} has shape {v.shape}, expected ({n},)")
            elif c == "clean_label" and n and (v.min() < -1 or v.max() >= k):  # `verify` checks it: -1 is "unknown"
                out.append(f"{name}: clean_label spans [{v.min()}, {v.max()}], outside [-1, {k})")
    return out


def raise_all(what: str, problems: list[str]) -> None:
    """One DataError naming every problem (the first MAX_PROBLEMS_SHOWN, then a count)."""
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DataError(f"{what}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  "
                    + "\n  ".join(shown) + more)
