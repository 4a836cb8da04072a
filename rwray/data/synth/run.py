"""`synthesize`: check the request, plan the dataset, write it into ``<out>.partial``, rename it onto ``<out>``.

Nothing is written before every argument is checked. An interrupted or failed run removes its ``.partial`` folder
(and a later run replaces a stale one it left), so ``<out>`` itself only ever appears complete.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from rwray.data.atomic import move_into_place
from rwray.data.synth.images import write_images
from rwray.data.synth.plan import Args, Synthesized
from rwray.data.synth.profile import scaled
from rwray.data.synth.specs import SYNTHS
from rwray.errors import ConfigError, DataError

MARKER = ".rwray-synth-partial"  # inside <out>.partial while it is being written: ours to replace
PATH_KEYS = ("root", "image_root", "imagenet_a_root", "clusters_csv")  # source entries that are paths
MAX_SIZE = 4096
BLOCK = 4096  # a small file takes at least one filesystem block


def estimated_bytes(images: int, size: int) -> int:
    """Disk ``images`` files of shorter side ``size`` take: ~650 + 0.33 bytes per pixel each (measured: 1.1 KiB at
    32 px, 25 KiB at 256 px, quality 90) at a 4:3 aspect, rounded up to whole blocks."""
    per_image = 650 + 0.33 * size * size * 4 / 3
    return int(images * (-(-per_image // BLOCK) * BLOCK))


def expected_images(spec, scale: float, classes: int | None) -> int:
    """Images a request writes, from the published split sizes (every split at least one image, train at least one
    per class): known before anything is planned."""
    k = classes or spec.classes
    return sum(scaled(n, scale, floor=k if s in ("train", "noisy_train") else 1) for s, n in spec.splits.items())


def check_args(name: str, scale: float, size: int, classes: int | None, seed: int, workers: int | None) -> list[str]:
    """Every problem of a request at once (empty: none)."""
    problems = []
    if name not in SYNTHS:
        problems.append(f"unknown dataset {name!r}; choose one of: {', '.join(SYNTHS)}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        problems.append(f"--scale must be a number > 0 (1: the published size), got {scale}")
    if not 8 <= size <= MAX_SIZE:
        problems.append(f"--size must be between 8 and {MAX_SIZE} pixels (the shorter side of every image), got {size}")
    if classes is not None:
        if classes < 2:
            problems.append(f"--classes must be >= 2, got {classes}")
        elif name in SYNTHS and not SYNTHS[name].reclass:
            problems.append(f"--classes does not apply to {name}: its reader has a fixed class set "
                            f"({SYNTHS[name].classes} classes)")
    if seed < 0:
        problems.append(f"--seed must be >= 0, got {seed}")
    if workers is not None and workers < 1:
        problems.append(f"--workers must be >= 1, got {workers}")
    return problems


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is a file; choose another --out")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise DataError(f"{out} already holds files; choose another --out, or pass --overwrite to replace them")
    partial = _partial(out)
    if partial.exists() and not (partial / MARKER).exists():
        raise DataError(f"{partial} exists and was not left by rwray data synth; move it away or choose another "
                        "--out")


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _existing(path: Path) -> Path:
    """The nearest folder of ``path`` (itself or an ancestor) that exists: where its disk space is measured."""
    while not path.exists():
        path = path.parent
    return path


def synthesize(name: str, out: str | Path, *, scale: float = 1.0, size: int = 32, classes: int | None = None,
               seed: int = 0, workers: int | None = None, overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Synthesized:
    """Write dataset ``name`` (a key of SYNTHS) in its real on-disk format under ``out``; -> what was written.

    scale: every split size and per-class count times this (every class keeps a train image); size: the shorter
    side of every image; classes: the same number of images per split over this many classes; workers: processes
    encoding images (None: one per CPU); progress(done, total): images written so far.
    Raises ConfigError (bad arguments) or DataError (an occupied ``out``) before writing anything."""
    if problems := check_args(name, scale, size, classes, seed, workers):
        raise ConfigError(problems, "rwray data synth")
    out = Path(out).expanduser().absolute()
    check_out(out, overwrite)
    spec = SYNTHS[name]
    n_images = expected_images(spec, scale, classes)
    need, free = estimated_bytes(n_images, size), shutil.disk_usage(_existing(out)).free
    if need > free:
        raise DataError(f"{name} at --scale {scale} --size {size} is about {n_images:,} images, {need / 2**30:,.1f} "
                        f"GiB on disk, and {_existing(out)} has {free / 2**30:,.1f} GiB free; lower --scale or --size, "
                        "or choose another --out")
    t0 = time.perf_counter()
    plan = spec.plan(Args(scale=float(scale), size=int(size), classes=classes, seed=int(seed)))
    partial = _partial(out)
    if partial.exists():  # a stale one of ours (check_out made sure): start afresh
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        (partial / MARKER).write_text("rwray data synth is writing this folder; it is incomplete\n")
        for d in plan.dirs:
            (partial / d).mkdir(parents=True, exist_ok=True)
        for rel, text in plan.texts.items():
            path = partial / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        written = write_images(partial, plan.files, plan.label_array(), plan.size_array(), seed, workers, progress)
        (partial / MARKER).unlink()
        move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    source = {k: (str(out / v) if k in PATH_KEYS else v) for k, v in plan.source.items()}
    source = {k: (os.path.normpath(v) if k in PATH_KEYS else v) for k, v in source.items()}
    return Synthesized(name, str(out), source, dict(plan.splits), list(plan.train_counts), plan.num_classes,
                       files=len(plan.files), bytes=written, seconds=time.perf_counter() - t0, notes=list(plan.notes))
