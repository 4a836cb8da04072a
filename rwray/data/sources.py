"""Raw data sources: each turns its parameters into a `RawData` (uint8 images + labels, train pool and test set).

Registered in `SOURCES`; the shard builder (`rwray.data.shards.prepare`) does everything after this point
(validation split, long tail, label noise, Parquet), so a new source only has to produce arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from rwray.data import DataError, cifar
from rwray.registry import Params, Registry, union_of


@dataclass
class RawData:
    train_images: np.ndarray  # [N, C, H, W] uint8: the train pool (validation is carved out of it later)
    train_labels: np.ndarray  # [N] int64 in [0, len(classes))
    test_images: np.ndarray  # [M, C, H, W] uint8
    test_labels: np.ndarray  # [M] int64
    classes: list[str]

    def __post_init__(self) -> None:
        # Every source goes through here, so a malformed source fails with a clear message before anything is written.
        splits = (("train", self.train_images, self.train_labels), ("test", self.test_images, self.test_labels))
        for split, x, y in splits:
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{split} images must be uint8 [N, C, H, W], got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],):
                raise DataError(f"{split}: {y.shape} labels for {x.shape[0]} images")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise DataError(f"{split} labels span [{y.min()}, {y.max()}], outside [0, {len(self.classes)})")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"train images {self.train_images.shape[1:]} and test images {self.test_images.shape[1:]} differ"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)


SOURCES: Registry[RawData] = Registry("data source")


# ------------------------------------------------------------------------------------------------------------ digits


class DigitsParams(Params):
    name: Literal["digits"] = "digits"
    test_per_class: int = Field(50, ge=1, description="held-out test images per class (digits has no official split)")
    seed: int = 0


def build_digits(p: DigitsParams) -> RawData:
    """scikit-learn's shipped 8x8 digits (1797 images, no download): a real dataset small enough for CPU tests."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # [1797, 8, 8] integer-valued floats 0..16 -> uint8 0..255 as round(v * 255 / 16). The only tie is v = 8 (127.5),
    # which np.rint and Python's round() both send to 128 (half to even).
    images = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = d.target.astype(np.int64)  # [1797]
    rng = np.random.default_rng(p.seed)
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        if p.test_per_class >= members.size:
            raise DataError(
                f"digits: test_per_class={p.test_per_class} leaves no training images of class {c} "
                f"(it has {members.size}); choose test_per_class < {members.size}"
            )
        test_idx.append(rng.permutation(members)[: p.test_per_class])
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    # Both splits keep the original order (boolean masks), so positions in the train pool are stable ids.
    return RawData(images[~is_test], labels[~is_test], images[is_test], labels[is_test], [str(c) for c in range(10)])


# ------------------------------------------------------------------------------------------------------------- cifar


class Cifar10Params(Params):
    name: Literal["cifar10"] = "cifar10"
    root: Path = Field(description="directory holding cifar-10-batches-py/ (torchvision's extracted layout)")
    download: bool = Field(False, description="fetch the official archive into root if files are missing")


class Cifar100Params(Params):
    name: Literal["cifar100"] = "cifar100"
    root: Path = Field(description="directory holding cifar-100-python/ (torchvision's extracted layout)")
    download: bool = Field(False, description="fetch the official archive into root if files are missing")


def build_cifar(p: Cifar10Params | Cifar100Params) -> RawData:
    arrays = cifar.read_cifar(p.root, p.name, download_missing=p.download)
    return RawData(*arrays)


# --------------------------------------------------------------------------------------------------------- synthetic


PosInt = Annotated[int, Field(ge=1)]


class SyntheticParams(Params):
    name: Literal["synthetic"] = "synthetic"
    num_classes: int = Field(10, ge=2)
    image_shape: tuple[PosInt, PosInt, PosInt] = (3, 32, 32)  # (C, H, W)
    train_per_class: int = Field(500, ge=1)
    test_per_class: int = Field(100, ge=1)
    seed: int = 0


# Prototype resolution before nearest-neighbour upsampling: coarse blobs a small CNN learns in a few epochs but which
# per-pixel noise of the same magnitude hides from any single pixel.
_PROTO_GRID = 4
_PROTO_AMPLITUDE = 48.0  # grey levels around mid-grey 128
_NOISE_STD = 48.0


def build_synthetic(p: SyntheticParams) -> RawData:
    """Seeded class prototypes (coarse random patterns) + i.i.d. Gaussian pixel noise, clipped to uint8."""
    c_img, h, w = p.image_shape
    k = p.num_classes
    rng = np.random.default_rng(p.seed)
    coarse = rng.uniform(-1.0, 1.0, size=(k, c_img, _PROTO_GRID, _PROTO_GRID))  # [K, C, 4, 4]
    rows = np.arange(h) * _PROTO_GRID // h  # [H] coarse row of each pixel row
    cols = np.arange(w) * _PROTO_GRID // w  # [W]
    protos = (128.0 + _PROTO_AMPLITUDE * coarse[:, :, rows][:, :, :, cols]).astype(np.float32)  # [K, C, H, W]

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        # Shuffled label order so the pool is not sorted by class (ids are positions; order should carry no signal).
        labels = rng.permutation(np.repeat(np.arange(k, dtype=np.int64), per_class))  # [n]
        noise = rng.standard_normal(size=(labels.size, c_img, h, w), dtype=np.float32) * _NOISE_STD
        images = np.clip(np.rint(protos[labels] + noise), 0, 255).astype(np.uint8)  # [n, C, H, W]
        return images, labels

    train_x, train_y = draw(p.train_per_class)
    test_x, test_y = draw(p.test_per_class)
    return RawData(train_x, train_y, test_x, test_y, [f"class_{c}" for c in range(k)])


SOURCES.add("digits", DigitsParams, build_digits, "scikit-learn 8x8 digits (ships with scikit-learn, no download)")
SOURCES.add("cifar10", Cifar10Params, build_cifar, "CIFAR-10 from torchvision's extracted on-disk layout")
SOURCES.add("cifar100", Cifar100Params, build_cifar, "CIFAR-100 (fine labels) from torchvision's on-disk layout")
SOURCES.add("synthetic", SyntheticParams, build_synthetic, "seeded learnable patterns + noise, any image shape")

SourceConfig = union_of(SOURCES)
