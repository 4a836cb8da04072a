"""Split building, before anything touches disk: RawData -> balanced validation split carved from the train pool
(first, so it does not depend on the imbalance) -> long tail on the rest -> optional label noise on train.

`BuilderParams` are the knobs (the `data.builder` section of a job); `build_splits` is a pure function of
(raw, params). `rwray.data.write.prepare` writes its result as shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import Field, model_validator

from rwray.data.checks import class_count_problems
from rwray.data.longtail import ImbalanceKind, longtail_counts, select_per_class
from rwray.data.noise import NoiseKind, corrupt_labels
from rwray.data.sources import RawData
from rwray.errors import DataError
from rwray.registry import Params
from rwray.text import plural, some


class BuilderParams(Params):
    imbalance: ImbalanceKind = "none"
    factor: float = Field(1.0, ge=1, description="imbalance factor n_max / n_min")
    val_per_class: int = Field(20, ge=0, description="balanced validation images per class, taken from the train pool")
    seed: int = 0
    label_noise: NoiseKind | None = None
    noise_rate: float = Field(0.0, ge=0, lt=1)
    rows_per_shard: int = Field(10000, ge=1)
    # Image-file sources only (rwray.data.imagewrite): rows per Parquet row group (the streaming unit of IO and of
    # the epoch plan), the shorter side images are resized to at prepare time (None: stored as they are), and the
    # processes that read and check them (None: one per CPU).
    rows_per_group: int = Field(256, ge=1)
    resize: int | None = Field(None, ge=8)
    workers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _rate_needs_kind(self) -> "BuilderParams":
        # A rate without a kind would silently train on clean labels; refuse instead.
        if self.noise_rate > 0 and self.label_noise is None:
            raise ValueError("noise_rate > 0 needs label_noise ('symmetric' or 'asymmetric')")
        return self


@dataclass
class Split:
    images: np.ndarray  # [n, C, H, W] uint8
    labels: np.ndarray  # [n] int64 (noisy for a noisy train split)
    index: np.ndarray  # [n] int64 stable ids
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [n] int64


def build_splits(raw: RawData, b: BuilderParams) -> dict[str, Split]:
    """train, val, test (and the source's extra test sets) as arrays, before anything touches disk. Pure function of
    (raw, b)."""
    num_classes = len(raw.classes)
    y = raw.train_labels  # [N]
    # Independent streams per stage: changing the noise settings must not change which images are selected, and
    # changing the imbalance must not change the validation set.
    val_rng, lt_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(b.seed).spawn(3))

    available = np.bincount(y, minlength=num_classes)  # [C]
    # Refused with `verify`'s own words (one rule: checks.class_count_problems), before any shard is written.
    if problems := class_count_problems(available, raw.classes, num_classes):
        raise DataError(f"the source's train pool: {'; '.join(problems)}")
    short = [c for c in range(num_classes) if available[c] <= b.val_per_class]
    if short:
        raise DataError(
            f"val_per_class={b.val_per_class} leaves no training images for {plural(len(short), 'class', 'classes')} "
            f"({some(f'{raw.classes[c]}: {int(available[c])} in the train pool' for c in short)}); lower "
            f"val_per_class below {int(available.min())}, the smallest class's count"
        )
    val_idx = select_per_class(y, [b.val_per_class] * num_classes, val_rng)  # [C * val_per_class] sorted
    rest = np.setdiff1d(np.arange(y.size, dtype=np.int64), val_idx)  # [N - |val|] sorted

    if b.imbalance == "none":
        train_idx = rest  # no imbalance requested: keep the whole remaining pool, even if it is slightly uneven
    else:
        n_max = rest.size // num_classes
        counts = longtail_counts(n_max, num_classes, b.imbalance, b.factor)
        train_idx = rest[select_per_class(y[rest], counts, lt_rng)]  # sorted, since rest is sorted

    def take(images: np.ndarray, labels: np.ndarray, columns: dict[str, np.ndarray], idx: np.ndarray) -> Split:
        extras = {k: v[idx].astype(np.int64) for k, v in columns.items()}  # the source's extra columns, if any
        return Split(images[idx], labels[idx].astype(np.int64), idx.astype(np.int64), extras)

    def whole(images: np.ndarray, labels: np.ndarray, columns: dict[str, np.ndarray]) -> Split:
        return take(images, labels, columns, np.arange(labels.size, dtype=np.int64))

    splits = {
        "train": take(raw.train_images, y, raw.extra_train_columns, train_idx),
        "val": take(raw.train_images, y, raw.extra_train_columns, val_idx),
        "test": whole(raw.test_images, raw.test_labels, raw.extra_test_columns),
        # Extra test sets (e.g. test_unbiased): ids are positions in their own arrays, like test.
        **{name: whole(*extra) for name, extra in raw.extra_test_splits.items()},
    }
    if raw.val_view is not None:  # the source draws val its own way (e.g. recoloured at an unbiased rho)
        val = splits["val"]
        val.images, val.extras = raw.val_view(val_idx)
    if b.label_noise is not None:
        tr = splits["train"]
        clean = tr.labels
        tr.labels = corrupt_labels(clean, num_classes, b.label_noise, b.noise_rate, noise_rng)
        # Every split carries clean_label (equal to label outside train) so all splits share one schema.
        for name, s in splits.items():
            s.extras["clean_label"] = clean if name == "train" else s.labels.copy()
    # Checked on the labels training will see (after noise): `verify` rejects a class without training samples, so
    # `prepare` must never write one; the same rule, in the same words.
    train_counts = np.bincount(splits["train"].labels, minlength=num_classes)  # [C]
    if problems := class_count_problems(train_counts, raw.classes, num_classes):
        raise DataError(
            f"the train split of imbalance {b.imbalance!r} (factor {b.factor}) with label noise {b.label_noise!r} "
            f"(rate {b.noise_rate}), largest class {int(train_counts.max())}: {'; '.join(problems)}"
        )
    return splits
