"""A worker's input: its rows of the train split's (seed, epoch) order, and its share of each eval split, as
`Batch`es on its device. Ray appears twice: `ray.get` of a small split's table, `get_dataset_shard` of a large
split's stream (`rayenv.data_sources` decides which)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch

from rwray.config import Config
from rwray.data import Manifest
from rwray.train.batches import Batch, EvalRows, Images, TrainRows, arrow_rows, epoch_seed
from rwray.train.rayenv import quiet_data

EVAL_KEEP_BYTES = 1 << 30


class Data:
    """This worker's batches: its rows of the train split's (seed, epoch) order (`data.sampler`), and its share of
    an eval split. Counts the classes of the train rows it hands out (``class_samples``, [C], this epoch)."""

    def __init__(self, cfg: Config, manifest: Manifest, device: torch.device, rank: int, world: int,
                 tables: dict[str, Any]):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.info = info = manifest.data_info()
        self.images = Images(info, manifest.mean, manifest.std, device, cfg.train.channels_last)
        self.num_bias = info.num_classes if "bias" in info.extra_columns else None  # bias values index classes
        self.gen = torch.Generator(device=device)
        self.class_samples = torch.zeros(info.num_classes, dtype=torch.int64)  # [C] this rank's, this epoch
        self.train_rows = TrainRows(self._stream("train", tables, batch=4096, prefetch_batches=2))
        # An eval split this worker's share of which fits in EVAL_KEEP_BYTES is read once and kept (its images as
        # stored: uint8, C*H*W bytes a row); a larger one is streamed from Ray Data at every evaluation.
        row_bytes = math.prod(info.image_shape)
        self.eval_rows = {}
        for split in manifest.eval_splits:
            keep = split in tables or manifest.num_samples(split) * row_bytes / world <= EVAL_KEEP_BYTES
            batch = 4096 if keep else cfg.data.eval_batch_size
            self.eval_rows[split] = EvalRows(self._stream(split, tables, batch), rank, world, keep)

    @staticmethod
    def _stream(split: str, tables: dict[str, Any], batch: int, **kw
                ) -> Callable[[], Iterable[dict[str, torch.Tensor]]]:
        """A small split is one table in Ray's object store (`rayenv.data_sources`); a large one a Ray Data shard."""
        import ray
        import ray.train

        if split in tables:
            return lambda: [arrow_rows(ray.get(tables[split]))]
        quiet_data()
        return lambda: ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=batch, **kw)

    def train(self, epoch: int) -> Iterator[Batch]:
        cfg, k = self.cfg, self.info.num_classes
        self.gen.manual_seed(epoch_seed(cfg.train.seed, self.rank, epoch))
        self.class_samples.zero_()
        for rows in self.train_rows.batches(cfg.train.seed, epoch, self.rank, self.world, cfg.data.batch_size,
                                            cfg.data.sampler, cfg.train.epochs, k):
            self.class_samples += torch.bincount(rows["label"].long(), minlength=k)
            yield self.images(rows, cfg.data.augment, cfg.data.crop_padding, self.gen)

    def eval(self, split: str) -> Iterator[Batch]:
        for rows in self.eval_rows[split].batches(self.cfg.data.eval_batch_size):
            yield self.images(rows)
