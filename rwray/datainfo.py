"""What a model, a loss or a method may know about the data: read from the shard manifest, identical on every
worker. The contract between the data layer and everything that trains on it.

A leaf: imports nothing from rwray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    class_counts: tuple[int, ...]  # training samples per class, global (not per worker)
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_train: int
    extra_columns: tuple[str, ...] = ()  # e.g. ("bias", "clean_label")

