"""Streaming input for data that does not fit in a worker: a rank reads only its pieces of the epoch plan
(`rwray.train.plan`) — row groups of Parquet shards, rows inside them — decoded and augmented on CPU actors into
uint8 crops, handed to the train loop in plan order with a bounded window in flight. Nothing materialises a split:
at any time a rank holds the pieces in flight (``actors x window``, at most `PIECE_ROWS` rows each) and the batch
being assembled.

The decoding actors (`DecoderPool`) are plain Ray actors started once per worker and kept for the run, for every
split. Ray Data was the first engine here, and gave the same batches, but Ray 2.60 starts a new actor pool for every
execution — every epoch and every evaluation — and each new actor imports torch and torchvision: 4-8 s per epoch
per worker before the first batch (docs/benchmarks-stream.md). With ``actors=0`` the same reader runs in the train
process (tests, debugging, a machine without spare cores).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from rwray.data.decode import Decoder, ImageTransform
from rwray.train.batches import column_values

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
            part = {c: column_values(table[c]) for c in self.columns if c != "image"}
            if self.decode is not None:  # [n] bytes -> [n, 3, S, S] uint8
                part["image"] = self.decode(table["image"].to_pylist(), part["index"], self.seed, int(epoch))
            else:
                part["image"] = column_values(table["image"])
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


PIECE_ROWS = 64  # pieces are cut to this many rows: the first batch waits for a few small decodes, not a row group
PIECE_RETRIES = 3  # a piece whose decoding actor died is tried again this many times, on the restarted actor


class _Decoder:
    """One decoding actor: a `PieceReader` per split, built on first use (imports paid once, at start)."""

    def __init__(self, readers: dict[str, tuple]):
        self.args, self.readers = readers, {}

    def ready(self) -> bool:
        import torchvision.transforms.v2  # noqa: F401 - the import a first decode would pay

        return True

    def read(self, split: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if split not in self.readers:
            self.readers[split] = PieceReader(*self.args[split])
        return self.readers[split](batch)


class DecoderPool:
    """``actors`` Ray actors of ``cpus`` CPUs each (on nodes with ``label_selector``), kept for the run. Pieces are
    dealt round-robin with at most ``window`` in flight per actor and taken back in order: the stream's order is
    the plan's, and memory is bounded by the window. A lost actor is restarted by Ray and its piece retried (up to
    PIECE_RETRIES times)."""

    def __init__(self, readers: dict[str, tuple], actors: int, cpus: float, window: int,
                 label_selector: dict[str, str] | None = None):
        import ray

        # A lost actor is always restarted (a long run may lose many to preemption); a piece is retried a few times,
        # then its error reaches the train worker: a piece that kills every actor it lands on (out of memory) would
        # otherwise be retried forever, and the run would hang instead of failing with a report.
        options: dict[str, Any] = {"num_cpus": cpus, "max_restarts": -1, "max_task_retries": PIECE_RETRIES}
        if label_selector:
            options["label_selector"] = label_selector
        remote = ray.remote(_Decoder).options(**options)
        self.actors = [remote.remote(readers) for _ in range(actors)]
        self.window = window
        self._started = [a.ready.remote() for a in self.actors]  # start-up overlaps the model's build

    def parts(self, split: str, items: list[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
        import ray

        if self._started:
            ray.get(self._started)
            self._started = []
        pending: deque = deque()
        todo = iter(enumerate(items))
        for k, it in todo:
            pending.append(self.actors[k % len(self.actors)].read.remote(split, _as_batch([it])))
            if len(pending) >= self.window * len(self.actors):
                break
        while pending:
            out = ray.get(pending.popleft())
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(self.actors[nxt[0] % len(self.actors)].read.remote(split, _as_batch([nxt[1]])))
            yield out


class RankStream:
    """One split as one rank streams it. ``items`` (from `plan.pieces`) name what to read; `batches` yields
    ``{column: tensor}`` batches in exactly that order, decoded by ``pool`` (None: in this process)."""

    def __init__(self, split: str, reader_args: tuple, pool: DecoderPool | None):
        self.split, self.reader_args, self.pool = split, reader_args, pool
        self._local: PieceReader | None = None

    def batches(self, items: list[dict[str, Any]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        items = [{**it, "rows": it["rows"][i:i + PIECE_ROWS]} for it in items
                 for i in range(0, len(it["rows"]), PIECE_ROWS)]
        if not items:
            return iter(())
        if self.pool is not None:
            return rebatch(self.pool.parts(self.split, items), batch_size)
        if self._local is None:
            self._local = PieceReader(*self.reader_args)
        return rebatch((self._local(_as_batch([it])) for it in items), batch_size)


def _as_batch(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Items as the one-row numpy batch Ray Data would hand a reader: ``rows`` an object array of int arrays."""
    rows = np.empty(len(items), dtype=object)
    rows[:] = [np.asarray(it["rows"], dtype=np.int64) for it in items]
    return {"rows": rows, **{k: np.array([it[k] for it in items], dtype=np.int64) for k in ("file", "group", "epoch")}}
