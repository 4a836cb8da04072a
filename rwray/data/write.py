"""Writing a shard directory (`prepare`): a registered source -> `build_splits` -> Parquet shards per split ->
per-channel train statistics -> manifest, assembled in a temporary sibling and moved into place atomically.

The format itself (layout, columns, manifest keys) is described in `rwray.data.manifest`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rwray.data.atomic import check_out, dump_manifest, staging
from rwray.data.checks import check_staged
from rwray.data.listing import FileListing
from rwray.data.manifest import BASE_COLUMNS, FORMAT, MANIFEST, Manifest, file_sha256
from rwray.data.sources import SOURCES
from rwray.data.splits import BuilderParams, Split, build_splits
from rwray.errors import DataError
from rwray.registry import Params

# Fixed writer options: nothing here may depend on the environment or the clock, or shards stop being byte-identical.
# One row group per shard (row_group_size = rows_per_shard) keeps a shard the unit of both IO and checksumming.
_WRITE_OPTIONS: dict[str, Any] = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=False,  # images are near-random bytes and ids are unique: dictionaries would only cost time
    write_statistics=True,  # min/max per column chunk: `verify` range-checks labels without reading them
    version="2.6",
    data_page_version="1.0",
)

# progress(split, rows written so far, rows in the split): once with 0 before a split's first shard, then after
# every shard, so counts rise monotonically to the split's size. Splits come in manifest order (train, val, test,
# extra test sets).
Progress = Callable[[str, int, int], None]


def _table(s: Split, width: int, extra_names: list[str]) -> pa.Table:
    flat = pa.array(s.images.reshape(-1), type=pa.uint8())  # [n * C*H*W], CHW order per row
    columns = [
        pa.FixedSizeListArray.from_arrays(flat, width),  # [n] rows of width bytes, zero-copy over flat
        pa.array(s.labels, pa.int64()),
        pa.array(s.index, pa.int64()),
    ]
    columns += [pa.array(s.extras[n], pa.int64()) for n in extra_names]
    schema = pa.schema(
        [pa.field("image", pa.list_(pa.uint8(), width), nullable=False)]
        + [pa.field(n, pa.int64(), nullable=False) for n in ("label", "index", *extra_names)]
    )
    return pa.Table.from_arrays(columns, schema=schema)  # no pandas metadata: built from arrow arrays only


def _write_split(
    split: str, s: Split, out: Path, width: int, extra_names: list[str], rows: int, progress: Progress | None = None
) -> list[dict[str, Any]]:
    n = s.labels.size
    shards = []
    done = 0
    if progress is not None:
        progress(split, 0, int(n))
    for k in range(max(1, math.ceil(n / rows))):  # an empty split still gets one (empty) shard: the schema is on disk
        part = Split(s.images[k * rows : (k + 1) * rows], s.labels[k * rows : (k + 1) * rows],
                     s.index[k * rows : (k + 1) * rows], {e: v[k * rows : (k + 1) * rows] for e, v in s.extras.items()})
        name = f"{split}-{k:05d}.parquet"
        pq.write_table(_table(part, width, extra_names), out / name, row_group_size=rows, **_WRITE_OPTIONS)
        shards.append({"file": name, "rows": int(part.labels.size), "sha256": file_sha256(out / name)})
        done += int(part.labels.size)
        if progress is not None:
            progress(split, done, int(n))
    return shards


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in [0, 1] units of images [n, C, H, W] uint8.

    Sums are exact int64 in chunks (255^2 * 50000 * 1024 ~ 3e12 is far below 2^63), so the result does not depend
    on summation order and memory stays at one chunk of float-free integers.
    """
    n, c = images.shape[:2]
    total = np.zeros(c, dtype=np.int64)
    total_sq = np.zeros(c, dtype=np.int64)
    for start in range(0, n, 2048):
        chunk = images[start : start + 2048].astype(np.int64)  # [b, C, H, W]
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += (chunk * chunk).sum(axis=(0, 2, 3))
    count = max(1, n * images.shape[2] * images.shape[3])
    mean = total / count / 255.0
    var = np.maximum(total_sq / count / 255.0**2 - mean**2, 0.0)
    return [float(v) for v in mean], [float(v) for v in np.sqrt(var)]


def prepare(source: Params, out: Path, builder: BuilderParams | None = None, overwrite: bool = False,
            progress: Progress | None = None) -> Manifest:
    """Build a shard directory at ``out`` from a registered source; returns its loaded Manifest.

    ``progress(split, done_rows, total_rows)`` (see `Progress`) is called as each split's shards are written; it
    is not called while the source itself is read and split, which comes first.

    Everything is written into a temporary sibling directory that is renamed onto ``out`` only when complete, so a
    failure (or Ctrl-C) leaves either the previous contents of ``out`` or nothing, never half a dataset. A set
    `verify` would reject is never written: a class without training samples is refused before the first shard
    (`rwray.data.checks.class_count_problems`, verify's own rule and words), and verify's structural checks run on
    the finished temporary directory before it replaces ``out`` (`rwray.data.checks.check_staged`).
    """
    builder = builder if builder is not None else BuilderParams()
    out = Path(out).expanduser().absolute()
    check_out(out, overwrite)  # before the (possibly slow) source build

    raw = SOURCES.build(source)
    if isinstance(raw, FileListing):  # a dataset of image files: JPEG-bytes shards, its own writer
        from rwray.data.imagewrite import write_listing

        return write_listing(raw, source, out, builder, progress)
    splits = build_splits(raw, builder)
    c, h, w = raw.image_shape
    width = c * h * w
    extra_names = sorted(splits["train"].extras)
    num_classes = len(raw.classes)

    with staging(out) as tmp:
        split_info = {}
        for name in splits:  # train, val, test, then any extra test sets of the source
            s = splits[name]
            split_info[name] = {
                "num_samples": int(s.labels.size),
                "class_counts": [int(v) for v in np.bincount(s.labels, minlength=num_classes)],  # observed labels
                "shards": _write_split(name, s, tmp, width, extra_names, builder.rows_per_shard, progress),
            }
        mean, std = _channel_stats(splits["train"].images)
        manifest = {
            "format": FORMAT,
            "source": source.model_dump(mode="json"),
            "builder": builder.model_dump(mode="json"),
            "classes": list(raw.classes),
            "num_classes": num_classes,
            "image_shape": [c, h, w],
            "mean": mean,
            "std": std,
            "columns": [*BASE_COLUMNS, *extra_names],
            "splits": split_info,
        }
        (tmp / MANIFEST).write_bytes(dump_manifest(manifest))
        check_staged(tmp, out)  # what `verify` checks, before it replaces out (class counts: build_splits, above)
    return Manifest.load(out)
