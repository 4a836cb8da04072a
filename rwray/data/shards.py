"""Deterministic Parquet shards + a JSON manifest: the one on-disk format every trainer and worker reads.

Pipeline (`prepare`): RawData -> balanced validation split carved from the train pool (first, so it does not depend
on the imbalance) -> long tail on the rest -> optional label noise on train -> Parquet shards per split -> manifest.

Layout of a shard directory:
    manifest.json                 sorted keys, no timestamps: same inputs + seed => same bytes
    train-00000.parquet ...       columns: image (fixed-size list<uint8>[C*H*W], CHW flattened), label, index, extras
    val-00000.parquet ...
    test-00000.parquet ...
    <extra>-00000.parquet ...     a source's extra test sets (e.g. test_unbiased), same columns

``index`` is the sample's position in the source's train pool (train and val) or test array (test, and each extra
test set in its own array), so the same image keeps the same id whatever imbalance, noise or seed selected it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from rwray.errors import DataError
from rwray.data.longtail import longtail_counts, select_per_class
from rwray.data.noise import corrupt_labels
from rwray.data.sources import SOURCES, RawData
from rwray.registry import Params

from rwray.datainfo import DataInfo

FORMAT = "rwray-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
BASE_COLUMNS = ("image", "label", "index")

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


class BuilderParams(Params):
    imbalance: Literal["none", "exp", "step"] = "none"
    factor: float = Field(1.0, ge=1, description="imbalance factor n_max / n_min")
    val_per_class: int = Field(20, ge=0, description="balanced validation images per class, taken from the train pool")
    seed: int = 0
    label_noise: Literal["symmetric", "asymmetric"] | None = None
    noise_rate: float = Field(0.0, ge=0, lt=1)
    rows_per_shard: int = Field(10000, ge=1)

    @model_validator(mode="after")
    def _rate_needs_kind(self) -> "BuilderParams":
        # A rate without a kind would silently train on clean labels; refuse instead.
        if self.noise_rate > 0 and self.label_noise is None:
            raise ValueError("noise_rate > 0 needs label_noise ('symmetric' or 'asymmetric')")
        return self


# ------------------------------------------------------------------------------------------------------ split building


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
    short = [c for c in range(num_classes) if available[c] <= b.val_per_class]
    if short:
        raise DataError(
            f"val_per_class={b.val_per_class} leaves no training images for class(es) {short} "
            f"(they have {[int(available[c]) for c in short]} in the train pool); lower val_per_class"
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
    if b.label_noise is not None:
        tr = splits["train"]
        clean = tr.labels
        tr.labels = corrupt_labels(clean, num_classes, b.label_noise, b.noise_rate, noise_rng)
        # Every split carries clean_label (equal to label outside train) so all splits share one schema.
        for name, s in splits.items():
            s.extras["clean_label"] = clean if name == "train" else s.labels.copy()
    # Checked on the labels training will see (after noise): `verify` rejects a class without training samples, so
    # `prepare` must never write one.
    train_counts = np.bincount(splits["train"].labels, minlength=num_classes)  # [C]
    empty = [c for c in range(num_classes) if train_counts[c] == 0]
    if empty:
        raise DataError(
            f"imbalance {b.imbalance!r} (factor {b.factor}) with label noise {b.label_noise!r} (rate {b.noise_rate}) "
            f"leaves class(es) {empty} with no training labels (largest class has {int(train_counts.max())}); "
            "lower the factor or the noise rate, or use a larger source"
        )
    return splits


# ------------------------------------------------------------------------------------------------------------ writing


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_split(
    split: str, s: Split, out: Path, width: int, extra_names: list[str], rows: int
) -> list[dict[str, Any]]:
    n = s.labels.size
    shards = []
    for k in range(max(1, math.ceil(n / rows))):  # an empty split still gets one (empty) shard: the schema is on disk
        part = Split(s.images[k * rows : (k + 1) * rows], s.labels[k * rows : (k + 1) * rows],
                     s.index[k * rows : (k + 1) * rows], {e: v[k * rows : (k + 1) * rows] for e, v in s.extras.items()})
        name = f"{split}-{k:05d}.parquet"
        pq.write_table(_table(part, width, extra_names), out / name, row_group_size=rows, **_WRITE_OPTIONS)
        shards.append({"file": name, "rows": int(part.labels.size), "sha256": _sha256(out / name)})
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


def _dump_manifest(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} exists and is a file, not a shard directory; choose another --out")
    if overwrite:
        return
    if (out / MANIFEST).exists():
        raise DataError(
            f"{out} already holds prepared shards ({MANIFEST} exists); pass overwrite=True (`--overwrite`) "
            "to replace them, or choose another output directory"
        )
    if any(out.iterdir()):
        raise DataError(
            f"{out} exists and is not empty (and is not a shard directory); choose another output directory, "
            "or pass overwrite=True (`--overwrite`) to replace its contents"
        )


def prepare(source: Params, out: Path, builder: BuilderParams | None = None, overwrite: bool = False) -> "Manifest":
    """Build a shard directory at ``out`` from a registered source; returns its loaded Manifest.

    Everything is written into a temporary sibling directory that is renamed onto ``out`` only when complete, so a
    failure (or Ctrl-C) leaves either the previous contents of ``out`` or nothing, never half a dataset.
    """
    builder = builder if builder is not None else BuilderParams()
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)  # before the (possibly slow) source build

    raw = SOURCES.build(source)
    splits = build_splits(raw, builder)
    c, h, w = raw.image_shape
    width = c * h * w
    extra_names = sorted(splits["train"].extras)
    num_classes = len(raw.classes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # same filesystem => rename is atomic
    tmp.mkdir()
    try:
        split_info = {}
        for name in splits:  # train, val, test, then any extra test sets of the source
            s = splits[name]
            split_info[name] = {
                "num_samples": int(s.labels.size),
                "class_counts": [int(v) for v in np.bincount(s.labels, minlength=num_classes)],  # observed labels
                "shards": _write_split(name, s, tmp, width, extra_names, builder.rows_per_shard),
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
        (tmp / MANIFEST).write_bytes(_dump_manifest(manifest))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest.load(out)


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    # POSIX cannot rename a directory over a non-empty one: move the old one aside, swap, then delete it.
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous contents back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    dir: Path
    data: dict[str, Any]
    raw: bytes = field(repr=False)  # the manifest file's bytes as read: what `sha256` hashes

    @classmethod
    def load(cls, dir: Path | str) -> "Manifest":
        d = Path(dir).expanduser().absolute()
        path = d / MANIFEST
        if not d.is_dir():
            raise DataError(
                f"shard directory {d} does not exist. Fix: create it with `rwray data prepare digits --out {d}` "
                "(or another source), or point to an existing shard directory"
            )
        if not path.is_file():
            raise DataError(
                f"{path} is missing: {d} is not a prepared shard directory (or preparing it never finished). "
                f"Fix: run `rwray data prepare <source> --out {d} --overwrite`"
            )
        raw = path.read_bytes()
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(
                f"{path} is not valid JSON ({e}). Fix: re-create the directory with "
                f"`rwray data prepare <source> --out {d} --overwrite`"
            ) from e
        required = ("format", "classes", "num_classes", "image_shape", "columns", "splits", "mean", "std")
        missing = [k for k in required if not isinstance(data, dict) or k not in data]
        if missing or data.get("format") != FORMAT:
            problem = f"lacks {missing}" if missing else f"has format {data.get('format')!r}, expected {FORMAT!r}"
            raise DataError(
                f"{path} {problem}. Fix: re-create the directory with "
                f"`rwray data prepare <source> --out {d} --overwrite`"
            )
        return cls(d, data, raw)

    # -- contents
    @property
    def eval_splits(self) -> list[str]:
        """Every split but train, in manifest order (val, test, and any extra test sets a builder adds)."""
        return [s for s in self.data["splits"] if s != "train"]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.data["image_shape"]
        return int(c), int(h), int(w)

    @property
    def columns(self) -> list[str]:
        return list(self.data["columns"])

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.columns if c not in BASE_COLUMNS]

    @property
    def mean(self) -> list[float]:
        return list(self.data["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.data["std"])

    def split(self, name: str) -> dict[str, Any]:
        try:
            return self.data["splits"][name]
        except KeyError:
            have = sorted(self.data["splits"])
            raise DataError(f"{self.dir / MANIFEST} has no split {name!r}; it has {have}") from None

    def num_samples(self, split: str) -> int:
        return int(self.split(split)["num_samples"])

    def class_counts(self, split: str = "train") -> list[int]:
        return [int(v) for v in self.split(split)["class_counts"]]

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.dir / s["file"]) for s in self.split(split)["shards"]]

    def data_info(self) -> "DataInfo":
        from rwray.datainfo import DataInfo

        return DataInfo(
            num_classes=self.num_classes,
            class_counts=tuple(self.class_counts("train")),
            image_shape=self.image_shape,
            num_train=self.num_samples("train"),
            extra_columns=tuple(self.extra_columns),
        )


# ------------------------------------------------------------------------------------------------------------- verify


def _column_range(pf: pq.ParquetFile, column: str) -> tuple[int, int] | None:
    """(min, max) of an integer column from row-group statistics; reads the column only if statistics are absent."""
    md = pf.metadata
    if md.num_rows == 0:
        return None
    j = pf.schema_arrow.get_field_index(column)
    lo, hi = None, None
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(j).statistics
        if stats is None or not stats.has_min_max:
            values = pf.read(columns=[column]).column(0)
            return int(pc.min(values).as_py()), int(pc.max(values).as_py())
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return int(lo), int(hi)


def verify(dir: Path | str, checksums: bool = True) -> Manifest:
    """Check a shard directory end to end; returns its Manifest or raises one DataError listing every problem.

    ``checksums=False`` skips hashing the shards (the slow part on big datasets); the structural checks (files present,
    Parquet footers readable, image width, label range, class counts) always run and read only footers.
    """
    m = Manifest.load(dir)  # missing directory / manifest / bad JSON: nothing else can be checked, raise now
    d = m.dir
    src = m.data.get("source")
    source = src.get("name", "<source>") if isinstance(src, dict) else "<source>"
    redo = f"re-create it with `rwray data prepare {source} --out {d} --overwrite`"
    width = math.prod(m.image_shape)
    k = m.num_classes
    problems: list[str] = []

    extra_splits = sorted(set(m.data["splits"]) - set(SPLITS))  # a source's extra test sets: checked the same way
    for split in (*SPLITS, *extra_splits):
        if split not in m.data["splits"]:
            problems.append(f"{MANIFEST}: split {split!r} is missing. Fix: {redo}")
            continue
        for shard in m.split(split)["shards"]:
            name = shard["file"]
            path = d / name
            if not path.is_file():
                problems.append(f"{name}: listed in the manifest but missing from {d}. Fix: restore it or {redo}")
                continue
            if checksums:
                actual = _sha256(path)
                if actual != shard["sha256"]:
                    problems.append(
                        f"{name}: sha256 mismatch (manifest expects {shard['sha256'][:12]}..., "
                        f"file has {actual[:12]}...): "
                        f"the file changed after it was written. Fix: {redo}"
                    )
            try:
                pf = pq.ParquetFile(path)
                schema = pf.schema_arrow
            except Exception as e:  # truncated file, bad magic, corrupt footer
                problems.append(
                    f"{name}: pyarrow cannot read it ({type(e).__name__}: {e}); it is truncated or corrupt. Fix: {redo}"
                )
                continue
            if schema.names != m.columns:
                problems.append(f"{name}: columns {schema.names} differ from the manifest's {m.columns}. Fix: {redo}")
            if pf.metadata.num_rows != shard["rows"]:
                problems.append(f"{name}: {pf.metadata.num_rows} rows, manifest says {shard['rows']}. Fix: {redo}")
            if "image" in schema.names:
                t = schema.field("image").type
                got = t.list_size if pa.types.is_fixed_size_list(t) else None
                if got != width:
                    problems.append(
                        f"{name}: image column is {t} (width {got}), expected fixed-size list of {width} = C*H*W "
                        f"for image_shape {list(m.image_shape)}. Fix: {redo}"
                    )
            for col in ("label", "clean_label"):
                if col not in schema.names:
                    continue
                try:
                    span = _column_range(pf, col)
                except Exception as e:
                    problems.append(f"{name}: cannot read column {col} ({type(e).__name__}: {e}). Fix: {redo}")
                    continue
                if span is not None and (span[0] < 0 or span[1] >= k):
                    problems.append(
                        f"{name}: {col} values span [{span[0]}, {span[1]}], outside [0, {k}) for {k} classes. "
                        f"Fix: {redo}"
                    )

    if "train" in m.data["splits"]:
        counts = m.class_counts("train")
        if len(counts) != k:
            problems.append(f"{MANIFEST}: train class_counts has {len(counts)} entries for {k} classes. Fix: {redo}")
        empty = [m.classes[c] if c < len(m.classes) else str(c) for c, n in enumerate(counts) if n == 0]
        if empty:
            problems.append(
                f"{MANIFEST}: class(es) {empty} have zero training samples; methods that divide by class counts fail. "
                f"Fix: {redo} with a smaller imbalance factor or a larger source"
            )

    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"shard directory {d} failed verification ({len(problems)} problem(s)):\n{lines}")
    return m
