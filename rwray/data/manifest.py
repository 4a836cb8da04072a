"""The on-disk shard format and its reader: deterministic Parquet shards + a JSON manifest, the one format every
trainer and worker reads.

Layout of a shard directory:
    manifest.json                 sorted keys, no timestamps: same inputs + seed => same bytes
    train-00000.parquet ...       columns: image (fixed-size list<uint8>[C*H*W], CHW flattened), label, index, extras
                                  (``"encoding": "jpeg"``: image is the file's bytes, binary; row groups listed per
                                  shard: `rwray.data.imagewrite`)
    val-00000.parquet ...
    test-00000.parquet ...
    <extra>-00000.parquet ...     a source's extra test sets (e.g. test_unbiased), same columns

``index`` is the sample's position in the source's train pool (train and val) or test array (test, and each extra
test set in its own array), so the same image keeps the same id whatever imbalance, noise or seed selected it.

Written by `rwray.data.write.prepare`, checked by `rwray.data.checks.verify`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwray.datainfo import DataInfo
from rwray.errors import DataError

FORMAT = "rwray-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
BASE_COLUMNS = ("image", "label", "index")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks: what the manifest records per shard and `verify` compares."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

    @property
    def encoded(self) -> bool:
        """Images stored as encoded files (JPEG bytes, `rwray.data.imagewrite`) rather than uint8 arrays."""
        return self.data.get("encoding", "raw") != "raw"

    def row_groups(self, split: str) -> list[tuple[str, int, int]]:
        """The split's row groups in storage order: (file path, group number in the file, rows) — the units the
        streaming input reads. Array shards have one group per file."""
        out = []
        for s in self.split(split)["shards"]:
            for g, rows in enumerate(s.get("row_groups", [s["rows"]])):
                out.append((str(self.dir / s["file"]), g, int(rows)))
        return out

    def column_max(self, column: str) -> int:
        """The largest value of an int column over every split, from the Parquet footers' statistics (-1 if none)."""
        import pyarrow.parquet as pq

        top = -1
        for split in self.data["splits"]:
            for path in self.shard_paths(split):
                md = pq.ParquetFile(path).metadata
                j = md.schema.to_arrow_schema().get_field_index(column)
                for g in range(md.num_row_groups):
                    stats = md.row_group(g).column(j).statistics
                    if stats is not None and stats.has_min_max:
                        top = max(top, int(stats.max))
        return top

    def data_info(self, crop_size: int | None = None) -> DataInfo:
        """What models and methods see; for encoded images the input is the (square) crop of side ``crop_size``."""
        shape = (self.image_shape[0], crop_size, crop_size) if self.encoded and crop_size else self.image_shape
        return DataInfo(
            num_classes=self.num_classes,
            class_counts=tuple(self.class_counts("train")),
            image_shape=shape,
            num_train=self.num_samples("train"),
            extra_columns=tuple(self.extra_columns),
        )
