"""Writing a shard directory atomically: refuse an occupied output, assemble in a temporary sibling, rename into
place. Shared by the array writer (`rwray.data.write`) and the image writer (`rwray.data.imagewrite`)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rwray.data.manifest import MANIFEST
from rwray.errors import DataError


def dump_manifest(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()


def check_out(out: Path, overwrite: bool) -> None:
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


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed onto ``out`` when the block completes; removed on any
    failure (or Ctrl-C), so ``out`` holds either its previous contents or the complete new ones, never half."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # same filesystem: rename is atomic
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, out: Path) -> None:
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
