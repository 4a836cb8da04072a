"""Faults injected into real runs: a tracking server that goes away mid-run, a training worker killed mid-epoch, a
driver stopped with SIGTERM and started again. Every run trains the same ABSGD job (2 workers, 3 epochs, seed 0),
so besides finishing with each epoch's metrics logged exactly once, the interrupted runs must end with the same
weights and ABSGD state as the run that was never interrupted (the outage run: tracking faults do not touch
training). Results land in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from conftest import free_port, job
from reliability_report import Recorder
from rwray import config as C
from rwray.train import checkpoint
from rwray.train.launch import run

BIN = Path(sys.executable).parent
JOB = {"method": {"name": "absgd", "lam": 5.0}, "train": {"epochs": 3, "seed": 0}, "scaling": {"num_workers": 2}}
EPOCHS = [0, 1, 2]
VOLATILE = ("time/", "train/samples_per_s")  # wall-clock metrics differ between runs by nature
RECORD = Recorder("test_faults")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    RECORD.write()


def wait_for(pred, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def read_status(folder: Path, rank: int = 0) -> dict:
    try:
        return json.loads((folder / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return {}


def listening(port: int) -> set[str]:
    """Local addresses listening on ``port`` (IPv4 and IPv6), read from /proc/net."""
    out = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.partition(":")
            if state == "0A" and int(p, 16) == port:
                if width == 8:
                    out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    out.add("::1" if addr == "0" * 24 + "01000000" else "::" if set(addr) == {"0"} else addr)
    return out


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, env=env)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                return requests.get(self.uri + "/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        wait_for(up, timeout, "mlflow server /health", every=0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # one SIGTERM stops the server and its workers
            self.proc.wait(timeout=60)
        self.proc = None


def final_state(result) -> dict:
    return checkpoint.load(result.checkpoint_path)


def same_weights(a: dict, b: dict) -> float:
    """Largest absolute difference over the model tensors; asserts the same keys."""
    assert a["model"].keys() == b["model"].keys()
    return max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) if a["model"][k].numel() else 0.0
               for k in a["model"])


def history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def check_exactly_once(hist: dict[str, list[tuple[int, float]]]) -> None:
    assert "train/loss" in hist and "val/balanced_acc" in hist and "absgd/log_u" in hist
    for key, values in hist.items():
        assert [s for s, _ in values] == EPOCHS, f"{key}: steps {[s for s, _ in values]}"


def check_same_training(hist: dict, ref_hist: dict) -> None:
    """Per-epoch metrics equal the uninterrupted run's: the restarted epochs replayed the same computation."""
    for key in ("train/loss", "absgd/log_u", "val/balanced_acc", "test/top1"):
        got, want = [v for _, v in hist[key]], [v for _, v in ref_hist[key]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def outage_run(tmp_path_factory, digits_dir, ray_local):
    """The uninterrupted reference run, tracked on a real MLflow server that is stopped as soon as training starts
    and started again (same port, same store) once epoch metrics have piled up unsent."""
    root = tmp_path_factory.mktemp("outage")
    server = MlflowServer(root)
    server.start()
    status = root / "status"
    events: dict = {}
    cfg = job(root, digits_dir, **JOB, tracking={"uri": server.uri, "experiment": "outage", "run_name": "outage"})

    def buffered_epochs() -> list[int]:
        """Epochs whose metrics sit in rank 0's spool, i.e. were produced and could not be sent."""
        out = []
        for item in (root / "runs" / "tracking-spool").glob("*/*.json"):
            try:
                epoch = json.loads(item.read_text()).get("epoch")
            except (OSError, ValueError):
                continue
            if epoch is not None:
                out.append(epoch)
        return sorted(out)

    def saboteur():
        try:
            # As soon as training runs (the run was created while the server was up), take the server away.
            wait_for(lambda: read_status(status).get("epoch", -1) >= 0, 600, "training to start")
            server.stop()
            events["stopped_in_epoch"] = read_status(status).get("epoch")
            events["listening_while_down"] = sorted(listening(server.port))
            # Evidence that metrics were produced while it was down: they wait in the spool.
            events["buffered_epochs"] = wait_for(buffered_epochs, 600, "an epoch's metrics in the spool")
            time.sleep(2)  # the logger is backing off on a dead server meanwhile
            events["buffered_epochs"] = buffered_epochs()
            server.start()
            events["restarted"] = True
        except BaseException as e:  # noqa: BLE001 - reported by the test
            events["error"] = repr(e)
        finally:
            if server.proc is None:  # never leave the run waiting on a server that will not come back
                server.start()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RWRAY_WORKER_STATUS_DIR", str(status))
        events["listening"] = sorted(listening(server.port))
        t = threading.Thread(target=saboteur, daemon=True)
        t0 = time.monotonic()
        t.start()
        result = run(cfg)
        t.join(timeout=300)
        events["wall_s"] = time.monotonic() - t0
    yield SimpleNamespace(result=result, server=server, events=events, cfg=cfg, root=root)
    server.stop()


def test_tracking_outage_loses_no_metrics(outage_run):
    ev, res = outage_run.events, outage_run.result
    happened = ""
    try:
        assert "error" not in ev, ev
        assert ev["listening"] == ["127.0.0.1"], ev  # the test's server binds loopback only
        assert ev.get("restarted") and ev["buffered_epochs"], ev
        assert ev["listening_while_down"] == [], "the server was really down"
        c = MlflowClient(outage_run.server.uri)
        r = c.get_run(res.run_id)
        assert r.info.status == "FINISHED"
        hist = history(c, res.run_id)
        check_exactly_once(hist)
        files = {f.path for f in c.list_artifacts(res.run_id, "evaluation")}
        assert "evaluation/confusion_matrix.json" in files
        assert [f.path for f in c.list_artifacts(res.run_id, "checkpoints/last")] == ["checkpoints/last/model.pt"]
        spool = Path(outage_run.cfg.output_dir) / "tracking-spool"
        assert not spool.exists() or not any(spool.rglob("*.json")), "everything buffered was sent"
        happened = (f"server stopped as training started; epoch metrics waited in the spool while it was down "
                    f"(training went on); restarted on the same port and store; run FINISHED with "
                    f"{len(hist)} metric keys, each logged at steps {EPOCHS} exactly once; artifacts present; "
                    f"spool empty")
    finally:
        RECORD.add("tracking-outage", "stop the real `mlflow server` once training runs, start it again on the "
                   "same port and store after epoch metrics piled up unsent", "training never stops; no metric "
                   "lost or duplicated; run FINISHED", happened or "see test failure", bool(happened), "tracking")


@pytest.mark.timeout(900)
def test_worker_killed_mid_epoch_resumes_from_checkpoint(tmp_path, digits_dir, ray_local, outage_run, monkeypatch):
    status = tmp_path / "status"
    monkeypatch.setenv("RWRAY_WORKER_STATUS_DIR", str(status))
    cfg = job(tmp_path, digits_dir, **JOB, tracking={"experiment": "faults", "run_name": "kill"})
    killed: dict = {}

    ray_dir = Path(cfg.output_dir).resolve() / "ray"

    def mid_epoch_after_commit():
        """Rank 0 a few steps into the epoch after the one Ray's snapshot names as its latest checkpoint."""
        s = read_status(status)
        if s.get("step", -1) < 2:
            return None
        latest = next((c for c in map(checkpoint.latest_in, ray_dir.glob("kill-*")) if c is not None), None)
        if latest is None:
            return None
        committed = checkpoint.load(latest)["epoch"]
        return {**s, "committed": committed} if s["epoch"] == committed + 1 else None

    def killer():
        try:
            s = wait_for(mid_epoch_after_commit, 600, "rank 0 inside the epoch after a committed checkpoint",
                         every=0.02)
            os.kill(s["pid"], signal.SIGKILL)  # the RayTrainWorker process of rank 0: no cleanup, no goodbye
            killed.update(s)
        except BaseException as e:  # noqa: BLE001
            killed["error"] = repr(e)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    happened = ""
    try:
        res = run(cfg)
        t.join(timeout=60)
        assert "error" not in killed and killed.get("epoch", 0) >= 1, killed
        after = read_status(status)
        assert after["pid"] != killed["pid"], "rank 0 runs in a new process after the restart"
        # the new worker group started from the checkpoint, not from scratch
        assert after["start_epoch"] == killed["committed"] + 1 == killed["epoch"], (after, killed)
        c = MlflowClient(res.tracking_uri)
        (r,) = c.search_runs([c.get_experiment_by_name("faults").experiment_id])
        assert r.info.run_id == res.run_id and r.info.status == "FINISHED"
        hist = history(c, res.run_id)
        check_exactly_once(hist)
        ref_c = MlflowClient(outage_run.result.tracking_uri)
        check_same_training(hist, history(ref_c, outage_run.result.run_id))
        state, ref = final_state(res), final_state(outage_run.result)
        # ABSGD's state continued across the restart: its u estimate and per-epoch history match the run that was
        # never interrupted (a reset would restart log u from -inf at epoch 1 and lose epoch 0's history).
        assert [e for e, _ in state["method"]["history"]] == EPOCHS
        assert state["method"]["log_u"] == pytest.approx(ref["method"]["log_u"], rel=1e-9, abs=1e-9)
        diff = same_weights(state, ref)
        assert diff <= 1e-6, diff
        happened = ("SIGKILL to rank 0 a few steps into the epoch after a committed checkpoint; Ray Train restarted "
                    "the worker group, which resumed from that checkpoint (not from epoch 0); run FINISHED in the "
                    f"same MLflow run, every metric at steps {EPOCHS} exactly once; ABSGD log u and history "
                    "continued; final weights equal the uninterrupted run's "
                    f"({'bitwise' if diff == 0 else 'within 1e-6'})")
    finally:
        RECORD.add("worker-killed", "SIGKILL the rank-0 training worker process mid-epoch, after a checkpoint "
                   "(train.max_failures=3)",
                   "restart from the last checkpoint; each epoch logged once; method state restored; same weights "
                   "as an uninterrupted run", happened or f"see test failure ({killed})", bool(happened), "workers")


@pytest.mark.timeout(900)
def test_stopped_driver_continues_same_run(tmp_path, digits_dir, ray_local, outage_run):
    import ray

    cfg = job(tmp_path, digits_dir, **JOB, tracking={"experiment": "faults", "run_name": "preempt"})
    path = tmp_path / "job.yaml"
    path.write_text(cfg.to_yaml())
    status = tmp_path / "status"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "RWRAY_WORKER_STATUS_DIR": str(status)}
    log = tmp_path / "driver.log"
    happened = ""
    try:
        driver = subprocess.Popen([str(BIN / "rwray"), "train", str(path)], env=env, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, cwd=tmp_path)
        ray_dir = Path(cfg.output_dir) / "ray"

        def epoch1_committed():  # Ray's snapshot names epoch 1's checkpoint as the latest
            if driver.poll() is not None:
                raise RuntimeError(f"driver exited early: {log.read_text()[-3000:]}")
            for d in ray_dir.glob("preempt-*"):
                latest = checkpoint.latest_in(d)
                if latest is not None and checkpoint.load(latest)["epoch"] >= 1:
                    return latest
            return None
        wait_for(epoch1_committed, 600, "epoch 1's checkpoint", every=0.2)
        driver.send_signal(signal.SIGTERM)  # what `ray job stop` and schedulers send
        rc = driver.wait(timeout=180)
        assert rc != 0, "an interrupted run must not exit 0"
        c = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        (first,) = c.search_runs([c.get_experiment_by_name("faults").experiment_id])
        assert first.info.status == "KILLED", (first.info.status, log.read_text()[-3000:])
        before = {m.step for m in c.get_metric_history(first.info.run_id, "train/loss")}
        assert before <= set(EPOCHS), before  # whatever was logged before the stop is kept (no reset)

        res = run(C.load(path))  # the same job again, here
        assert res.run_id == first.info.run_id, "the same MLflow run continues"
        runs = c.search_runs([c.get_experiment_by_name("faults").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.tags["rwray.resumes"] == "1" and "rwray.error" not in runs[0].data.tags
        hist = history(c, res.run_id)
        check_exactly_once(hist)
        check_same_training(hist, history(MlflowClient(outage_run.result.tracking_uri), outage_run.result.run_id))
        state, ref = final_state(res), final_state(outage_run.result)
        assert [e for e, _ in state["method"]["history"]] == EPOCHS
        diff = same_weights(state, ref)
        assert diff <= 1e-6, diff
        happened = ("SIGTERM to the driver once epoch 1's checkpoint was committed: it exited non-zero and marked "
                    "the run KILLED; the same job started again continued the same MLflow run from that checkpoint; "
                    f"every metric at steps {EPOCHS} exactly once; final weights equal the uninterrupted run's "
                    f"({'bitwise' if diff == 0 else 'within 1e-6'})")
    finally:
        RECORD.add("driver-stopped", "SIGTERM the driver (`rwray train` in a subprocess) after epoch 1's checkpoint, "
                   "then start the same job again", "one MLflow run, continued from the last checkpoint, each epoch "
                   "once, same weights as an uninterrupted run", happened or "see test failure", bool(happened),
                   "driver")


def test_deterministic_errors_are_not_retried():
    """The controller-side callback stops the run on errors a restart would repeat, and lets Ray retry the rest.
    (The end-to-end case, a NaN loss on Ray failing once and fast, is tests/test_bad_input.py.)"""
    from ray.exceptions import ActorDiedError

    from rwray.errors import BatchTooLarge, NonFiniteLoss
    from rwray.train.fatal import stop_on_fatal_errors

    cb = stop_on_fatal_errors()
    outcome = []
    for err, fatal in ((NonFiniteLoss(0, 3, [7]), True), (BatchTooLarge("data.batch_size", 64, "at epoch 0"), True),
                       (ActorDiedError(), False), (RuntimeError("Connection closed by peer"), False)):
        wrapped = RuntimeError("worker failed")
        wrapped.__cause__ = err
        try:
            cb.after_exception(None, {0: wrapped})
            raised = None
        except BaseException as e:  # noqa: BLE001
            raised = e
        assert (raised is err) == fatal, (err, raised)
        outcome.append(f"{type(err).__name__}: {'stops the run' if fatal else 'retried by Ray'}")
    RECORD.add("no-retry-of-deterministic-errors", "worker errors seen by the Ray Train controller callback",
               "NonFiniteLoss / out-of-memory stop at once; a dead worker or a broken connection is retried",
               "; ".join(outcome), True, "workers")


def epoch_rows(parts, seed, epoch, rank, world):
    """One rank's rows of one epoch, in training order: what TrainRows' batches add up to."""
    from rwray.train.batches import canonical_rows, epoch_order

    rows = canonical_rows(parts)
    labels = rows["label"].long() if "label" in rows else torch.zeros(len(rows["index"]), dtype=torch.long)
    mine = epoch_order(labels, seed, epoch, rank, world)
    return {k: v[mine] for k, v in rows.items()}


def test_epoch_order_is_a_function_of_seed_and_epoch():
    """What makes a restarted epoch replay: the order and the split do not depend on how Ray Data chunks or orders
    the stream, only on (seed, epoch); every rank gets the same number of rows; ranks never overlap."""

    n = 103
    rows = {"index": torch.arange(1000, 1000 + n), "image": torch.arange(n * 4, dtype=torch.uint8).view(n, 4) % 251}
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    chunkings = [[rows], [{k: v[shuffled[i:i + 10]] for k, v in rows.items()} for i in range(0, n, 10)]]
    for world in (1, 2, 3):
        outs = [[epoch_rows(parts, seed=7, epoch=4, rank=r, world=world) for r in range(world)] for parts in chunkings]
        for a, b in zip(*outs):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
        got = torch.cat([o["index"] for o in outs[0]])
        assert len(got) == (n // world) * world and len(set(got.tolist())) == len(got)
        assert len({len(o["index"]) for o in outs[0]}) == 1
    one = epoch_rows([rows], 7, 4, 0, 1)["index"]
    two = [epoch_rows([rows], 7, 4, r, 2)["index"] for r in range(2)]
    # world 2 deals the world-1 order round-robin: global batch s is the same set of samples either way
    assert torch.equal(torch.stack(two, 1).flatten(), one[: 2 * len(two[0])])
    assert not torch.equal(epoch_rows([rows], 7, 5, 0, 1)["index"], one)  # a new order each epoch
    RECORD.add("data-order", "the same train split streamed in another chunking and block order, for 1-3 workers",
               "identical per-rank order; equal rows per rank; no overlap; new order each epoch",
               "as expected; 2 workers deal the 1-worker permutation round-robin", True, "determinism")


def test_train_rows_stream_once_and_give_the_epoch_order():
    """The loop's train input: the split is streamed on the first epoch only, and every epoch's batches are this
    rank's rows of `epoch_rows` in order, cut into batches (the last one short)."""
    from rwray.train.batches import TrainRows

    n = 53
    rows = {"index": torch.arange(500, 500 + n).flip(0), "label": torch.arange(n) % 7}
    parts = [{k: v[i:i + 8] for k, v in rows.items()} for i in range(0, n, 8)]
    streamed = []

    def stream():
        streamed.append(1)
        return iter(parts)

    train = TrainRows(stream)
    for epoch in (0, 1, 2):
        for rank in (0, 1):
            batches = list(train.batches(seed=3, epoch=epoch, rank=rank, world=2, batch_size=5))
            want = epoch_rows(parts, 3, epoch, rank, 2)
            assert [len(b["index"]) for b in batches] == [5] * 5 + [1]  # 26 rows of this rank
            for k in want:
                assert torch.equal(torch.cat([b[k] for b in batches]), want[k])
    assert streamed == [1]
    assert list(TrainRows(lambda: iter([])).batches(0, 0, 0, 1, 4)) == []  # an empty split: no batch


def test_eval_rows_score_each_sample_once_and_a_kept_split_is_streamed_once():
    """Eval input: rank r scores the rows with index % world == r, so the ranks together score every row exactly
    once; a split that fits is streamed on the first evaluation only and gives the same rows every time after."""
    from rwray.train.batches import EvalRows

    n = 23
    rows = {"index": torch.arange(n).flip(0) + 100, "label": torch.arange(n) % 5}
    parts = [{k: v[i:i + 6] for k, v in rows.items()} for i in range(0, n, 6)]
    for keep in (True, False):
        streamed = []

        def stream():
            streamed.append(1)
            return iter(parts)

        evals = [EvalRows(stream, rank, 2, keep) for rank in (0, 1)]
        seen = []
        for _ in range(3):  # three evaluations
            for r, ev in enumerate(evals):
                got = torch.cat([b["index"] for b in ev.batches(4)])
                assert (got % 2 == r).all()
                if keep:  # kept rows are in index order, cut into batches of 4 (12 and 11 rows)
                    assert [len(b["index"]) for b in ev.batches(4)] == ([4, 4, 4] if r == 0 else [4, 4, 3])
                    assert torch.equal(got, got.sort().values)
                seen.append(sorted(got.tolist()))
        assert sorted(seen[0] + seen[1]) == list(range(100, 100 + n)) and seen[:2] * 3 == seen
        assert len(streamed) == (2 if keep else 2 * 3)  # kept: once per rank; else every evaluation


def test_logger_sends_each_epoch_once_and_picks_up_a_dead_loggers_spool(tmp_path):
    """BufferedRunLogger against a real (sqlite) MLflow store: an epoch logged twice is sent once; items left in
    the spool by a logger that never sent them are sent by its successor; nothing is left behind."""
    from rwray.tracking import BufferedRunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("t")).info.run_id
    spool = tmp_path / "spool"
    dead = BufferedRunLogger("http://127.0.0.1:9", run_id, spool, verbose=False)  # nothing listens on port 9
    dead.log_epoch(0, {"train/loss": 1.0, "x": 0.5}, 1000)
    (tmp_path / "a.txt").write_text("artifact")
    dead.artifact(tmp_path / "a.txt", "files")
    assert not dead.log_epoch(0, {"train/loss": 9.0}, 2000)  # a re-run epoch is dropped
    assert dead.close(timeout_s=1) == 2 and len(list(spool.glob("*.json"))) == 2  # unsent: kept on disk
    live = BufferedRunLogger(uri, run_id, spool, verbose=False)
    assert not live.log_epoch(0, {"train/loss": 7.0}, 3000)  # still pending from the dead logger: not again
    live.log_epoch(1, {"train/loss": 0.8, "x": 0.6}, 4000)
    assert live.close(timeout_s=60) == 0 and not spool.exists()
    again = BufferedRunLogger(uri, run_id, tmp_path / "spool2", verbose=False)
    again.log_epoch(1, {"train/loss": 5.0}, 5000)  # the server already has epoch 1: dropped when sending
    assert again.close(timeout_s=60) == 0
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "train/loss")] == [(0, 1.0), (1, 0.8)]
    assert [a.path for a in c.list_artifacts(run_id, "files")] == ["files/a.txt"]
    RECORD.add("logger-exactly-once", "an epoch logged twice; a logger that died with unsent items; an epoch the "
               "server already has", "each epoch once; the successor sends the dead logger's items",
               "as expected (sqlite MLflow store)", True, "tracking")
