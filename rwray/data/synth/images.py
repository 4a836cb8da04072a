"""Learnable synthetic photos: a class's colour pair and stripe pattern, per-image jitter and noise, written as JPEGs
by a process pool, one task per chunk of files.

A class c has a signature that depends on c alone (not on the dataset, the seed or the class count):

    mean colour m_c  = 50 + 155 * frac(c * alpha)        alpha: the R3 low-discrepancy vector (Roberts 2018), so
                                                         any first K classes' colours are spread over the RGB cube
    stripe colour d_c, orientation theta_c, frequency f_c: drawn from numpy.random.default_rng([SALT, c])

    image[y, x] = m_c + d_c * sin(2 pi f (x cos theta + y sin theta) / short_side + phase) + brightness + noise

with per-image phase, +-10 % frequency, +-0.15 rad orientation, +-6 brightness and Gaussian noise (sigma 8). The
stripes average out over an image, so an image's mean colour sits within a few units of m_c: `mean_colour` is the
check a test decodes an image for. Everything an image gets comes from its chunk's generator
``default_rng([seed, chunk])``, and chunks are fixed ranges of the file list, so a seed gives the same bytes
whatever the number of workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

SALT = 0x5E17
ALPHA = np.array([0.8191725134, 0.6710436067, 0.5497004779])  # R3: 1/phi3, 1/phi3^2, 1/phi3^3 (phi3^4 = phi3 + 1)
STRIPE = 45.0  # |d_c|: stripe amplitude per channel vector (m_c +- d_c stays inside [5, 250])
NOISE = 8.0
JPEG_QUALITY = 90
CHUNK = 512  # files per pool task: big enough to amortise a task, small enough for a smooth progress bar
AUTO_FILES_PER_WORKER = 4096  # workers=None: a spawned worker costs ~1 s to start, worth it past a few thousand files


@dataclass(frozen=True)
class Signature:
    mean: np.ndarray  # [3] float64 RGB in [50, 205]
    stripe: np.ndarray  # [3] float64, norm STRIPE
    theta: float  # radians
    freq: float  # cycles per short side


def signature(c: int) -> Signature:
    """Class c's colours and stripes (a pure function of c)."""
    rng = np.random.default_rng([SALT, int(c)])
    mean = 50.0 + 155.0 * np.modf((c + 1) * ALPHA)[0]
    d = rng.normal(size=3)
    return Signature(mean, STRIPE * d / np.linalg.norm(d), float(rng.uniform(0, np.pi)), float(rng.uniform(1.5, 4.5)))


def mean_colour(c: int) -> np.ndarray:
    """[3] the RGB mean an image of class c decodes to, up to jitter and JPEG error (a few units)."""
    return signature(c).mean


def render(sig: Signature, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """[height, width, 3] uint8: one image of the class with signature ``sig``."""
    short = min(width, height)
    theta = sig.theta + rng.uniform(-0.15, 0.15)
    freq = sig.freq * rng.uniform(0.9, 1.1)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    wave = np.sin((2 * np.pi * freq / short) * (x * np.cos(theta) + y * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    base = (sig.mean + rng.uniform(-6, 6)).astype(np.float32)
    img = base + wave[..., None] * sig.stripe.astype(np.float32) + rng.normal(0, NOISE, (height, width, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _write_chunk(root: str, chunk: int, seed: int, files: list[str], labels: np.ndarray, sizes: np.ndarray) -> int:
    """Write one chunk (files [n] relative to root, labels [n], sizes [n, 2] as (width, height)); -> bytes written."""
    rng = np.random.default_rng([seed, chunk])
    sigs: dict[int, Signature] = {}
    written = 0
    made: set[str] = set()
    for rel, c, (w, h) in zip(files, labels.tolist(), sizes.tolist()):
        sig = sigs.get(c) or sigs.setdefault(c, signature(c))
        path = os.path.join(root, rel)
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        buf = io.BytesIO()
        Image.fromarray(render(sig, w, h, rng)).save(buf, format="JPEG", quality=JPEG_QUALITY)
        with open(path, "wb") as f:
            written += f.write(buf.getbuffer())
    return written


def geometry(n: int, short: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 2] int64 (width, height): the shorter side ``short``, aspect ratios like photos' (1, 5:4, 4:3, 3:2),
    three in four landscape."""
    aspect = rng.choice([1.0, 1.25, 4 / 3, 1.5], size=n, p=[0.15, 0.2, 0.4, 0.25])
    long = np.floor(short * aspect + 0.5).astype(np.int64)
    landscape = rng.random(n) < 0.75
    return np.stack([np.where(landscape, long, short), np.where(landscape, short, long)], axis=1)


def write_images(root: Path, files: list[str], labels: np.ndarray, sizes: np.ndarray, seed: int,
                 workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> int:
    """Write every image (files [N] relative to ``root``, labels [N] signature classes, sizes [N, 2]) with a spawn
    pool of ``workers`` processes (None: one per CPU, fewer for a few thousand files), one task per CHUNK files;
    -> bytes written.
    ``progress(done, total)`` is called after each chunk."""
    n = len(files)
    spans = [(k, s, min(s + CHUNK, n)) for k, s in enumerate(range(0, n, CHUNK))]
    if workers is None:
        workers = min(os.cpu_count() or 1, n // AUTO_FILES_PER_WORKER)
    workers = min(workers, max(1, len(spans)))
    done = total_bytes = 0
    if progress is not None:
        progress(0, n)
    args = [(str(root), k, seed, files[a:b], labels[a:b], sizes[a:b]) for k, a, b in spans]
    if workers <= 1:
        for job, (_, a, b) in zip(args, spans):
            total_bytes += _write_chunk(*job)
            done += b - a
            if progress is not None:
                progress(done, n)
        return total_bytes
    # spawn: a fresh interpreter per worker (nothing forked from a caller's threads, e.g. a progress bar's)
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_write_chunk, *job): b - a for job, (_, a, b) in zip(args, spans)}
        for fut in cf.as_completed(futures):
            total_bytes += fut.result()
            done += futures[fut]
            if progress is not None:
                progress(done, n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return total_bytes
