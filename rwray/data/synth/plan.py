"""What a synthetic dataset is before any file exists: the images to render (relative path, signature class, size),
the text files around them (lists, JSON, CSV), and what `synthesize` reports back. Each format module turns
`Args` into a `Plan`; `rwray.data.synth.run` writes it."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rwray.data.synth.images import geometry


@dataclass(frozen=True)
class Args:
    """A synth request, validated (rwray.data.synth.run.check_args)."""

    scale: float = 1.0
    size: int = 32  # shorter side of every image, pixels
    classes: int | None = None  # None: the published class count
    seed: int = 0


@dataclass
class Plan:
    files: list[str] = field(default_factory=list)  # [N] image paths relative to the output folder
    texts: dict[str, str] = field(default_factory=dict)  # relative path -> contents (lists, JSON, CSV)
    dirs: list[str] = field(default_factory=list)  # relative folders that must exist even when empty
    source: dict = field(default_factory=dict)  # the data.source block; paths relative to the output folder
    splits: dict[str, int] = field(default_factory=dict)  # images per split, in the dataset's own split names
    train_counts: list[int] = field(default_factory=list)  # [K] train images per label, as the reader labels them
    num_classes: int = 0
    notes: list[str] = field(default_factory=list)
    _labels: list[np.ndarray] = field(default_factory=list)  # parts of [N] int64: each image's signature class
    _sizes: list[np.ndarray] = field(default_factory=list)  # parts of [N, 2] (width, height)

    def add(self, files: list[str], labels: np.ndarray, sizes: np.ndarray) -> None:
        self.files += files
        self._labels.append(np.asarray(labels, dtype=np.int64))
        self._sizes.append(np.asarray(sizes, dtype=np.int64).reshape(-1, 2))

    def label_array(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)

    def size_array(self) -> np.ndarray:
        return np.concatenate(self._sizes) if self._sizes else np.zeros((0, 2), dtype=np.int64)


@dataclass
class Synthesized:
    """What `synthesize` wrote."""

    name: str
    out: str  # the output folder (absolute)
    source: dict  # the data.source block that reads it: {"name": ..., "root": ..., ...} with absolute paths
    splits: dict[str, int]  # images written per split (the dataset's own split names)
    train_counts: list[int]  # [K] train images per label
    num_classes: int
    files: int = 0  # image files written
    bytes: int = 0  # bytes of those image files
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def prepare_command(self, shards: str) -> str:
        """The `rwray data prepare` command line that reads this dataset into a shard directory ``shards``."""
        words = ["rwray", "data", "prepare", self.source["name"], "--root", str(self.source["root"])]
        for k, v in self.source.items():
            if k not in ("name", "root"):
                words += ["-p", f"{k}={v}"]
        return shlex.join([*words, "--out", shards])


@dataclass(frozen=True)
class SynthSpec:
    """One dataset's published shape and its planner."""

    name: str
    title: str
    classes: int  # published class count
    splits: dict[str, int]  # published images per split (the dataset's own split names)
    train_max: int | None  # the published long tail's ends (None: not a long-tailed train split)
    train_min: int | None
    sources: str  # where the figures come from
    plan: Callable[[Args], Plan]
    reclass: bool = True  # whether --classes applies (a reader with a fixed class set: no)


def rng_for(args: Args, what: str) -> np.random.Generator:
    """A generator per purpose, so adding one draw never shifts another's."""
    return np.random.default_rng([args.seed, int.from_bytes(hashlib.sha256(what.encode()).digest()[:4], "little")])


def image_sizes(n: int, args: Args, what: str) -> np.ndarray:
    return geometry(n, args.size, rng_for(args, f"geometry/{what}"))


def wnids(k: int) -> list[str]:
    """ImageNet-style synset ids, sorted like ImageNet's: label c is the c-th sorted wnid (n00000000, n00000001, ...;
    not the real ones, which nothing reads)."""
    return [f"n{c:08d}" for c in range(k)]


def hex_names(n: int, seed: int, what: str, digits: int = 32) -> list[str]:
    """[n] distinct hex names (md5-like, like iNaturalist's) from (seed, what, index)."""
    key = f"{seed}/{what}/".encode()
    return [hashlib.md5(key + str(i).encode()).hexdigest()[:digits] for i in range(n)]


def permuted_counts(sorted_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[K] counts per label: the head-first profile dealt to labels by a seeded permutation (the head is not label 0,
    as in the real lists)."""
    out = np.empty_like(sorted_counts)
    out[rng.permutation(sorted_counts.size)] = sorted_counts
    return out

