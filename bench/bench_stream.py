"""The streaming image input (`rwray.train.stream`, through the worker's own `rwray.train.inputs.Data`) against a
torch DataLoader over the same JPEG files, CPU, measured side by side in one run.

Data: generated once into a cache folder (RWRAY_BENCH_CACHE, default /tmp/rwray-bench-stream): image_folder layouts
of N and 4N JPEGs of random sizes 96-160 px (10 classes), each prepared once by `rwray.data.prepare` into
JPEG-bytes shards with rows_per_group 256.

1. Decode + augment throughput (samples/s): one epoch of rank 0 of world 1 at batch 128, consumed to the end.
   stream = `Data.train(epoch)` of the worker's input object (built from a Config: data.stream=stream, k decoding
   actors of ACTOR_CPUS each in its `DecoderPool`, started when `Data` is built and kept for the run): the epoch
   plan's pieces decoded on the actors, rebatched, then `Images` (uint8 -> normalised float) in this process.
   DataLoader = torch DataLoader(num_workers=k, batch 128) over a map-style Dataset reading the same JPEG files
   from the image folder in the same (plan) order, applying the same `Decoder` (same ImageTransform, same
   per-sample seed (seed, epoch, index)), then the same `Images`: byte-identical batches (checked). Its workers
   are forked every epoch (no persistent_workers: the dataset's epoch seeds the crops).
   Alternated (the order rotated every repeat) after one untimed warm-up epoch each; Ray is started once before
   (`ray.init(address="local", num_cpus=CPUS)`), its start-up excluded. Ratio per repeat (paired), median, range.
2. Peak RSS (VmHWM) of a fresh "train worker" process that joins the same Ray cluster, builds `Data` and consumes
   one epoch (summing every batch), at N and 4N images; its decoding actors' peak RSS (polled with psutil); for
   contrast, a fresh process that decodes the same images into one in-memory array.
3. Time to first batch: from `Data.train` / `iter(DataLoader)` to the first batch in hand, every epoch; and for the
   run's first epoch, from building `Data` (the actors' start-up) to its first batch.
Diagnostics: the same reader in the train process (data.decode_actors=0); the rate after the first batch; an epoch
of (almost) nothing; and the previous engine, Ray Data `map_batches` on an actor pool (rwray before c834444,
reproduced here), which started a new actor pool every epoch.

    .venv/bin/python bench/bench_stream.py            # docs/benchmarks-stream.md, bench/out/stream/results.json
    .venv/bin/python bench/bench_stream.py --quick    # a small smoke run (~1.5 min) -> bench/out/stream/quick.md
    .venv/bin/python bench/bench_stream.py --render-only [--doc FILE]   # the doc again from the saved results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "stream"
DOC = ROOT / "docs" / "benchmarks-stream.md"
CACHE = Path(os.environ.get("RWRAY_BENCH_CACHE", "/tmp/rwray-bench-stream"))
DATA_VERSION = 1  # bump when the generated images change
CLASSES = 10
SIDES = (96, 160)  # random height and width of each JPEG, px
BATCH = 128
ACTORS = 2  # k: decoding actors of the stream = DataLoader workers
ACTOR_CPUS = 0.5  # fractional: the pool's k actors and the previous engine's k fit CPUS (else Ray waits forever)
CPUS = 2  # ray.init(num_cpus=...)
SETTLE_S = 1.5  # pause between epochs: one variant's teardown (Ray killing actors, refilling its worker pool) is
# not timed as the next one's
EPOCH_TIMEOUT_S = 300  # an epoch that takes longer is stuck (e.g. actors waiting for CPUs): stop with tracebacks
SEED = 0
GOAL_RATIO = 0.9  # stream / DataLoader samples/s
GOAL_RSS = 1.1  # RSS(4N) / RSS(N)

# n: N (RSS at N and 4N); throughput: (crop, samples an epoch (N or 4N), timed repeats) each; diagnostics: the
# in-process reader, the empty epoch and the previous Ray Data engine; contrast: the in-memory RSS
FULL = {"n": 1000, "throughput": [(64, 4000, 8), (224, 1000, 6)], "rss_crop": 224, "diagnostics": True,
        "contrast": True}
RAY_DATA_REPEATS = 3  # the previous engine runs in the first rounds only (5-15 s an epoch, far from the goal)
QUICK = {"n": 500, "throughput": [(64, 500, 3)], "rss_crop": 64, "diagnostics": False, "contrast": False}


# ------------------------------------------------------------------------------------------------------ the data


def image_folder(n_train: int) -> Path:
    """root/{train,val,test}/class_<c>/*.jpg: n_train train images (n_train / CLASSES a class), 2 a class in val and
    test. Smooth random colour fields plus mild noise (JPEG sizes like small photos, ~9 KB), quality 90."""
    from PIL import Image

    root = CACHE / f"folder-v{DATA_VERSION}-{n_train}"
    if (root / ".done").is_file():
        return root
    rng = np.random.default_rng(n_train)
    for split, per in (("train", n_train // CLASSES), ("val", 2), ("test", 2)):
        for c in range(CLASSES):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                h, w = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
                coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
                img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)
    (root / ".done").write_text("")
    return root


def shards(n_train: int):
    """The image folder prepared once (rows_per_group 256) -> its Manifest."""
    from rwray.data import Manifest, prepare
    from rwray.data.imagesources.folder import ImageFolderParams
    from rwray.data.splits import BuilderParams

    out = CACHE / f"shards-v{DATA_VERSION}-{n_train}"
    if not (out / "manifest.json").is_file():
        prepare(ImageFolderParams(root=image_folder(n_train)), out, BuilderParams(rows_per_group=256))
    return Manifest.load(out)


def build_data(manifest_dir: str, crop: int, actors: int):
    """The worker's input object (`rwray.train.inputs.Data`) for rank 0 of world 1, streaming, on CPU."""
    import torch

    from rwray import config as C
    from rwray.data import Manifest
    from rwray.train.inputs import Data

    cfg = C.validate({"data": {"dir": manifest_dir, "augment": "rrc_flip", "crop_size": crop, "stream": "stream",
                               "batch_size": BATCH, "decode_actors": actors, "decode_cpus": ACTOR_CPUS},
                      "model": {"name": "small_cnn"}, "train": {"seed": SEED}}, "bench_stream")
    return Data(cfg, Manifest.load(manifest_dir), torch.device("cpu"), 0, 1, {})


# ------------------------------------------------------------------------------------------------ the DataLoader


class FolderImages:
    """Map-style dataset over the image folder's train files: read the file, the same `Decoder` with the same
    per-sample seed as the stream's actors; -> {"image": [3, S, S] uint8, "label", "index"}."""

    def __init__(self, files: list[str], labels: np.ndarray, index: np.ndarray, transform, epoch: int):
        self.files, self.labels, self.index, self.transform, self.epoch = files, labels, index, transform, epoch
        self._decode = None  # built in each worker process on first use

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        from rwray.data.decode import Decoder

        if self._decode is None:
            self._decode = Decoder(self.transform, True)
        with open(self.files[i], "rb") as f:
            data = f.read()
        img = self._decode([data], self.index[i:i + 1], SEED, self.epoch)[0]
        return {"image": torch.from_numpy(img), "label": int(self.labels[i]), "index": int(self.index[i])}


def loader_setup(manifest):
    """(listing of the train split, plan row id -> listing position): the DataLoader reads the files in the order
    the stream's epoch plan reads their shard rows."""
    import pyarrow.parquet as pq

    from rwray.data.imagesources.folder import ImageFolderParams, build_image_folder

    listing = build_image_folder(ImageFolderParams(**manifest.data["source"])).splits["train"]
    stored = pq.read_table(manifest.shard_paths("train"), columns=["index"]).column("index").to_numpy()
    pos = {int(v): i for i, v in enumerate(listing.index)}
    return listing, np.array([pos[int(v)] for v in stored])  # [rows in storage order] -> listing position


def loader_batches(listing, to_pos, data, epoch: int, workers: int, nice: int):
    """One epoch of the DataLoader: the plan's order, same transform and seeds, workers at niceness ``nice``;
    -> the worker's Batches."""
    import functools

    import torch

    from rwray.train import plan

    rows = [n for _, _, n in data.splits["train"][0]]
    order = to_pos[plan.epoch_plan(SEED, epoch, rows, 1)[0]]
    transform = data.splits["train"][1].reader_args[2]  # the stream's own ImageTransform
    ds = FolderImages(listing.files, listing.labels, listing.index, transform, epoch)
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=order.tolist(), num_workers=workers,
                                     worker_init_fn=functools.partial(_renice, nice))
    return (data.images(r) for r in dl)


def _renice(nice: int, worker_id: int) -> None:
    os.nice(nice - os.nice(0))


def actor_niceness() -> int:
    """The scheduling niceness of this process's decoding actors (Ray starts worker processes at
    RAY_worker_niceness, 15 by default); 0 when none is found. The DataLoader's workers get the same: as inside a
    Ray Train worker (niced too), whose forked DataLoader workers inherit it. On a busy machine a niced decoder
    gets a far smaller share of the cores than an un-niced one."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if ACTOR_TITLE in " ".join(p.cmdline()):
                return p.nice()
        except psutil.Error:
            pass
    return 0


# ------------------------------------------------------------------------------- the previous engine, for the record


def ray_data_batches(data, epoch: int):
    """rwray's first streaming engine (before c834444), reproduced: the epoch's pieces (whole row groups) through
    Ray Data, `map_batches(PieceReader)` on an `ActorPoolStrategy(size=k)` pool built for this one execution,
    preserve_order, `iter_torch_batches(prefetch_batches=2)`; then the same `Images`."""
    import ray.data

    from rwray.train import plan
    from rwray.train.stream import PieceReader

    groups, stream = data.splits["train"]
    rows = [n for _, _, n in groups]
    items = [{"file": groups[u][0], "group": groups[u][1], "rows": r.tolist(), "epoch": epoch}
             for u, r in plan.pieces(plan.epoch_plan(SEED, epoch, rows, 1)[0], plan.offsets(rows))]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        PieceReader, batch_size=1, batch_format="numpy", fn_constructor_args=stream.reader_args,
        compute=ray.data.ActorPoolStrategy(size=ACTORS), num_cpus=ACTOR_CPUS)
    return (data.images(r) for r in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=2, drop_last=False,
                                                          device="cpu"))


def close(data) -> None:
    """Stop `Data`'s decoding actors now (they hold Ray CPUs), not whenever the handles are collected."""
    import ray

    pool = data.splits["train"][1].pool
    for a in pool.actors if pool is not None else ():
        ray.kill(a)


# ------------------------------------------------------------------------------------------------- timing


def timed_epoch(make, touch: bool = False) -> dict:
    """Build an epoch's batches (``make()``) and consume them: wall, time to first batch, samples, first batch."""
    import faulthandler

    faulthandler.dump_traceback_later(EPOCH_TIMEOUT_S, exit=True)
    t0 = time.perf_counter()
    it = iter(make())
    first_t, first, n, acc = None, None, 0, 0.0
    for b in it:
        if first_t is None:
            first_t, first = time.perf_counter() - t0, b
        n += len(b.y)
        if touch:
            acc += float(b.x.sum())
    wall = time.perf_counter() - t0
    faulthandler.cancel_dump_traceback_later()
    return {"wall": wall, "ttfb": first_t, "n": n, "rate": n / wall,
            "steady": (n - len(first.y)) / (wall - first_t), "first": first}


def throughput(manifest, crop: int, repeats: int, diagnostics: bool = True) -> dict:
    """Stream vs DataLoader (and the previous engine), alternated, the order rotated every repeat; then the
    in-process reader and the empty epoch. -> the raw per-epoch numbers."""
    import torch

    listing, to_pos = loader_setup(manifest)
    t0 = time.perf_counter()
    data = build_data(str(manifest.dir), crop, ACTORS)  # starts the pool; the first epoch waits for it
    nice = [0]  # the actors' niceness, known once they run
    sides = {"stream": lambda e: timed_epoch(lambda: data.train(e)[1]),
             "loader": lambda e: timed_epoch(lambda: loader_batches(listing, to_pos, data, e, ACTORS, nice[0]))}
    if diagnostics:
        sides["ray_data"] = lambda e: timed_epoch(lambda: ray_data_batches(data, e))
    # Warm-up (untimed): the run's first epoch of each (the stream's from building Data), the page cache; and the
    # same-output check.
    warm = {"stream": sides["stream"](0)}
    warm["stream"]["from_build"] = warm["stream"]["ttfb"] + (time.perf_counter() - t0 - warm["stream"]["wall"])
    nice[0] = actor_niceness()
    warm |= {k: f(0) for k, f in sides.items() if k != "stream"}
    firsts = [w.pop("first") for w in warm.values()]
    same = all(torch.equal(f.x, firsts[0].x) and torch.equal(f.index, firsts[0].index) for f in firsts[1:])
    runs = {k: [] for k in sides}
    for r in range(repeats):
        names = [k for k in sides if k != "ray_data" or r < RAY_DATA_REPEATS]
        for k in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(SETTLE_S)
            res = sides[k](r + 1)
            res.pop("first")
            runs[k].append(res)
            print(f"  crop {crop} repeat {r + 1}/{repeats} {k:8s} {res['rate']:6.0f} samples/s, first batch "
                  f"{res['ttfb']:5.2f} s, then {res['steady']:5.0f}/s (load {os.getloadavg()[0]:.1f})", flush=True)
    res = {"crop": crop, "samples": runs["stream"][0]["n"], "runs": runs, "warm": warm, "identical": bool(same),
           "nice": nice[0], "inprocess": None, "floor": None, "floor_ray_data": None}
    if diagnostics:
        res["floor"] = empty_epoch(lambda items: data.splits["train"][1].batches(items, BATCH), data)
    close(data)  # its actors hold Ray CPUs: the previous engine's pool, the next crop's and the RSS runs need them
    if diagnostics:
        res["floor_ray_data"] = empty_epoch(None, data)
        local = build_data(str(manifest.dir), crop, 0)  # the same reader in this process, no Ray
        res["inprocess"] = timed_epoch(lambda: local.train(repeats + 1)[1])
        res["inprocess"].pop("first")
        print(f"  crop {crop}: in-process reader {res['inprocess']['rate']:.0f} samples/s; an epoch of 2 one-row "
              f"pieces: stream {res['floor']:.2f} s, Ray Data {res['floor_ray_data']:.1f} s", flush=True)
    return res


def empty_epoch(batches, data, pieces: int = 2) -> float:
    """An epoch with (almost) nothing to decode: ``pieces`` one-row pieces, build to last row (s). The stream: its
    per-epoch cost on the kept pool. ``batches=None``: the previous engine (a new Ray Data actor pool)."""
    import ray.data

    from rwray.train.stream import PieceReader

    groups, stream = data.splits["train"]
    items = [{"file": groups[u][0], "group": groups[u][1], "rows": [0], "epoch": 0} for u in range(pieces)]
    t0 = time.perf_counter()
    if batches is None:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PieceReader, batch_size=1, batch_format="numpy", fn_constructor_args=stream.reader_args,
            compute=ray.data.ActorPoolStrategy(size=ACTORS), num_cpus=ACTOR_CPUS)
        batches = lambda _: ds.iter_torch_batches(batch_size=BATCH, device="cpu")  # noqa: E731
    assert sum(len(b["index"]) for b in batches(items)) == pieces
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------------ RSS


def status_mb(key: str, pid: int | str = "self") -> float:
    """A memory line of /proc/<pid>/status in MB: VmHWM (peak RSS of the process's address space), VmRSS (now).
    VmHWM, not ru_maxrss: ru_maxrss survives fork + exec, so a child of this (~1 GB) process would report at least
    this process's peak."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


ACTOR_TITLE = "_Decoder"  # `rwray.train.stream._Decoder`, the pool's actor class


class MemoryWatch(threading.Thread):
    """Polls this process and the decoding actors (processes under the Ray node of ``root_pid`` whose title names
    the actor class) every 0.1 s: each one's peak RSS (VmHWM) and the largest private part of its RSS seen (RssAnon;
    the rest is shared: libraries, and object-store pages the process wrote or read)."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root, self.stop = root_pid, threading.Event()
        self.peaks: dict[int, float] = {}
        self.anon: dict[int | str, float] = {}
        self.before = {p.pid for p in self.readers()}  # an earlier stream's actors, still going away

    def readers(self) -> list:
        """The processes under the Ray node that are decoding actors (Ray titles an actor's process by its class,
        `ray::_Decoder...`; a reused idle worker takes the title when it becomes the actor)."""
        import psutil

        try:
            procs = psutil.Process(self.root).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for p in procs:
            try:
                if ACTOR_TITLE in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            self.anon["self"] = max(self.anon.get("self", 0), status_mb("RssAnon"))
            for p in self.readers():
                try:
                    if p.pid in self.before:
                        continue
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), status_mb("VmHWM", p.pid))
                    self.anon[p.pid] = max(self.anon.get(p.pid, 0), status_mb("RssAnon", p.pid))
                except (OSError, StopIteration):  # gone meanwhile
                    pass
            self.stop.wait(0.1)


def rss_child(manifest_dir: str, crop: int, address: str, ray_root: int, out: str) -> None:
    """A fresh "train worker": join the cluster, build Data, consume one epoch summing every batch."""
    import ray
    import ray.data  # noqa: F401  (imported before the baseline: what stays is the data's, not the imports')
    import torch
    import torchvision.transforms.v2  # noqa: F401

    import rwray.train.inputs  # noqa: F401

    torch.set_num_threads(1)
    ray.init(address=address, log_to_driver=False)
    base = status_mb("VmRSS")
    watch = MemoryWatch(ray_root)  # before `Data`: it starts the actors
    watch.start()
    data = build_data(manifest_dir, crop, ACTORS)
    res = timed_epoch(lambda: data.train(0)[1], touch=True)
    watch.stop.set()
    watch.join()
    Path(out).write_text(json.dumps({
        "peak": status_mb("VmHWM"), "base": base, "anon": watch.anon.pop("self"), "n": res["n"], "wall": res["wall"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "actors": [watch.peaks[p] for p in sorted(watch.peaks)],
        "actors_anon": [watch.anon[p] for p in sorted(watch.peaks)]}))
    ray.shutdown()


def memory_child(manifest_dir: str, crop: int, out: str) -> None:
    """For contrast: the same train images decoded (same transform, epoch 0) into one [N, 3, S, S] uint8 array."""
    import pyarrow.parquet as pq
    import torch

    from rwray.data import Manifest
    from rwray.data.decode import Decoder, ImageTransform

    torch.set_num_threads(1)
    import ray  # noqa: F401  (the same imports as the streaming worker: a like-for-like baseline)

    m = Manifest.load(manifest_dir)
    base = status_mb("VmRSS")
    dec = Decoder(ImageTransform(crop, 256, "rrc_flip", 0.4), True)
    x = torch.empty((m.num_samples("train"), 3, crop, crop), dtype=torch.uint8)  # [N, 3, S, S]
    at = 0
    for path in m.shard_paths("train"):
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=["image", "index"])
            x[at:at + t.num_rows] = torch.from_numpy(dec(t["image"].to_pylist(), t["index"].to_numpy(), SEED, 0))
            at += t.num_rows
    Path(out).write_text(json.dumps({"peak": status_mb("VmHWM"), "base": base, "n": len(x),
                                     "array_mb": x.nbytes / 2**20,
                                     "sum": float(x.sum())}))


def run_child(args: list[str]) -> dict:
    out = OUT / f"child-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    return {**res, "process_wall": time.perf_counter() - t0}


def memory(small, large, crop: int, contrast: bool) -> dict:
    """Peak RSS at N and 4N: stream children (on this process's Ray cluster), then the in-memory contrast."""
    import ray

    address = ray.get_runtime_context().gcs_address
    res = {"crop": crop, "stream": {}, "memory": {}}
    for m in (small, large):
        n = str(m.num_samples("train"))
        r = res["stream"][n] = run_child(["--rss-child", str(m.dir), str(crop), address, str(os.getpid())])
        print(f"  stream, {n} images: train process peak RSS {r['peak']:.0f} MB (before Data {r['base']:.0f}); "
              f"actors {', '.join(f'{v:.0f}' for v in r['actors'])} MB (load {os.getloadavg()[0]:.1f})", flush=True)
    for m in (small, large) if contrast else ():
        n = str(m.num_samples("train"))
        r = res["memory"][n] = run_child(["--memory-child", str(m.dir), str(crop)])
        print(f"  in memory, {n} images: peak RSS {r['peak']:.0f} MB (array {r['array_mb']:.0f} MB)", flush=True)
    return res


# ------------------------------------------------------------------------------------------------------- main


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def main(quick: bool, doc: Path, results: Path) -> None:
    import logging

    import ray
    import torch

    from rwray.train.rayenv import quiet_data

    s = QUICK if quick else FULL
    started, t_start = datetime.now(timezone.utc), time.perf_counter()
    load = [os.getloadavg()]
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # as a DataLoader worker and a 1-CPU Ray worker run
    small, large = shards(s["n"]), shards(4 * s["n"])
    print(f"data ready in {CACHE} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    quiet_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    tp = []
    for crop, n, repeats in s["throughput"]:
        tp.append(throughput(small if n == s["n"] else large, crop, repeats, s["diagnostics"]))
        load.append(os.getloadavg())
    mem = memory(small, large, s["rss_crop"], s["contrast"])
    load.append(os.getloadavg())
    ray.shutdown()
    raw = {"quick": quick, "started": started.isoformat(), "elapsed": time.perf_counter() - t_start,
           "cpus": os.cpu_count(), "cpu_model": cpu_model(), "ray_cpus": CPUS, "actors": ACTORS,
           "actor_cpus": ACTOR_CPUS, "batch": BATCH, "ray_start": ray_start, "load": load, "throughput": tp,
           "memory": mem, "command": "python bench/bench_stream.py" + (" --quick" if quick else ""),
           "sizes": [s["n"], 4 * s["n"]], "code": _code(ROOT / "rwray")}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(raw, indent=1))
    write(raw, doc)


def _code(pkg: Path) -> str:
    """Which rwray was measured: its commit, and whether rwray/ had uncommitted changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(pkg), *a], capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD")
    return f"{sha or '?'}{' + uncommitted changes' if git('status', '--porcelain', '--', '.') else ''}"


# ------------------------------------------------------------------------------------------------------ the doc


def med(xs) -> float:
    return statistics.median(list(xs))


def span(xs, fmt: str = "{:,.0f}") -> str:
    xs = list(xs)
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}"


def summary(t: dict) -> dict:
    """One crop's numbers: medians, and ratios to the DataLoader paired per repeat."""
    dl = t["runs"]["loader"]
    out = {k: {f: med(r[f] for r in runs) for f in ("rate", "ttfb", "steady", "wall")} for k, runs in t["runs"].items()}
    for k, runs in t["runs"].items():
        out[k]["ratio"] = [a["rate"] / b["rate"] for a, b in zip(runs, dl)]
        out[k]["steady_ratio"] = [a["steady"] / b["steady"] for a, b in zip(runs, dl)]
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_losses import bootstrap_median_ci, quantiles

    r = out["stream"]["ratio"]
    out["stream"]["iqr"] = quantiles(r)[0::2] if len(r) > 1 else (r[0], r[0])
    out["stream"]["ci"] = bootstrap_median_ci(r)
    return out


def render(raw: dict) -> str:
    mark = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    loads = ", then ".join("/".join(f"{v:.1f}" for v in la) for la in raw["load"])
    nices = "/".join(sorted({str(t.get("nice", 0)) for t in raw["throughput"]}))
    L = ["## Streaming image input (`rwray.train.stream`) vs a torch DataLoader", "",
         f"Generated {datetime.fromisoformat(raw['started']):%Y-%m-%d %H:%M} UTC by `{raw['command']}` "
         f"({raw['elapsed'] / 60:.1f} min; rwray at {raw['code']}) on {raw['cpus']} CPU cores ({raw['cpu_model']}). "
         f"Ray started once before timing (`ray.init(num_cpus={raw['ray_cpus']})`, {raw['ray_start']:.1f} s, "
         f"excluded); k = {raw['actors']} decoding actors of {raw['actor_cpus']} CPU each against k = "
         f"{raw['actors']} DataLoader workers; batch {raw['batch']}; one epoch of rank 0 of world 1 consumed to the "
         f"end. Load average (1/5/15 min) {loads} (start, then after each part): other jobs share these cores, so "
         "only ratios measured side by side in this run mean anything; absolute rates do not carry across runs.", "",
         "Data: generated JPEGs of random sizes 96–160 px (smooth colour fields + noise, ~9 KB each, 10 classes) in "
         "an `image_folder` layout, prepared once by `rwray.data.prepare` (rows_per_group 256). **Stream** = the "
         "worker's own input object (`rwray.train.inputs.Data`, data.stream=stream) and its `train(epoch)`: the "
         "epoch plan's pieces (at most 64 rows) decoded by the `DecoderPool` (k plain Ray actors started when "
         "`Data` is built and kept for the run; `PieceReader`: Parquet row group -> `Decoder`: RandomResizedCrop + "
         "flip + ColorJitter(0.4), per-sample seed), taken back in plan order, rebatched, then `Images` (normalise). "
         "**DataLoader** = `torch.utils.data.DataLoader(num_workers=k)` over a map-style dataset reading the same "
         "JPEG files from the folder in the same order with the same `Decoder` and seeds, then the same `Images`: "
         "the two give byte-identical batches (checked below). Its workers are forked every epoch (no "
         f"persistent_workers) and run at the decoding actors' niceness ({nices}: Ray starts its worker processes "
         "niced, RAY_worker_niceness), as a DataLoader's workers would inside a Ray Train worker; on a busy machine "
         "an un-niced DataLoader would take a larger share of the cores than the actors. After one untimed warm-up "
         "epoch each, the variants alternate, the order rotated every repeat; ratios are paired per repeat.", "",
         "| 1. throughput, samples/s | epoch | repeats | stream, median (range) | DataLoader | ratio stream / "
         "DataLoader, median of paired | IQR; range | 95 % CI of the median | goal | verdict |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    sums = [summary(t) for t in raw["throughput"]]
    for t, s in zip(raw["throughput"], sums):
        st, dl = t["runs"]["stream"], t["runs"]["loader"]
        ratio = med(s["stream"]["ratio"])
        L.append(f"| crop {t['crop']} | {t['samples']} | {len(st)} | {s['stream']['rate']:,.0f} "
                 f"({span(r['rate'] for r in st)}) | {s['loader']['rate']:,.0f} ({span(r['rate'] for r in dl)}) | "
                 f"**{ratio:.2f}x** | {span(s['stream']['iqr'], '{:.2f}')}; {span(s['stream']['ratio'], '{:.2f}')} | "
                 f"{span(s['stream']['ci'], '{:.2f}')} | >= {GOAL_RATIO}x | {mark(ratio >= GOAL_RATIO)} |")
    L += ["", "| 3. time to first batch, s | stream, every epoch: from `Data.train`, median (range) | DataLoader: "
          "from `iter(DataLoader)` | stream, the run's first epoch: from building `Data` (actors start) | "
          "DataLoader, first epoch |", "|---|---:|---:|---:|---:|"]
    for t, s in zip(raw["throughput"], sums):
        st, dl = t["runs"]["stream"], t["runs"]["loader"]
        L.append(f"| crop {t['crop']} | {s['stream']['ttfb']:.2f} ({span((r['ttfb'] for r in st), '{:.2f}')}) | "
                 f"{s['loader']['ttfb']:.2f} ({span((r['ttfb'] for r in dl), '{:.2f}')}) | "
                 f"{t['warm']['stream']['from_build']:.2f} | {t['warm']['loader']['ttfb']:.2f} |")
    m = raw["memory"]
    n1, n4 = (str(v) for v in raw["sizes"])
    st, mem = m["stream"], m["memory"]
    rss_ratio = st[n4]["peak"] / st[n1]["peak"]
    inc = lambda r: r["peak"] - r["base"]  # noqa: E731
    acts = lambda r, k: ", ".join(f"{v:.0f}" for v in r[k]) or "n/a"  # noqa: E731
    L += ["", f"| 2. peak RSS, MB, crop {m['crop']}, one epoch in a fresh process | {n1} images | {n4} images | "
          f"ratio | goal | verdict |", "|---|---:|---:|---:|---|---|",
          f"| train process consuming the stream (VmHWM) | {st[n1]['peak']:.0f} | {st[n4]['peak']:.0f} | "
          f"**{rss_ratio:.2f}x** | <= {GOAL_RSS}x | {mark(rss_ratio <= GOAL_RSS)} |",
          f"| of which above its RSS before building `Data` (all imports done, Ray joined: {st[n1]['base']:.0f} / "
          f"{st[n4]['base']:.0f}) | {inc(st[n1]):.0f} | {inc(st[n4]):.0f} | "
          f"{inc(st[n4]) / max(inc(st[n1]), 1e-9):.2f}x | | |",
          f"| train process, largest private RSS (RssAnon) seen | {st[n1]['anon']:.0f} | {st[n4]['anon']:.0f} | "
          f"{st[n4]['anon'] / st[n1]['anon']:.2f}x | | |",
          f"| each decoding actor, peak RSS (separate processes; VmHWM polled every 0.1 s) | "
          f"{acts(st[n1], 'actors')} | {acts(st[n4], 'actors')} | | | |",
          f"| each decoding actor, largest private RSS (RssAnon) seen | {acts(st[n1], 'actors_anon')} | "
          f"{acts(st[n4], 'actors_anon')} | | | |"]
    if mem:
        L += [f"| contrast: the same images decoded into one uint8 array in one process (VmHWM) | "
              f"{mem[n1]['peak']:.0f} | {mem[n4]['peak']:.0f} | {mem[n4]['peak'] / mem[n1]['peak']:.2f}x | | |",
              f"| of which above its RSS after imports (the array: {mem[n1]['array_mb']:.0f} / "
              f"{mem[n4]['array_mb']:.0f}) | {inc(mem[n1]):.0f} | {inc(mem[n4]):.0f} | "
              f"{inc(mem[n4]) / max(inc(mem[n1]), 1e-9):.2f}x | | |"]
    L += ["", "Peak RSS is VmHWM from /proc (the peak resident set of the process's address space), not "
          "`ru_maxrss`: ru_maxrss survives fork + exec, so every child of this ~1 GB benchmark process reported "
          "the parent's peak. RSS counts shared pages in every process that maps them (torch's libraries; Ray's "
          "object store, which the actors write their decoded pieces into and the train process reads them from); "
          "RssAnon is the private part.", ""]
    if not any(t.get("floor") is not None for t in raw["throughput"]):
        L += [reading(raw, sums), ""]
        return "\n".join(L)
    L += ["| diagnostics | " + " | ".join(f"crop {t['crop']}" for t in raw["throughput"]) + " |",
          "|---|" + "---:|" * len(sums)]

    def row(label: str, fn) -> None:
        L.append(f"| {label} | " + " | ".join(fn(t, s) for t, s in zip(raw["throughput"], sums)) + " |")

    row("rate after the first batch, stream / DataLoader (median of paired)",
        lambda t, s: f"{med(s['stream']['steady_ratio']):.2f}x ({s['stream']['steady']:,.0f} / "
                     f"{s['loader']['steady']:,.0f})")
    row("the same reader in the train process (data.decode_actors=0), one epoch, samples/s",
        lambda t, s: f"{t['inprocess']['rate']:,.0f}")
    row("an epoch of 2 one-row pieces, build to last row (s): the stream's per-epoch cost",
        lambda t, s: f"{t['floor']:.2f}")
    row("previous engine (Ray Data `map_batches` on a new `ActorPoolStrategy` pool each epoch, reproduced in this "
        "file): samples/s; ratio to the DataLoader (median of paired, range)",
        lambda t, s: f"{s['ray_data']['rate']:,.0f}; {med(s['ray_data']['ratio']):.2f}x "
                     f"({span(s['ray_data']['ratio'], '{:.2f}')}; {len(s['ray_data']['ratio'])} repeats)")
    row("previous engine: time to first batch, every epoch, median (s)", lambda t, s: f"{s['ray_data']['ttfb']:.2f}")
    row("previous engine: an epoch of 2 one-row pieces (s): actor start-up (imports) + Ray Data's execution",
        lambda t, s: f"{t['floor_ray_data']:.1f}")
    row("identical batches (stream, DataLoader, previous engine: first batch of the warm-up epoch)",
        lambda t, s: "yes" if t["identical"] else "**no**")
    L += ["", reading(raw, sums), ""]
    return "\n".join(L)


def reading(raw: dict, sums: list[dict]) -> str:
    """The short reading, from the numbers."""
    n1, n4 = (str(v) for v in raw["sizes"])
    st, mem = raw["memory"]["stream"], raw["memory"]["memory"]
    ratios = ", ".join(f"{med(s['stream']['ratio']):.2f}x at crop {t['crop']} ({t['samples']} samples an epoch; "
                       f"95 % CI {span(s['stream']['ci'], '{:.2f}')})" for t, s in zip(raw["throughput"], sums))
    ok = all(med(s["stream"]["ratio"]) >= GOAL_RATIO for s in sums)
    t, s = raw["throughput"][0], sums[0]
    peak_load = max(la[0] for la in raw["load"])
    out = [f"**Reading.** The stream runs at {ratios} of the DataLoader's throughput (goal {GOAL_RATIO}x: "
           f"{'met' if ok else 'missed'}). Single pairs spread widely "
           f"({', '.join(span(x['stream']['ratio'], '{:.2f}') for x in sums)}): the other jobs on these two cores "
           f"come and go within an epoch (1-min load average up to {peak_load:.1f} at the checkpoints above). "]
    if t.get("floor") is not None:
        rd = s["ray_data"]
        out.append(
            f"Once its actors are up, an epoch costs the stream next to nothing to start ({t['floor']:.2f} s for an "
            f"epoch of two one-row pieces; first batch after {s['stream']['ttfb']:.2f} s against the DataLoader's "
            f"{s['loader']['ttfb']:.2f} s). The actors start once per run, when `Data` is built (in a worker, while "
            f"the model is built): here the run's first batch came {t['warm']['stream']['from_build']:.1f} s after "
            f"building `Data`. The previous engine, Ray Data, started a new actor pool every epoch "
            f"({t['floor_ray_data']:.1f} s for the same empty epoch: new processes importing torch, torchvision and "
            "pyarrow, and Ray Data's execution start) and ran at "
            f"{med(rd['ratio']):.2f}x. ")
    out.append(
        f"What limits both on {raw['cpus']} cores: decoding is CPU-bound (RandomResizedCrop + ColorJitter per "
        "sample), and the k decoders, the train process (rebatching, normalising each batch) and the machine's "
        "other jobs share the same two cores, so neither side gets k full cores"
        + (f" (at crop {t['crop']}, the same reader in the train process alone ran at "
           f"{t['inprocess']['rate']:,.0f} samples/s, against {s['loader']['rate']:,.0f} for the DataLoader's "
           f"{raw['actors']} workers)" if t.get("inprocess") else "")
        + ". After its first batch the stream runs at "
        + " and ".join(f"{med(x['stream']['steady_ratio']):.2f}x (crop {t_['crop']})"
                       for t_, x in zip(raw["throughput"], sums)) + " the DataLoader's rate"
        + ("; where it is faster, plausibly by reading per piece (one Parquet row-group read and one transfer per 64 "
           "crops, against a file read, a pickled tensor and a collation per sample; not profiled further)"
           if any(med(x["stream"]["steady_ratio"]) > 1.05 for x in sums) else "")
        + ". What would raise both is more decoding cores per worker (data.decode_actors), which this machine "
        "cannot show. ")
    actors = [v for x in st.values() for v in x["actors"]]
    out.append(
        f"Memory: the train process's peak RSS stays flat from {n1} to {n4} images ({st[n1]['peak']:.0f} -> "
        f"{st[n4]['peak']:.0f} MB, {st[n4]['peak'] / st[n1]['peak']:.2f}x)"
        + (f", where the same images decoded into memory take {mem[n1]['peak']:.0f} -> {mem[n4]['peak']:.0f} MB"
           if mem else "")
        + (f"; each decoding actor is a separate Python process with torch, torchvision, pyarrow and Ray loaded "
           f"(~{med(actors):.0f} MB peak RSS each, shared library pages included), a fixed cost of k actors per "
           "worker." if actors else "."))
    return "".join(out)


def write(raw: dict, doc: Path) -> None:
    text = render(raw)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(text)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--rss-child"]:
        rss_child(argv[1], int(argv[2]), argv[3], int(argv[4]), argv[5])
        os._exit(0)
    if argv[:1] == ["--memory-child"]:
        memory_child(argv[1], int(argv[2]), argv[3])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (~2 min) written to bench/out/stream")
    ap.add_argument("--doc", type=Path, default=None, help="write the section here instead (results: FILE.json)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the doc from the saved results")
    a = ap.parse_args(argv)
    target = a.doc or (OUT / "quick.md" if a.quick else DOC)
    saved = a.doc.with_suffix(".json") if a.doc else OUT / ("quick.json" if a.quick else "results.json")
    if a.render_only:
        write(json.loads(saved.read_text()), target)
    else:
        main(a.quick, target, saved)
