"""A worker's input: its rows of the train split's epoch plan, and its share of each eval split, as `Batch`es on its
device. Two ways to read, one plan and one resume contract (`rwray.train.plan`):

- memory (small data): the split read once into the worker's memory — one `ray.get` of a small split's table, or
  a Ray Data shard of a larger one (`rayenv.data_sources`) — and cut each epoch by `TrainRows`;
- stream (data that does not fit, and every encoded-image dataset): only this rank's row groups, decoded on CPU
  actors kept for the run (`rwray.train.stream`); nothing materialises a split.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from rwray.config import Config
from rwray.data import Manifest
from rwray.data.decode import ImageTransform
from rwray.data.policy import Policy
from rwray.train import plan
from rwray.train.batches import Augmentation, Batch, EvalRows, Images, TrainRows, arrow_rows, step_seed
from rwray.train.rayenv import quiet_data
from rwray.train.stream import DecoderPool, RankStream

EVAL_KEEP_BYTES = 1 << 30
GIB = 1 << 30


def streams(cfg: Config, manifest: Manifest) -> bool:
    """data.stream, with auto: encoded images always stream; array shards stream when the train split's files
    exceed data.memory_limit_gb."""
    if cfg.data.stream != "auto":
        return cfg.data.stream == "stream"
    size = sum(os.path.getsize(f) for f in manifest.shard_paths("train"))
    return manifest.encoded or size > cfg.data.memory_limit_gb * GIB


def policy(cfg: Config) -> Policy:
    d = cfg.data
    return Policy(d.policy, d.autoaugment_policy, d.randaugment_ops, d.randaugment_magnitude)


def augmentation(cfg: Config) -> Augmentation:
    d = cfg.data
    return Augmentation(d.augment, d.crop_padding, policy(cfg), d.cutout, d.mix, d.mix_alpha)


class Data:
    """This worker's batches: its rows of the train split's (seed, epoch) plan (`data.sampler` in memory), and its
    share of an eval split. Counts the classes of the train rows it hands out (``class_samples``, [C], this epoch)."""

    def __init__(self, cfg: Config, manifest: Manifest, device: torch.device, rank: int, world: int,
                 tables: dict[str, Any]):
        self.cfg, self.manifest, self.rank, self.world = cfg, manifest, rank, world
        self.info = info = manifest.data_info(cfg.data.crop_size)
        self.images = Images(info, manifest.mean, manifest.std, device, cfg.train.channels_last, augmentation(cfg))
        self.num_bias = info.num_classes if "bias" in info.extra_columns else None  # bias values index classes
        # Texture clusterings (9-class ImageNet: cluster1..3, -1 where unknown): scored as ReBias's unbiased accuracy.
        self.cluster_columns = tuple(sorted(c for c in info.extra_columns if re.fullmatch(r"cluster\d+", c)))
        self.num_clusters = max((manifest.column_max(c) + 1 for c in self.cluster_columns), default=0)
        self.gen = torch.Generator(device=device)
        self.class_samples = torch.zeros(info.num_classes, dtype=torch.int64)  # [C] this rank's, this epoch
        self.streaming = streams(cfg, manifest)
        if self.streaming:
            self._init_streams(cfg, manifest)
            return
        self.train_rows = TrainRows(self._table("train", tables, batch=4096, prefetch_batches=2))
        # An eval split this worker's share of which fits in EVAL_KEEP_BYTES is read once and kept (its images as
        # stored: uint8, C*H*W bytes a row); a larger one is streamed from Ray Data at every evaluation.
        row_bytes = math.prod(info.image_shape)
        self.eval_rows = {}
        for split in manifest.eval_splits:
            keep = split in tables or manifest.num_samples(split) * row_bytes / world <= EVAL_KEEP_BYTES
            batch = 4096 if keep else cfg.data.eval_batch_size
            self.eval_rows[split] = EvalRows(self._table(split, tables, batch), rank, world, keep)

    # ------------------------------------------------------------------------------------------------- memory

    @staticmethod
    def _table(split: str, tables: dict[str, Any], batch: int, **kw
               ) -> Callable[[], Iterable[dict[str, torch.Tensor]]]:
        """A small split is one table in Ray's object store (`rayenv.data_sources`); a large one a Ray Data shard."""
        import ray
        import ray.train

        if split in tables:
            return lambda: [arrow_rows(ray.get(tables[split]))]
        quiet_data()
        return lambda: ray.train.get_dataset_shard(split).iter_torch_batches(batch_size=batch, **kw)

    # ------------------------------------------------------------------------------------------------- stream

    def _init_streams(self, cfg: Config, manifest: Manifest) -> None:
        d = cfg.data
        transform = (ImageTransform(d.crop_size, d.eval_resize, "rrc_flip" if d.augment == "rrc_flip" else
                                    "flip" if d.augment == "flip" else "none", d.color_jitter, policy=policy(cfg))
                     if manifest.encoded else None)
        self.splits: dict[str, tuple[list[tuple[int, int, int]], RankStream]] = {}
        self._eval_kept: dict[str, list[dict[str, torch.Tensor]]] = {}
        readers, groups_of = {}, {}
        for split in ("train", *manifest.eval_splits):
            groups = manifest.row_groups(split)  # [(file, group in file, rows)] in storage order
            files = list(dict.fromkeys(f for f, _, _ in groups))
            at = {f: i for i, f in enumerate(files)}
            readers[split] = (files, manifest.columns, transform, split == "train", cfg.train.seed)
            groups_of[split] = [(at[f], g, n) for f, g, n in groups]
        # One pool of decoding actors for every split, kept for the run (`stream.DecoderPool`).
        pool = (DecoderPool(readers, d.decode_actors, d.decode_cpus, d.decode_window, d.decode_node_labels)
                if d.decode_actors > 0 else None)
        for split, args in readers.items():
            self.splits[split] = (groups_of[split], RankStream(split, args, pool))

    def _mine(self, epoch: int, stages: plan.Stages | None) -> np.ndarray:
        """This rank's rows still to train in the epoch, in order: positions in the kept rows (memory) or global
        row ids of the split's row groups (stream)."""
        cfg, stages = self.cfg, plan.resume_stages(stages, self.world)
        if not self.streaming:
            return self.train_rows.order(cfg.train.seed, epoch, self.rank, self.world, cfg.data.sampler,
                                         cfg.train.epochs, self.info.num_classes, stages)
        rows = [n for _, _, n in self.splits["train"][0]]
        return plan.current(lambda w: plan.epoch_plan(cfg.train.seed, epoch, rows, w), stages)[self.rank]

    def train(self, epoch: int, stages: plan.Stages | None = None, first_step: int = 0
              ) -> tuple[int, Iterator[Batch]]:
        """(this rank's steps left in the epoch, its batches). ``stages``: where a resumed epoch stands
        (`rwray.train.plan`); ``first_step``: the number of the first batch (seeds its device augmentation)."""
        cfg, k = self.cfg, self.info.num_classes
        b = cfg.data.batch_size
        mine = self._mine(epoch, stages)
        if cfg.data.drop_last:  # consumed rows are whole batches, so a resumed epoch drops the same tail
            mine = mine[:len(mine) // b * b]
        if not self.streaming:
            rows = self.train_rows.take(mine, b)
        else:
            groups, stream = self.splits["train"]
            items = [{"file": groups[u][0], "group": groups[u][1], "rows": r.tolist(), "epoch": epoch}
                     for u, r in plan.pieces(mine, plan.offsets([n for _, _, n in groups]))]
            rows = stream.batches(items, b)

        def batches() -> Iterator[Batch]:
            self.class_samples.zero_()
            for step, r in enumerate(rows, start=first_step):
                self.class_samples += torch.bincount(r["label"].long(), minlength=k)
                self.gen.manual_seed(step_seed(cfg.train.seed, self.rank, epoch, step))
                yield self.images(r, train=True, generator=self.gen, seed=cfg.train.seed, epoch=epoch)

        return -(-len(mine) // b), batches()

    def eval(self, split: str) -> Iterator[Batch]:
        if not self.streaming:
            for rows in self.eval_rows[split].batches(self.cfg.data.eval_batch_size):
                yield self.images(rows)
            return
        if split in self._eval_kept:  # decoded once: the eval transform has no randomness
            for rows in self._eval_kept[split]:
                yield self.images(rows)
            return
        groups, stream = self.splits[split]
        mine = plan.eval_groups(len(groups), self.rank, self.world)
        items = [{"file": groups[u][0], "group": groups[u][1], "rows": list(range(groups[u][2])), "epoch": 0}
                 for u in mine]
        # Keep this rank's decoded crops (uint8) when they fit in EVAL_KEEP_BYTES: later evaluations skip the
        # the decode.
        crop = math.prod(self.info.image_shape)
        keep = sum(groups[u][2] for u in mine) * crop <= EVAL_KEEP_BYTES
        kept = []
        for rows in stream.batches(items, self.cfg.data.eval_batch_size):
            if keep:
                kept.append(rows)
            yield self.images(rows)
        if keep:
            self._eval_kept[split] = kept
