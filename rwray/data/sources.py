"""Raw data sources: each turns its parameters into a `RawData` (uint8 images + labels, train pool and test set).

Registered in `SOURCES`; the shard builder (`rwray.data.write.prepare`) does everything after this point
(validation split, long tail, label noise, Parquet), so a new source only has to produce arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, NamedTuple

import numpy as np
from pydantic import Field

from rwray.data import biased, cifar, mnist
from rwray.data.imagesources import FILE_SOURCES
from rwray.data.listing import FileListing
from rwray.data.manifest import BASE_COLUMNS, SPLITS
from rwray.errors import DataError
from rwray.registry import Params, Registry


class ExtraSplit(NamedTuple):
    """An additional evaluation set (e.g. an unbiased test set): written as its own split, evaluated by the loop."""

    images: np.ndarray  # [n, C, H, W] uint8
    labels: np.ndarray  # [n] int64
    columns: dict[str, np.ndarray]  # name -> [n] int64, the same names as the other splits' extra columns


RESERVED_COLUMNS = (*BASE_COLUMNS, "clean_label")  # base columns, and the label-noise column


@dataclass
class RawData:
    train_images: np.ndarray  # [N, C, H, W] uint8: the train pool (validation is carved out of it later)
    train_labels: np.ndarray  # [N] int64 in [0, len(classes))
    test_images: np.ndarray  # [M, C, H, W] uint8
    test_labels: np.ndarray  # [M] int64
    classes: list[str]
    # Optional per-sample int64 columns (e.g. "bias": a colour index), aligned with the train pool and the test set;
    # val inherits the train pool's. Every split carries the same column names (one shard schema).
    extra_train_columns: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N]
    extra_test_columns: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [M]
    # Further test sets, written as splits of their own name next to train/val/test.
    extra_test_splits: dict[str, ExtraSplit] = field(default_factory=dict)
    # How the val split draws its images from the train pool: indices [n] -> (images [n, C, H, W] uint8, extra
    # columns {name: [n]}). None: as the pool holds them. Biased MNIST's unbiased validation recolours them here.
    val_view: Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]] | None = None

    def __post_init__(self) -> None:
        # Every source goes through here, so a malformed source fails with a clear message before anything is written.
        self.extra_test_splits = {k: ExtraSplit(*v) for k, v in self.extra_test_splits.items()}  # plain tuples too
        splits = [("train", self.train_images, self.train_labels, self.extra_train_columns),
                  ("test", self.test_images, self.test_labels, self.extra_test_columns)]
        splits += [(name, *extra) for name, extra in self.extra_test_splits.items()]
        names = sorted(self.extra_train_columns)
        for split, x, y, columns in splits:
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{split} images must be uint8 [N, C, H, W], got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],):
                raise DataError(f"{split}: {y.shape} labels for {x.shape[0]} images")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise DataError(f"{split} labels span [{y.min()}, {y.max()}], outside [0, {len(self.classes)})")
            if x.shape[1:] != self.train_images.shape[1:]:
                raise DataError(f"train images {self.train_images.shape[1:]} and {split} images {x.shape[1:]} differ")
            if sorted(columns) != names:
                raise DataError(f"{split} has extra columns {sorted(columns)}, train has {names}: all splits need the same")
            for name, v in columns.items():
                if name in RESERVED_COLUMNS:
                    raise DataError(f"extra column name {name!r} is reserved ({', '.join(RESERVED_COLUMNS)})")
                if v.shape != (x.shape[0],) or not np.issubdtype(v.dtype, np.integer):
                    raise DataError(f"{split} column {name!r} must be [{x.shape[0]}] integers, got {v.dtype} {v.shape}")
        for name in self.extra_test_splits:
            if name in SPLITS or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise DataError(f"extra split name {name!r} must match [a-z][a-z0-9_]* and not be train, val or test")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)


SOURCES: Registry[RawData | FileListing] = Registry("data source")


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


# ------------------------------------------------------------------------------------------------- colour-biased


Rho = Annotated[float, Field(ge=0.0, le=1.0)]


class BiasedMnistParams(Params):
    name: Literal["biased-mnist"] = "biased-mnist"
    root: Path = Field(description="folder with the four MNIST IDX files (.gz or not), or torchvision's MNIST/raw")
    download: bool = Field(False, description="fetch the MNIST files into root/MNIST/raw if missing (torchvision)")
    rho: Rho = Field(0.99, description="train (and val) share of each class drawn on its own colour; paper: "
                                       "0.99, 0.995, 0.997, 0.999")
    unbiased_rho: Rho = Field(0.1, description="rho of the test_unbiased split (0.1: colour independent of class)")
    val_rho: Rho | None = Field(None, description="rho of the val split carved from the train pool (None: train's; "
                                                  "0.1: the unbiased test construction, for selection on unbiased "
                                                  "accuracy)")
    seed: int = 0


class BiasedDigitsParams(Params):
    name: Literal["biased-digits"] = "biased-digits"
    rho: Rho = 0.99
    unbiased_rho: Rho = 0.1
    val_rho: Rho | None = None  # as for biased-mnist
    test_per_class: int = Field(50, ge=1, description="held-out test images per class, as for `digits`")
    seed: int = 0


def _biased_raw(train_gray: np.ndarray, train_y: np.ndarray, test_gray: np.ndarray, test_y: np.ndarray,
                p: BiasedMnistParams | BiasedDigitsParams) -> RawData:
    sets = biased.biased_sets(train_gray, train_y, test_gray, test_y, p.rho, p.unbiased_rho, p.seed)
    (tr_x, tr_y, tr_c), (te_x, te_y, te_c) = sets["train"], sets["test"]
    un_x, un_y, un_c = sets["test_unbiased"]
    val_view = None
    if p.val_rho is not None:
        def val_view(idx: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            """The val images (train-pool indices [n]) coloured afresh at val_rho, from their own random stream."""
            x, c = biased.recolour(train_gray[idx], train_y[idx], p.val_rho, p.seed)
            return x, {"bias": c}
    return RawData(tr_x, tr_y, te_x, te_y, [str(c) for c in range(10)],
                   extra_train_columns={"bias": tr_c}, extra_test_columns={"bias": te_c},
                   extra_test_splits={"test_unbiased": ExtraSplit(un_x, un_y, {"bias": un_c})}, val_view=val_view)


def build_biased_mnist(p: BiasedMnistParams) -> RawData:
    """Biased MNIST: train pool = MNIST train at rho (val is carved from it, so it is biased like train); test = the
    10k test images at rho = 1; test_unbiased = the same images at unbiased_rho. Column `bias` = colour index."""
    a = mnist.read_mnist(p.root, download_missing=p.download)
    return _biased_raw(a.train_images, a.train_labels, a.test_images, a.test_labels, p)


def build_biased_digits(p: BiasedDigitsParams) -> RawData:
    """Biased MNIST's construction on scikit-learn's 8x8 digits (no download): a CPU-sized version of the benchmark."""
    d = build_digits(DigitsParams(test_per_class=p.test_per_class, seed=p.seed))
    return _biased_raw(d.train_images[:, 0], d.train_labels, d.test_images[:, 0], d.test_labels, p)


SOURCES.add("biased-mnist", BiasedMnistParams, build_biased_mnist,
            "colour-biased MNIST (ReBias): IDX files, rho, test_unbiased split")
SOURCES.add("biased-digits", BiasedDigitsParams, build_biased_digits,
            "colour-biased 8x8 digits (no download), test_unbiased split")


# ------------------------------------------------------------------------------------------------ image files

# Large datasets of image files (ImageNet-LT, iNaturalist, ...): their builders return a `FileListing`, which
# `rwray.data.write.prepare` hands to the image-shard writer (JPEG bytes, streamed by the workers).
for _name, _params, _build, _doc in FILE_SOURCES:
    SOURCES.add(_name, _params, _build, _doc)
