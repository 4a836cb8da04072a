"""`verify`: check a shard directory end to end against its manifest (files present, checksums, Parquet footers,
columns, image width, label range, class counts) and report every problem at once in one DataError.

`class_count_problems` is the class-count rule itself, shared with `prepare` (`rwray.data.splits` for array sources,
`rwray.data.imagewrite` for image files), which applies it to the counts it knows before reading any image, so it
refuses, with the same words, a set `verify` would reject; `check_staged` runs `verify` on what `prepare` wrote before
it is moved into place, so a directory `prepare` reports as written is one `verify` accepts.

Named checks.py rather than verify.py so that `rwray.data.verify` (the function the package exports) does not
shadow a submodule of the same name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rwray.data.manifest import MANIFEST, SPLITS, Manifest, file_sha256
from rwray.errors import DataError
from rwray.text import plural, some

MAX_PROBLEMS_SHOWN = 50  # verify's message lists this many problems, then a count


def class_count_problems(counts: Sequence[int], classes: Sequence[str], num_classes: int) -> list[str]:
    """What is wrong with a train split's per-class counts [K] (empty: nothing), as sentences without a fix: each
    caller adds its own (`verify`: re-create the directory; `prepare`: nothing was written).

    A class without training samples is refused because class-count methods (class-balanced losses, Balanced
    Softmax's log n_c, LDAM margins, class-aware sampling) divide by or take the log of n_c."""
    out = []
    if len(counts) != num_classes:
        out.append(f"train class_counts has {len(counts)} entries for {num_classes} classes")
    empty = [classes[c] if c < len(classes) else str(c) for c, n in enumerate(counts) if n == 0]
    if empty:
        out.append(f"{plural(len(empty), 'class', 'classes')} {'has' if len(empty) == 1 else 'have'} zero training "
                   f"samples: {some(empty)}; methods that divide by class counts fail, so every class needs at least "
                   "one (a smaller imbalance factor or noise rate, a larger source, or training images for them)")
    return out


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
    missing: list[str] = []  # shard files listed but absent: one problem for all (a partial copy loses thousands)

    extra_splits = sorted(set(m.data["splits"]) - set(SPLITS))  # a source's extra test sets: checked the same way
    for split in (*SPLITS, *extra_splits):
        if split not in m.data["splits"]:
            problems.append(f"{MANIFEST}: split {split!r} is missing. Fix: {redo}")
            continue
        for shard in m.split(split)["shards"]:
            name = shard["file"]
            path = d / name
            if not path.is_file():
                missing.append(name)
                continue
            if checksums:
                actual = file_sha256(path)
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
            if "image" in schema.names and m.encoded:
                if not pa.types.is_binary(schema.field("image").type):
                    problems.append(f"{name}: image column is {schema.field('image').type}, expected binary "
                                    f"(encoded image bytes). Fix: {redo}")
                groups = shard.get("row_groups", [])
                if [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)] != groups:
                    problems.append(f"{name}: row groups differ from the manifest's {groups[:8]}. Fix: {redo}")
            elif "image" in schema.names:
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
                low = -1 if col == "clean_label" else 0  # -1: the clean label is unknown (Clothing1M's noisy train)
                if span is not None and (span[0] < low or span[1] >= k):
                    problems.append(
                        f"{name}: {col} values span [{span[0]}, {span[1]}], outside [{low}, {k}) for {k} classes. "
                        f"Fix: {redo}"
                    )

    if missing:
        many = f" ({len(missing)} shard files)" if len(missing) > 1 else ""
        problems.insert(0, f"{some(missing)}{many}: listed in the manifest but missing from {d}. "
                           f"Fix: restore {'them' if many else 'it'} or {redo}")

    if "train" in m.data["splits"]:
        counts = m.class_counts("train")
        problems += [f"{MANIFEST}: {p}. Fix: {redo}" for p in class_count_problems(counts, m.classes, k)]

    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        lines = "\n".join(f"  - {p}" for p in shown)
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(f"shard directory {d} failed verification ({len(problems)} problem(s)):\n{lines}{more}")
    return m


def check_staged(staged: Path, out: Path) -> None:
    """`verify`'s structural checks (no re-hashing: the checksums were just taken from these files) on a directory
    `prepare` assembled, before it replaces ``out``; its failure is a bug in the writer, never a set left on disk."""
    try:
        verify(staged, checksums=False)
    except DataError as e:
        raise DataError(f"refusing to write {out}: the shards prepared for it fail verification, so nothing was "
                        f"written. This is a bug in rwray's writer; please report it with the command you ran.\n{e}"
                        ) from None
