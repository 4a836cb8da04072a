"""Writing a `FileListing` (a dataset of image files) as JPEG-bytes Parquet shards.

Layout (the same manifest as array shards, `rwray.data.manifest`, with ``"encoding": "jpeg"``):
    train-00000.parquet ...   columns: image (binary: the file's bytes), label, index, extras (int64)
                              row groups of `rows_per_group` rows: the unit of streaming IO and of the epoch plan
The train split is placed in files by a seeded permutation, so every row group is a random sample of the split and
an epoch can shuffle whole groups; evaluation splits keep listing order (canonical order). The manifest records
class counts, each file's row groups and sha256, and the per-channel mean / std of the train images.

Files are read, fully decoded (a corrupt or truncated image is found here, not mid-training) and, with
``resize``, shrunk to that shorter side and re-encoded, by a process pool, one shard file per task. Every
unreadable image is reported at once; nothing reaches ``out`` unless the whole directory was written.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rwray.data.atomic import dump_manifest, staging
from rwray.data.checks import check_staged, class_count_problems
from rwray.data.decode import open_rgb
from rwray.data.listing import REQUIRED_SPLITS, FileListing, raise_all
from rwray.data.manifest import FORMAT, MANIFEST, Manifest, file_sha256
from rwray.errors import DataError

ENCODING = "jpeg"
JPEG_QUALITY = 90  # for images re-encoded after `resize`
# Bytes already compressed: Parquet compression would spend CPU for nothing; ids and labels are tiny either way.
_WRITE_OPTIONS: dict[str, Any] = dict(compression="none", use_dictionary=False, write_statistics=True,
                                      version="2.6", data_page_version="1.0")


@dataclass
class _FileJob:
    split: str
    name: str  # train-00003.parquet
    files: list[str]  # [n] image paths, in row order
    labels: np.ndarray  # [n]
    index: np.ndarray  # [n]
    columns: dict[str, np.ndarray]  # name -> [n]
    rows_per_group: int
    resize: int | None
    stats: bool  # measure channel sums (train only)


@dataclass
class _FileResult:
    rows: int
    sha256: str
    row_groups: list[int]
    problems: list[str]
    sums: np.ndarray  # [3] int64, channel sums of 0..255 values
    sq_sums: np.ndarray  # [3] float64
    pixels: int


def _read_image(path: str, resize: int | None, want_stats: bool) -> tuple[bytes, np.ndarray | None]:
    with open(path, "rb") as f:
        data = f.read()
    img = open_rgb(data)
    if resize is not None and min(img.size) > resize:
        from PIL import Image

        w, h = img.size
        scale = resize / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
    return data, (np.asarray(img) if want_stats else None)  # [H, W, 3] uint8


def _write_file(job: _FileJob, tmp: str) -> _FileResult:
    """One shard file: read and check every image, write row group by row group. Runs in a pool process."""
    extra = sorted(job.columns)
    schema = pa.schema([pa.field("image", pa.binary(), nullable=False)]
                       + [pa.field(c, pa.int64(), nullable=False) for c in ("label", "index", *extra)])
    problems: list[str] = []
    sums, sq, pixels = np.zeros(3, np.int64), np.zeros(3, np.float64), 0
    groups: list[int] = []
    path = Path(tmp) / job.name
    with pq.ParquetWriter(path, schema, **_WRITE_OPTIONS) as writer:
        for start in range(0, max(len(job.files), 1), job.rows_per_group):
            stop = min(start + job.rows_per_group, len(job.files))
            images = []
            for f in job.files[start:stop]:
                try:
                    data, arr = _read_image(f, job.resize, job.stats)
                except Exception as e:  # missing after listing, unreadable, truncated, not an image
                    problems.append(f"{f}: unreadable image ({type(e).__name__}: {str(e)[:120]})")
                    data, arr = b"", None
                images.append(data)
                if arr is not None:
                    px = arr.reshape(-1, 3)
                    sums += px.sum(0, dtype=np.int64)
                    sq += (px.astype(np.float64) ** 2).sum(0)
                    pixels += px.shape[0]
            cols = [pa.array(images, pa.binary()), pa.array(job.labels[start:stop], pa.int64()),
                    pa.array(job.index[start:stop], pa.int64())]
            cols += [pa.array(job.columns[c][start:stop], pa.int64()) for c in extra]
            if stop > start:  # an empty split's file holds the schema and no row group
                writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=stop - start)
                groups.append(stop - start)
    h = file_sha256(path)  # in 1 MiB blocks: a shard of full-size JPEGs is hundreds of MB
    return _FileResult(len(job.files), h, groups, problems, sums, sq, pixels)


def _jobs(listing: FileListing, rows_per_shard: int, rows_per_group: int, resize: int | None,
          seed: int) -> list[_FileJob]:
    jobs = []
    for split, s in listing.splits.items():
        # Train rows in a seeded random order (each row group a random sample); eval rows in listing order.
        order = np.random.default_rng(seed).permutation(len(s)) if split == "train" else np.arange(len(s))
        for k, start in enumerate(range(0, max(len(s), 1), rows_per_shard)):  # an empty split still gets a file
            rows = order[start:start + rows_per_shard]
            jobs.append(_FileJob(split, f"{split}-{k:05d}.parquet", [s.files[i] for i in rows], s.labels[rows],
                                 s.index[rows], {c: v[rows] for c, v in s.columns.items()}, rows_per_group, resize,
                                 split == "train"))
    return jobs


def _run(jobs: list[_FileJob], tmp: Path, workers: int, done: Callable[[_FileJob, _FileResult], None]) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done(job, _write_file(job, str(tmp)))
        return
    # spawn: a fresh interpreter per worker (no forked Ray / torch threads); results return in completion order.
    pool = cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_write_file, job, str(tmp)): job for job in jobs}
        for fut in cf.as_completed(futures):
            done(futures[fut], fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_listing(listing: FileListing, source: Any, out: Path, builder: Any,
                  progress: Callable[[str, int, int], None] | None = None) -> Manifest:
    """Write ``listing`` as an image shard directory at ``out`` (see the module docstring); -> its Manifest.

    ``builder`` is the `BuilderParams` of the job: rows_per_shard, rows_per_group, resize, workers and seed apply;
    imbalance and label noise do not (these datasets come with their own splits) and are refused if set."""
    if builder.imbalance != "none" or builder.label_noise is not None:
        raise DataError(f"{source.name}: imbalance and label_noise apply to array sources (digits, cifar, ...), not "
                        "to datasets of image files, which come with their own splits; leave them unset")
    # The listing's class counts are known before any image is read: a set `verify` would reject (a class without
    # training images) is refused now, in its words, rather than after hours of decoding.
    k = len(listing.classes)
    if problems := class_count_problems(np.bincount(listing.splits["train"].labels, minlength=k), listing.classes, k):
        raise DataError(f"{source.name}: the listing's train split: {'; '.join(problems)}. Nothing was written to "
                        f"{out}. Fix: list training images for every class, or leave the classes without any out of "
                        "the class list (num_classes, classes file)")
    # Manifest order: train, val, test, then the listing's extra evaluation splits.
    order = [*REQUIRED_SPLITS, *(s for s in listing.splits if s not in REQUIRED_SPLITS)]
    listing.splits = {s: listing.splits[s] for s in order}
    jobs = _jobs(listing, builder.rows_per_shard, builder.rows_per_group, builder.resize, builder.seed)
    totals = {split: len(s) for split, s in listing.splits.items()}
    written = dict.fromkeys(totals, 0)
    results: dict[str, _FileResult] = {}
    if progress is not None:
        for split, n in totals.items():
            progress(split, 0, n)

    def done(job: _FileJob, r: _FileResult) -> None:
        results[job.name] = r
        written[job.split] += r.rows
        if progress is not None:
            progress(job.split, written[job.split], totals[job.split])

    with staging(out) as tmp:
        _run(jobs, tmp, builder.workers or os.cpu_count() or 1, done)
        problems = [p for job in jobs for p in results[job.name].problems]
        if problems:
            raise_all(f"{source.name}: images that cannot be read (nothing was written to {out})", problems)
        (tmp / MANIFEST).write_bytes(dump_manifest(_manifest(listing, source, builder, jobs, results)))
        check_staged(tmp, out)
    return Manifest.load(out)


def _manifest(listing: FileListing, source: Any, builder: Any, jobs: list[_FileJob],
              results: dict[str, _FileResult]) -> dict[str, Any]:
    k = len(listing.classes)
    train = [results[j.name] for j in jobs if j.split == "train"]
    if listing.mean is not None and listing.std is not None:
        mean, std = list(listing.mean), list(listing.std)
    else:  # exact over every train pixel, in [0, 1] units
        n = max(sum(r.pixels for r in train), 1)
        m = sum(r.sums for r in train) / n / 255.0
        var = np.maximum(sum(r.sq_sums for r in train) / n / 255.0**2 - m**2, 0.0)
        mean, std = [float(v) for v in m], [float(v) for v in np.sqrt(var)]
    splits = {}
    for split, s in listing.splits.items():
        splits[split] = {
            "num_samples": len(s),
            "class_counts": [int(v) for v in np.bincount(s.labels, minlength=k)],
            "shards": [{"file": j.name, "rows": results[j.name].rows, "sha256": results[j.name].sha256,
                        "row_groups": results[j.name].row_groups} for j in jobs if j.split == split],
        }
    return {
        "format": FORMAT, "encoding": ENCODING,
        "source": source.model_dump(mode="json"), "builder": builder.model_dump(mode="json"),
        "classes": list(listing.classes), "num_classes": k,
        "image_shape": [3, 0, 0],  # 0: images vary in size; the crop (data.crop_size) fixes what the model sees
        "mean": mean, "std": std,
        "columns": ["image", "label", "index", *sorted(next(iter(listing.splits.values())).columns)],
        "splits": splits, "notes": list(listing.notes),
    }

