"""Paths named in a job stay inside the roots they belong to.

A job names two roots: ``data.dir`` (shards, read) and ``output_dir`` (checkpoints, the local MLflow store, written).
Everything rwray reads or writes on the job's behalf resolves (symlinks followed, ``..`` collapsed) to a place
inside one of them: ``resume=`` inside output_dir, every shard file the manifest lists inside data.dir, the run
name a single path component under output_dir/ray (any Unicode name: Ray sees only its `ray_safe` form). A root
itself may be a symlink (``data.dir: /data`` -> ``/mnt/big``): the check is made against the resolved root, so only
what escapes it is refused.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Iterable

from rwray.errors import DataError, PathError
from rwray.text import some


def inside(root: str | Path, path: str | Path) -> bool:
    """True when ``path`` resolves (following every symlink) to ``root`` or below it."""
    r = Path(root).expanduser().resolve()
    p = Path(path).expanduser().resolve()
    return p == r or r in p.parents


def require_inside(root: str | Path, path: str | Path, field: str, fix: str) -> Path:
    """The resolved ``path``; raises PathError naming ``field`` when it leaves ``root``."""
    p = Path(path).expanduser().resolve()
    if not inside(root, p):
        shown = Path(path).expanduser()
        via = f" (it resolves to {p})" if p != shown.absolute() else ""
        raise PathError(f"{field}={shown} is outside {Path(root).expanduser().resolve()}{via}. {fix}")
    return p


def safe_component(name: str, field: str) -> str:
    """``name`` as one directory name: it becomes output_dir/ray/<name>-<id>, so it may not walk out of it."""
    bad = [c for c in ("/", "\\", "\0") if c in name]
    if bad or name in ("", ".", "..") or name.startswith(".") or len(name) > 200:
        why = (f"contains {', '.join(repr(c) for c in bad)}" if bad else
               "is empty" if not name else "is longer than 200 characters" if len(name) > 200 else
               "starts with '.'")
        raise PathError(f"{field}={name!r} {why}: it names a folder under output_dir/ray, so it must be one plain "
                        f"folder name. Fix: use letters, digits, '-', '_' or spaces, e.g. {field}=my-run")
    return name


_NOT_RAY_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RAY_STEM_MAX = 120  # + "-<hash>" + "-<run id>" stays far below the 255 bytes a folder name may have


def ray_safe(name: str) -> str:
    """``name`` as Ray may see it (Ray Train/Tune run names, the folders under output_dir/ray and /tune): ASCII
    letters, digits, '.', '_', '-' only, because Ray encodes run names as ASCII (its metrics tags). Accents are
    dropped (NFKD: 'Café' -> 'Cafe'), every other run of characters becomes '-'. A name that had to change gets
    8 hex digits of its SHA-256 appended, so two different names never share a Ray folder; one with nothing left
    becomes 'run-<hash>'. An ASCII name of those characters comes back unchanged. MLflow keeps the real name."""
    kept = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    stem = _NOT_RAY_SAFE.sub("-", kept).strip("-.")[:_RAY_STEM_MAX].rstrip("-.")
    if stem == name and stem:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem or 'run'}-{digest}"


def check_shard_files(data_dir: str | Path, files: Iterable[str]) -> None:
    """Every file a manifest lists must resolve inside the shard directory (no ``../`` entries, no symlink that
    leads elsewhere): a manifest or a link planted in a shared folder must not make a job read arbitrary files."""
    root = Path(data_dir).expanduser().resolve()
    escaped = []
    for name in files:
        path = root / name
        if not inside(root, path):
            link = f" (a symlink to {path.resolve()})" if path.is_symlink() else f" (resolves to {path.resolve()})"
            escaped.append(f"{name}{link}")
    if escaped:
        raise DataError(f"shard directory {root} lists files outside itself ({len(escaped)}): {some(escaped)}. "
                        f"Shards are read only from inside data.dir. Fix: copy the real files into {root} (replacing "
                        f"the links), or re-create it with `rwray data prepare <source> --out {root} --overwrite`")
