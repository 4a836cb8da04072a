"""The streaming input on a real local Ray: JPEG shards decoded on Ray actors in the plan's order, the same
samples and crops every time, ranks disjoint and covering the epoch, eval splits scored once; and real training
runs whose workers are killed mid-epoch, resumed with the same world size and with 2 -> 1 workers, consuming
exactly the samples an uninterrupted run consumes."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from image_fixtures import write_image_folder
from rwray import config as C
from rwray.data import SOURCES, BuilderParams, Manifest, prepare
from rwray.train import checkpoint, plan
from rwray.train.inputs import Data

pytestmark = pytest.mark.ray
STREAM = {"augment": "rrc_flip", "crop_size": 24, "eval_resize": 28, "batch_size": 4, "eval_batch_size": 16,
          "decode_actors": 1, "decode_cpus": 0.25, "stream": "stream"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    fx = write_image_folder(root / "src", num_classes=3, per_class=(20, 5, 5))
    out = root / "shards"
    prepare(SOURCES["image_folder"].params.model_validate(fx["params"]), out,
            BuilderParams(rows_per_shard=24, rows_per_group=8, workers=1))
    return out


def _cfg(tmp: Path, data_dir: Path, **over) -> C.Config:
    raw = {"name": "stream", "output_dir": str(tmp / "runs"), "data": {"dir": str(data_dir), **STREAM},
           "model": {"name": "simple_conv"}, "optim": {"lr": 0.05}, "train": {"epochs": 1, "seed": 1},
           "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "tracking": {"experiment": "stream"}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return C.validate(raw)


def _epoch(cfg: C.Config, rank: int, world: int, epoch: int = 0) -> dict[str, torch.Tensor]:
    d = Data(cfg, Manifest.load(cfg.data.dir), torch.device("cpu"), rank, world, {})
    steps, batches = d.train(epoch)
    rows = list(d._mine(epoch, None))  # noqa: SLF001 - the plan the batches must follow
    got = list(batches)
    assert len(got) == steps
    out = {"index": torch.cat([b.index for b in got]), "x": torch.cat([b.x for b in got])}
    b = cfg.data.batch_size
    assert len(out["index"]) == (len(rows) // b * b if cfg.data.drop_last else len(rows))
    return out


def test_actor_stream_follows_the_plan_and_repeats_exactly(tmp_path, shards, ray_local):
    cfg = _cfg(tmp_path, shards)
    m = Manifest.load(shards)
    a = [_epoch(cfg, r, 2) for r in range(2)]
    b = _epoch(cfg, 0, 2)
    assert torch.equal(a[0]["index"], b["index"]) and torch.equal(a[0]["x"], b["x"])  # same ids, same crops
    # ranks are disjoint and cover the split (60 rows divide by 2), in the plan's order
    ids = torch.cat([x["index"] for x in a])
    assert sorted(ids.tolist()) == list(range(60))
    rows = [n for _, _, n in m.row_groups("train")]
    import pyarrow.parquet as pq

    stored = pq.read_table(m.shard_paths("train"), columns=["index"])["index"].to_numpy()  # global row -> id
    for r in range(2):
        assert a[r]["index"].tolist() == stored[plan.epoch_plan(1, 0, rows, 2)[r]].tolist()
    # the next epoch is another order
    assert not torch.equal(_epoch(cfg, 0, 2, epoch=1)["index"], a[0]["index"])
    # in-process decoding gives the very same batches: the crops depend on (seed, epoch, id) only
    inline = _epoch(_cfg(tmp_path, shards, data={"decode_actors": 0}), 0, 2)
    assert torch.equal(inline["index"], a[0]["index"]) and torch.equal(inline["x"], a[0]["x"])
    # drop_last: every batch full (60 rows / 2 ranks = 30 = 7 x 4 + 2: the 2 are dropped), the same rows before
    dropped = _epoch(_cfg(tmp_path, shards, data={"decode_actors": 0, "drop_last": True}), 0, 2)
    assert torch.equal(dropped["index"], a[0]["index"][:28])
    # and a sample gets the same crop whatever the world size
    one = _epoch(_cfg(tmp_path, shards, data={"decode_actors": 0}), 0, 1)
    pos = {int(i): k for k, i in enumerate(one["index"])}
    for k, i in enumerate(a[1]["index"].tolist()):
        assert torch.equal(one["x"][pos[i]], a[1]["x"][k])


def test_eval_streams_each_sample_once_in_canonical_order(tmp_path, shards, ray_local):
    cfg = _cfg(tmp_path, shards, data={"decode_actors": 0})
    m = Manifest.load(shards)
    seen = []
    for r in range(3):
        d = Data(cfg, m, torch.device("cpu"), r, 3, {})
        seen += [b.index for b in d.eval("val")]
    ids = torch.cat(seen)
    assert sorted(ids.tolist()) == list(range(m.num_samples("val")))
    d = Data(cfg, m, torch.device("cpu"), 0, 1, {})
    first = [(b.index, b.x) for b in d.eval("val")]
    assert torch.cat([i for i, _ in first]).tolist() == list(range(m.num_samples("val")))  # canonical order
    again = [(b.index, b.x) for b in d.eval("val")]  # kept decoded after the first pass: the same batches
    assert "val" in d._eval_kept and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # noqa: SLF001
                                         for a, b in zip(first, again))


# -------------------------------------------------------------------------------------------- real runs, killed


def _trace(folder: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        lines = []
        for line in f.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:  # the last line of a killed process may be cut
                pass
        out[int(f.stem[4:])] = lines
    return out


RUN = {"train": {"epochs": 1, "checkpoint_every_steps": 2, "max_failures": 1}, "data": {"decode_actors": 1}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, ray_local):
    """An uninterrupted 2-worker run's trace: rank -> ids in training order."""
    from rwray.train.launch import run

    tmp = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RWRAY_SAMPLE_TRACE_DIR", str(tmp / "trace"))
        run(_cfg(tmp, shards, **RUN, tracking={"experiment": "stream", "run_name": "ref"}))
    trace = _trace(tmp / "trace")
    return {r: [i for row in rows for i in row["ids"]] for r, rows in trace.items()}


def _kill_rank0_after_a_mid_epoch_checkpoint(tmp: Path, run_name: str, box: dict) -> threading.Thread:
    from test_faults import read_status, wait_for

    ray_dir = tmp / "runs" / "ray"

    def ready():
        s = read_status(tmp / "status")
        latest = next((c for c in map(checkpoint.latest_in, ray_dir.glob(f"{run_name}-*")) if c is not None), None)
        if latest is None:
            return None
        position = checkpoint.load(latest).get("position")
        if position is None or s.get("step", -1) < position["stages"][-1][1] // STREAM["batch_size"] + 1:
            return None
        return {**s, "position": position}

    def killer():
        try:
            s = wait_for(ready, 300, "rank 0 past a mid-epoch checkpoint", every=0.01)
            os.kill(s["pid"], signal.SIGKILL)
            box.update(s)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = repr(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t


def _attempts(trace: dict[int, list[dict]], killed: dict) -> dict[int, list[int]]:
    """Per rank: the ids the killed attempt trained up to its checkpoint, then those of the attempt resumed from it
    (a killed attempt's steps after the checkpoint were rolled back)."""
    done = killed["position"]["totals"]["steps"]
    first = {rows[0]["pid"] for rows in trace.values() if rows}
    return {r: [i for row in rows if row["pid"] in first and row["step"] < done for i in row["ids"]]
            + [i for row in rows if row["pid"] not in first for i in row["ids"]] for r, rows in trace.items()}


def _traced(monkeypatch, tmp_path: Path, run_name: str) -> tuple[dict, threading.Thread]:
    monkeypatch.setenv("RWRAY_SAMPLE_TRACE_DIR", str(tmp_path / "trace"))
    monkeypatch.setenv("RWRAY_WORKER_STATUS_DIR", str(tmp_path / "status"))
    killed: dict = {}
    return killed, _kill_rank0_after_a_mid_epoch_checkpoint(tmp_path, run_name, killed)


@pytest.mark.timeout(600)
def test_killed_worker_resumes_the_epoch_exactly(tmp_path, shards, reference, monkeypatch):
    from rwray.train.launch import run

    killed, t = _traced(monkeypatch, tmp_path, "kill")
    run(_cfg(tmp_path, shards, **RUN, tracking={"experiment": "stream", "run_name": "kill"}))
    t.join(timeout=30)
    assert "error" not in killed and "position" in killed, killed
    trace = _trace(tmp_path / "trace")
    assert len({row["pid"] for rows in trace.values() for row in rows}) == 4  # two attempts of two ranks
    # per rank, the ids of both attempts (the killed one up to its checkpoint) = the uninterrupted run's, in order
    assert _attempts(trace, killed) == reference


@pytest.mark.timeout(600)
def test_resume_on_fewer_workers_loses_and_repeats_nothing(tmp_path, shards, reference, monkeypatch):
    from rwray.errors import RwrayError
    from rwray.train.launch import run

    killed, t = _traced(monkeypatch, tmp_path, "shrink")
    first = _cfg(tmp_path, shards, data=RUN["data"], train={**RUN["train"], "max_failures": 0},
                 tracking={"experiment": "stream", "run_name": "shrink"})
    with pytest.raises((RwrayError, Exception)):  # the worker died and no restart is allowed: the run fails
        run(first)
    t.join(timeout=30)
    assert "error" not in killed and "position" in killed, killed
    latest = next(c for c in map(checkpoint.latest_in, (tmp_path / "runs" / "ray").glob("shrink-*")) if c)
    second = _cfg(tmp_path, shards, **RUN, resume=str(latest), scaling={"num_workers": 1},
                  tracking={"experiment": "stream", "run_name": "shrink-1"})
    run(second)
    ids = [i for rank in _attempts(_trace(tmp_path / "trace"), killed).values() for i in rank]
    want = sorted(i for r in reference for i in reference[r])
    assert len(ids) == len(set(ids)) and sorted(ids) == want  # 2 -> 1 divides: nothing lost, nothing twice
    assert np.array_equal(np.sort(ids), np.arange(60))
