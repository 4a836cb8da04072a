"""A worker's batches: shard rows decoded into a `Batch` on the device, and the train split cut into this rank's
batches in an order that is a function of (seed, epoch) alone, so a restarted epoch replays exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from rwray.data.augment import MIXES, Mix, augment, cutout, decode, normalize
from rwray.data.policy import Policy, array_pipeline, per_sample
from rwray.datainfo import DataInfo
from rwray.train.plan import Stages, current, resume_stages
from rwray.train.sampling import Sampler, epoch_positions

CORE_COLUMNS = ("image", "label", "index")


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, H, W] float, augmented and normalised
    y: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] int64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    mix: Mix | None = None  # mixup / CutMix: each sample's second target and its share


@dataclass(frozen=True)
class Augmentation:
    """How train batches are augmented (the data.* fields), in the seeds' order: geometry (array shards; encoded
    images get theirs where they are decoded), the per-sample policy, Cutout, then mixup / CutMix."""

    kind: str = "none"  # data.augment
    padding: int = 4  # data.crop_padding
    policy: Policy = Policy()
    cutout: int = 0  # side of the zeroed square, pixels of the model's input; 0: off
    mix: str = "none"  # none | mixup | cutmix
    mix_alpha: float = 1.0


class Images:
    """Turns shard rows (a dict of tensors from Ray Data or any loader) into a `Batch` on the device."""

    def __init__(self, info: DataInfo, mean: list[float], std: list[float], device: torch.device,
                 channels_last: bool = False, aug: Augmentation = Augmentation()):
        self.shape = info.image_shape
        self.device = device
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.aug = aug
        # Array shards with a policy: geometry and policy per sample on CPU (torchvision), before the transfer.
        self._pipe = (array_pipeline(aug.policy, aug.kind, aug.padding, tuple(self.shape[1:]))
                      if aug.policy.name != "none" else None)

    def __call__(self, rows: dict[str, torch.Tensor], train: bool = False, generator: torch.Generator | None = None,
                 seed: int = 0, epoch: int = 0) -> Batch:
        """Eval rows, or (``train``) train rows augmented with ``generator`` for the batched ops and
        (seed, epoch, index) for the per-sample ones."""
        a, image = self.aug, rows["image"]
        y = rows["label"].to(self.device).long()
        if image.dim() == 4:  # [B, C, S, S] uint8 crops of encoded images: augmented where they were decoded
            x = image.to(self.device, non_blocking=True).float().div_(255.0)
        elif train and self._pipe is not None:  # [B, C*H*W] uint8 rows: per sample here, on CPU
            u8 = per_sample(self._pipe, image.view(len(image), *self.shape), rows["index"], seed, epoch)
            x = u8.to(self.device, non_blocking=True).float().div_(255.0)
        else:  # [B, C*H*W] uint8 rows of array shards: augmented on the device, as a batch
            x = decode(image.to(self.device, non_blocking=True), self.shape)
            x = augment(x, a.kind, a.padding, generator) if train else x
        mix = None
        if train:
            x = cutout(x, a.cutout, generator)
            if a.mix != "none":
                x, mix = MIXES[a.mix](x, y, a.mix_alpha, generator)
        x = normalize(x, self.mean, self.std).contiguous(memory_format=self.layout)
        extras = {k: v.to(self.device) for k, v in rows.items() if k not in CORE_COLUMNS}
        return Batch(x, y, rows["index"].to(self.device).long(), extras, mix)


def column_values(col) -> np.ndarray:
    """One Arrow column of shard rows -> numpy: a fixed-size-list column (the image, C*H*W uint8 a row) as
    [N, C*H*W], a scalar column as [N]. May be read-only (a view on Arrow's buffers)."""
    import pyarrow as pa

    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


def arrow_rows(table) -> dict[str, torch.Tensor]:
    """An Arrow table of shard rows -> one tensor per column (`column_values`), as Ray Data's iter_torch_batches
    hands them out."""
    # A copy: the table's buffers live in the object store and are read-only.
    return {name: torch.from_numpy(np.array(column_values(col)))
            for name, col in zip(table.column_names, table.columns)}


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and dropout randomness are a function of (seed, rank, epoch): a resumed epoch replays exactly.
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    # Device-side augmentation of one batch: a function of the step too, so an epoch resumed mid-way draws the
    # same crops and flips for the batches it still has to train.
    return (epoch_seed(seed, rank, epoch) * 1_000_033 + step) % (2**63)


def _order_seed(seed: int, epoch: int) -> int:
    # The data order is shared by every rank (they take interleaved slices of one permutation): no rank term.
    return (seed * 2_000_003 + epoch * 7_919 + 104_729) % (2**63)


def canonical_rows(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A whole split in any chunking and any order (Ray Data hands out blocks as they come) -> one tensor per
    column, rows sorted by the stable ``index`` id ({} for an empty split)."""
    parts = [p for p in parts if len(p["index"])]
    if not parts:
        return {}
    rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    canonical = torch.argsort(rows["index"])  # [N] ids are unique per split
    return {k: v[canonical] for k, v in rows.items()}


def epoch_order(labels: torch.Tensor, seed: int, epoch: int, rank: int, world: int, sampler: Sampler = "uniform",
                epochs: int = 1, num_classes: int | None = None) -> torch.Tensor:
    """This worker's positions in the canonical rows for one epoch, in training order: [n // world] int64.

    The epoch's list of positions (`sampling.epoch_positions`: a permutation for ``uniform``, class quotas for
    the other samplers) seeded with (seed, epoch), cut to a multiple of ``world`` and dealt round-robin: rank r
    takes entries r, r+world, ... So global step s trains on entries [s*B*world, (s+1)*B*world) whatever the
    worker count, each rank takes the same number of steps (DDP needs that), and a restarted epoch sees exactly
    the rows, order and split it saw before.
    """
    return global_order(labels, seed, epoch, world, sampler, epochs, num_classes)[rank::world]


def global_order(labels: torch.Tensor, seed: int, epoch: int, world: int, sampler: Sampler = "uniform",
                 epochs: int = 1, num_classes: int | None = None) -> torch.Tensor:
    """Every worker's positions of one epoch, before dealing: [(n // world) * world] int64."""
    g = torch.Generator().manual_seed(_order_seed(seed, epoch))
    k = num_classes if num_classes is not None else int(labels.max()) + 1 if len(labels) else 0
    return epoch_positions(labels, k, sampler, g, epoch, epochs, total=(len(labels) // world) * world)


class TrainRows:
    """The train split as one worker uses it: streamed from Ray Data once, kept in the worker's memory sorted by
    ``index``, and cut each epoch into this rank's batches of the (seed, epoch) permutation (`epoch_order`).

    Every worker holds the whole split: Ray's dynamic split would hand rows to whichever worker asks first, so
    neither the order nor the split would survive a restart. Streaming it once instead of every epoch saves the
    per-epoch Arrow-to-tensor conversion and copy; later epochs cost what an in-memory loader costs.
    """

    def __init__(self, stream: Callable[[], Iterable[dict[str, torch.Tensor]]]):
        self._stream = stream
        self._rows: dict[str, torch.Tensor] | None = None

    def order(self, seed: int, epoch: int, rank: int, world: int, sampler: Sampler = "uniform", epochs: int = 1,
              num_classes: int | None = None, stages: Stages | None = None) -> np.ndarray:
        """This rank's positions in the kept rows for the epoch, in training order; ``stages``
        (`rwray.train.plan`): where a resumed epoch stands. Reads the split on first use."""
        if self._rows is None:
            self._rows = canonical_rows(self._stream())
        if not self._rows:
            return np.zeros(0, np.int64)
        labels = self._rows["label"].long()

        def plan_for(w: int) -> list[np.ndarray]:
            positions = global_order(labels, seed, epoch, w, sampler, epochs, num_classes).numpy()
            return [positions[r::w] for r in range(w)]

        return current(plan_for, resume_stages(stages, world))[rank]

    def take(self, positions: np.ndarray, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The kept rows at ``positions``, ``batch_size`` at a time."""
        mine = torch.from_numpy(positions)
        for i in range(0, len(mine), batch_size):
            j = mine[i:i + batch_size]
            yield {k: v[j] for k, v in self._rows.items()}

    def batches(self, seed: int, epoch: int, rank: int, world: int, batch_size: int, sampler: Sampler = "uniform",
                epochs: int = 1, num_classes: int | None = None, stages: Stages | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of the epoch (`order`, then `take`)."""
        yield from self.take(self.order(seed, epoch, rank, world, sampler, epochs, num_classes, stages), batch_size)


class EvalRows:
    """An eval split as one worker scores it: the rows with ``index % world == rank``, so each sample is scored
    exactly once across workers (Ray's equal split would drop rows). Kept in memory after the first pass when
    ``keep`` (the split fits): later epochs skip Ray Data's per-iteration execution and the Arrow-to-tensor copy.
    """

    def __init__(self, stream: Callable[[], Iterable[dict[str, torch.Tensor]]], rank: int, world: int, keep: bool):
        self._stream, self.rank, self.world, self.keep = stream, rank, world, keep
        self._rows: dict[str, torch.Tensor] | None = None

    def _mine(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self._stream():
            mine = rows["index"] % self.world == self.rank
            yield {k: v[mine] for k, v in rows.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        if not self.keep:
            yield from self._mine()
            return
        if self._rows is None:
            self._rows = canonical_rows(self._mine())
        n = len(self._rows["index"]) if self._rows else 0
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self._rows.items()}
