"""Streaming input for data that does not fit in a worker: a rank reads only its pieces of the epoch plan
(`rwray.train.plan`) — row groups of Parquet shards, rows inside them — decoded and augmented on Ray Data CPU
actors into uint8 crops, handed to the train loop with a bounded prefetch window. Nothing materialises a split:
at any time a rank holds the pieces in flight (a few row groups) and ``prefetch_batches`` batches.

Ray appears once: `RankStream._ray_batches` (a Dataset built inside the train worker, executed in order:
``preserve_order`` makes the stream's order the plan's). With ``actors=0`` the same reader runs in the train
process instead (tests, debugging, a machine without spare cores).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch

from rwray.data.decode import Decoder, ImageTransform

# Arrow columns -> numpy: int64 scalars as [n], a fixed-size-list image (array shards) as [n, C*H*W] uint8.


def _column(col) -> np.ndarray:
    import pyarrow as pa

    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


class PieceReader:
    """Reads pieces (file, row group, rows in it, epoch) and returns their rows, images decoded and augmented
    (encoded shards) or as stored (array shards). A Ray Data actor, or called in-process."""

    def __init__(self, files: list[str], columns: list[str], transform: ImageTransform | None, train: bool,
                 seed: int):
        self.files, self.columns, self.seed = files, columns, seed
        self.decode = Decoder(transform, train) if transform is not None else None
        self._open: dict[int, Any] = {}

    def _file(self, f: int):
        import pyarrow.parquet as pq

        if f not in self._open:
            if len(self._open) >= 8:  # a rank's pieces walk through many files: keep a few footers, not all
                self._open.pop(next(iter(self._open)))
            self._open[f] = pq.ParquetFile(self.files[f])
        return self._open[f]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for f, g, rows, epoch in zip(batch["file"], batch["group"], batch["rows"], batch["epoch"]):
            table = self._file(int(f)).read_row_group(int(g), columns=self.columns)
            table = table.take(np.asarray(rows, dtype=np.int64))
            part = {c: _column(table[c]) for c in self.columns if c != "image"}
            if self.decode is not None:  # [n] bytes -> [n, 3, S, S] uint8
                part["image"] = self.decode(table["image"].to_pylist(), part["index"], self.seed, int(epoch))
            else:
                part["image"] = _column(table["image"])
            parts.append(part)
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def rebatch(parts: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Row dicts of any sizes -> tensors of exactly ``batch_size`` rows (the last may be shorter), order kept."""
    held: list[dict[str, np.ndarray]] = []
    n = 0
    for p in parts:
        held.append(p)
        n += len(p["index"])
        while n >= batch_size:
            rows = {c: np.concatenate([h[c] for h in held]) for c in held[0]}
            yield {c: torch.from_numpy(v[:batch_size]) for c, v in rows.items()}
            held, n = [{c: v[batch_size:] for c, v in rows.items()}], n - batch_size
    if n:
        yield {c: torch.from_numpy(np.concatenate([h[c] for h in held])) for c in held[0]}


class RankStream:
    """One split as one rank streams it. ``items`` (from `plan.pieces`) name what to read; `batches` yields
    ``{column: tensor}`` batches in exactly that order."""

    def __init__(self, files: list[str], columns: list[str], transform: ImageTransform | None, train: bool,
                 seed: int, actors: int, cpus: float, prefetch_batches: int,
                 label_selector: dict[str, str] | None = None):
        self.reader_args = (files, columns, transform, train, seed)
        self.actors, self.cpus, self.prefetch = actors, cpus, prefetch_batches
        self.label_selector = label_selector
        self._local: PieceReader | None = None

    def batches(self, items: list[dict[str, Any]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        if not items:
            return iter(())
        if self.actors == 0:
            if self._local is None:
                self._local = PieceReader(*self.reader_args)
            return rebatch((self._local(_as_batch([it])) for it in items), batch_size)
        return self._ray_batches(items, batch_size)

    def _ray_batches(self, items: list[dict[str, Any]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        import ray.data

        from rwray.train.rayenv import quiet_data

        quiet_data()
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the plan's order, whichever actor finishes first
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PieceReader, batch_size=1, batch_format="numpy", fn_constructor_args=self.reader_args,
            compute=ray.data.ActorPoolStrategy(size=self.actors), num_cpus=self.cpus,
            **({"label_selector": self.label_selector} if self.label_selector else {}))
        return iter(ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=self.prefetch, drop_last=False,
                                          device="cpu"))


def _as_batch(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Items as the one-row numpy batch Ray Data would hand a reader: ``rows`` an object array of int arrays."""
    rows = np.empty(len(items), dtype=object)
    rows[:] = [np.asarray(it["rows"], dtype=np.int64) for it in items]
    return {"rows": rows, **{k: np.array([it[k] for it in items], dtype=np.int64) for k in ("file", "group", "epoch")}}
