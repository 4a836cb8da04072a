"""An out-of-memory kill reported as what it is: which process, where the run was, the memory figures, what Ray
Train's retries did and the config fields to change; no traceback, exit code 1, the MLflow run FAILED with what it
had logged.

The end-to-end test is a real kill: `rwray train` in a subprocess starts its own local Ray with a memory-monitor
threshold set a few GiB above what the machine uses when the test starts, and the RWRAY_FAULT_MEMORY injector makes
rank 0 allocate past it in epoch 2. The unit tests pin the parsing on Ray 2.60's own report (captured from such a
run) and the controller's retry rule on Ray's real exception classes.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import job
from reliability_report import Recorder
from rwray.errors import BatchTooLarge, OutOfMemory
from rwray.train import oom, oom_report
from rwray.train.fatal import stop_on_fatal_errors
from rwray.train.faults import parse_spec
from rwray.train.progress import status_writer

BIN = Path(sys.executable).parent
RECORD = Recorder("test_oom")
GIB = 1 << 30

# Ray 2.60's report of a real kill (this test's own run), trimmed: the object store block and most of the lists.
RAY_260 = """1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, ID: \
68e01ca97a1ab20f805592a4b87f9cd545cd6b9e67e1a71649037ba0) was 7.35GB used / 23.54GB limit (0.312409)
OOM kill reason: Memory usage 7873257472B exceeded threshold of 7863420416B (31.1% of 25276182528B limit)
Object store memory usage: [- objects spillable: 4
- bytes spillable: 95650
(global lru) bytes evicted: 0]
Ray killed 1 worker(s) based on the killing policy
Considered workers: [
Selected to kill: (Actor(40562d63b6ebcaaf8db5f6a501000000): job ID=01000000, lease ID=05000000591324bc50cf27fa6dfd5464\
44054f45f0ecf9c2f575d2db9cb59970, task name=RayTrainWorker.__init__, required resources={bundle_group_5d622f59c3374e14\
b94d0d40244301000000: 0.001, CPU_group_0_5d622f59c3374e14b94d0d40244301000000: 1}, pid=14460, actual memory used=1.90GB\
, worker ID=5e3ba960c83b984db8bf85a5c405d5ce0bcb560c0d43bc2ae5a3d938)
(Actor(5ede5df44a47e11e1f50c7cf01000000): job ID=01000000, lease ID=00000000b5d32067351660d19718de9048d21bd24ae95365678\
93c528fcca078, task name=TrainController.__init__, required resources={}, pid=13774, actual memory used=0.37GB, worker \
ID=f627491be9ad3fb1d3732f9d3a3d20832e70a1d81b4ca7f232540e5b)
]
Total non-selected idle workers: 2
Total non-selected idle workers USS bytes: 0.08GB
To see more information about memory usage on this node, use `ray logs raylet.out -ip 192.0.2.2`
Top 10 memory users: PID\tMEM(GB)\tCOMMAND
14460\t1.90\tray::RayTrainWorker
8175\t0.66\tpython -m pytest tests/test_train_e2e.py -x -q
12262\t0.56\t/home/user/.venv/bin/python3 /home/user/.venv/bin/rwray train /tmp/oomx/job.yaml
13774\t0.37\tray::TrainController.run
Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/en/latest/ray-observab\
ility/user-guides/debug-apps/debug-memory.html. Consider provisioning more memory on this node or reducing task \
parallelism by requesting more CPUs per task."""

# The wording before Ray 2.56 (one task per report, the threshold as a fraction), as its node_manager.cc formats it.
RAY_OLD = ("Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.7, ID: abc123) "
           "where the task (actor ID: 0f1e, name=_Decoder.__init__, pid=4242, memory used=3.25GB) was running was "
           "29.50GB / 31.00GB (0.951613), which exceeds the memory usage threshold of 0.95. Ray killed this worker "
           "(ID: 77aa) because it was the most recently scheduled task; to see more information about memory usage "
           "on this node, use `ray logs raylet.out -ip 10.0.0.7`.")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    RECORD.write()


def ray_oom(text: str = RAY_260):
    from ray.exceptions import OutOfMemoryError

    return OutOfMemoryError(text)


def dead_worker(text: str = RAY_260):
    """What Ray Train's poll hands its callbacks for a worker the memory monitor killed."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(...)", ray_oom(text))


# ----------------------------------------------------------------------------------------------------- parsing


def test_ray_260_report_parsed():
    k = oom.parse(RAY_260)
    assert (k.pid, k.name, k.command, k.node_ip) == (14460, "RayTrainWorker.__init__", "ray::RayTrainWorker",
                                                     "192.0.2.2")
    assert k.used == int(1.90 * GIB)  # Ray's "GB" is GiB: 7873257472 B is its "7.35GB"
    assert (k.node_used, k.node_total) == (7873257472, 25276182528)
    assert k.threshold == pytest.approx(7863420416 / 25276182528)
    assert [pid for pid, _, _ in k.top] == [14460, 8175, 12262, 13774] and k.top[1][1] == 0.66
    assert oom_report.process_kind(k, None) == "train worker" and k.also == []
    # Ray 2.56+ may kill several at once, in no useful order: the one that used the most is the report's
    sync = ("Selected to kill: (Actor(b137206d35ad5918f00cbced01000000): job ID=01000000, lease ID=0400, task name="
            "SynchronizationActor.__init__, required resources={}, pid=22491, actual memory used=0.11GB, "
            "worker ID=1e)\n")
    two = oom.parse(RAY_260.replace("Considered workers: [\n", "Considered workers: [\n" + sync))
    assert (two.pid, two.name, two.also) == (14460, "RayTrainWorker.__init__",
                                             [(22491, "SynchronizationActor.__init__", int(0.11 * GIB))])
    assert oom_report.describe_memory(two).endswith("; Ray also killed SynchronizationActor (pid 22491, 0.1 GiB)")


def test_older_wordings_parsed():
    k = oom.parse(RAY_OLD)
    assert (k.pid, k.name, k.used, k.node_ip) == (4242, "_Decoder.__init__", int(3.25 * GIB), "10.0.0.7")
    assert (k.node_used, k.node_total, k.threshold) == (int(29.5 * GIB), int(31.0 * GIB), 0.95)
    assert oom_report.process_kind(k, 1) == "decoding actor"
    died = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tactor_id: 5b72"
            "\n\tpid: 1412\n\tip: 172.31.41.244\nThe actor is dead because its worker process has died. Worker exit "
            "type: NODE_OUT_OF_MEMORY Worker exit detail: Task was killed due to the node running low on memory.")
    k = oom.parse(died)
    assert (k.pid, k.name, k.node_ip, k.used, k.node_total) == (1412, "RayTrainWorker", "172.31.41.244", None, None)
    assert oom.parse("The actor died unexpectedly before finishing this task.\n\tpid: 7") is None
    assert oom.parse("RuntimeError: Connection closed by peer") is None


def test_found_inside_ray_trains_wrappers():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    gloo = RuntimeError("[gloo] Connection closed by peer")
    dead = dead_worker()
    group = WorkerGroupError("rank 1 died", {0: gloo, 1: dead})
    # the innermost error: Ray's own, not the wrapper quoting its text
    assert oom.find(group) == (1, dead.health_check_failure) == oom.in_failures({0: gloo, 1: dead})
    raw = ray_oom()
    assert oom.find(ControllerError(raw)) == (None, raw)  # Ray's shutdown path: no rank named
    ours = OutOfMemory("train worker rank 0", "1 GiB", details={"rank": 0, "kind": "train worker"})
    assert oom.find(ControllerError(ours)) == (None, ours)
    assert oom.find(ControllerError(BatchTooLarge("data.batch_size", 64, "at epoch 0"))) is None  # the GPU's own
    assert oom.find(WorkerGroupError("x", {0: gloo})) is None


def test_out_of_memory_crosses_processes_whole():
    e = OutOfMemory("train worker rank 0 (pid 7)", "it used 2 GiB", "in epoch 2 of 3", "lower data.batch_size",
                    "not retried (train.max_failures=0)", "The MLflow run closes as FAILED.", {"rank": 0, "pid": 7})
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.details == {"rank": 0, "pid": 7} and back.exit_code == 1
    assert str(pickle.loads(pickle.dumps(OutOfMemory("the driver", "-", event="ran out of memory")))).startswith(
        "out of memory: the driver ran out of memory.")
    assert str(e).splitlines() == ["out of memory: train worker rank 0 (pid 7) was killed in epoch 2 of 3.",
                                   "  memory: it used 2 GiB", "  retries: not retried (train.max_failures=0)",
                                   "  fix: lower data.batch_size", "  The MLflow run closes as FAILED."]


# ------------------------------------------------------------------------------------------------ the report


def test_stage_from_the_rank_status_record(tmp_path):
    write = status_writer(str(tmp_path), 0, 0)
    assert oom_report.read_status(tmp_path) == {0: {}}  # a worker that has not written yet: no record of where
    write(1, 2)
    pid = os.getpid()
    rank, rec = oom_report.status_of(oom_report.read_status(tmp_path), "train worker", pid, None)
    assert rank == 0 and rec == {"pid": pid, "rank": 0, "start_epoch": 0, "epoch": 1, "step": 2, "stage": "train"}
    stage = oom_report.describe_stage
    assert stage(rec, 3, 29) == "in epoch 2 of 3, after training step 3 of 29"
    assert stage({**rec, "step": 28}, 3, 29) == ("in epoch 2 of 3, after its last training step (29 of 29: "
                                                 "evaluating, checkpointing or logging)")
    assert stage({**rec, "epoch": 2, "step": 28}, 3, 29).endswith("logging, or writing the final artifacts)")
    assert stage({**rec, "step": -1}, 3, 29) == "in epoch 2 of 3, before its first training step"
    assert stage({**rec, "stage": "evaluate val"}, 3, 29) == "in epoch 2 of 3, evaluating split val"
    assert stage({**rec, "epoch": 3, "stage": "final artifacts"}, 3, 29) == ("after the last epoch, writing the "
                                                                              "final artifacts")
    # a record of rank 0 from another process: the killed worker never wrote one, it died starting
    assert oom_report.status_of({0: rec}, "train worker", pid + 1, 0) == (0, {})
    assert stage({}, 3, 29).startswith("before its first training step (starting")
    # no record of its rank to be seen (another node's folder): where it was is not claimed
    assert oom_report.status_of({}, "train worker", pid, 1) == (1, None) and stage(None, 3, 29) == ""
    assert oom_report.stage_of("decoding actor", 0, {}, 3, 29) == "while train worker rank 0 was starting"
    # a decoding actor is placed by its train worker's record
    assert oom_report.stage_of("decoding actor", 0, rec, 3, 29) == ("while train worker rank 0 was in epoch 2 of 3, "
                                                                   "after training step 3 of 29")
    assert oom_report.steps_per_epoch(460, 1, 16, False) == 29 and oom_report.steps_per_epoch(460, 2, 16, True) == 14


def test_a_decoding_actor_is_named_with_its_train_worker(tmp_path):
    """A decoding actor's kill reaches its train worker's ray.get; the report names the actor, and where that worker
    was from the worker's own record."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    text = RAY_260.replace("RayTrainWorker.__init__", "_Decoder.__init__").replace("ray::RayTrainWorker",
                                                                                  "ray::_Decoder.read")
    (tmp_path / "rank1.json").write_text('{"pid": 999, "rank": 1, "start_epoch": 0, "epoch": 0, "step": 6}')
    report = oom_report.partial(*oom.find(WorkerGroupError("x", {1: ray_oom(text)})), "", str(tmp_path), epochs=2)
    assert report.details["kind"] == "decoding actor"
    assert str(report).splitlines()[0] == ("out of memory: a decoding actor of train worker rank 1 (pid 14460, node "
                                           "192.0.2.2) was killed while train worker rank 1 was in epoch 1 of 2, "
                                           "after training step 7.")


def test_fixes_name_the_config_fields(tmp_path):
    cfg = job(tmp_path, tmp_path, data={"batch_size": 64, "eval_batch_size": 1024, "decode_window": 4})
    k = oom.parse(RAY_260)
    train = oom_report.fixes("train worker", "in epoch 2 of 3, after training step 3 of 29", k, cfg)
    assert train == ("lower data.batch_size (now 64; data.batch_size=32 with train.grad_accum=2 keeps the effective "
                     "batch) or use a smaller model; run fewer workers per node: scaling.memory_per_worker_gb=3 makes "
                     "Ray place a worker only where that much memory is free; or use nodes with more memory (this "
                     "one has 24 GiB)")
    assert oom_report.fixes("train worker", "in epoch 2 of 3, evaluating split val", k, cfg).startswith(
        "lower data.eval_batch_size (now 1024, e.g. 512); run fewer")
    # another program on the node held more than the killed worker: say so first
    shared = oom.parse(RAY_260.replace("8175\t0.66\tpython -m pytest", "8175\t2.66\tpython -m pytest"))
    assert oom_report.fixes("train worker", "in epoch 2 of 3, evaluating split val", shared, cfg).startswith(
        f"{oom_report.SHARED}; lower data.eval_batch_size (now 1024, e.g. 512); run fewer workers per node")
    assert "data.stream=stream" in oom_report.fixes("train worker", "before its first training step (starting: x)",
                                                    k, cfg)
    assert oom_report.fixes("decoding actor", "", oom.parse(RAY_OLD), cfg).startswith(
        "lower data.decode_window (now 4) or data.decode_actors (now 2 per worker), or raise data.decode_cpus (now 1")
    assert oom_report.fixes("the driver", "", None, cfg) == "use nodes with more memory"


def test_controller_retries_an_oom_kill_and_stops_when_it_recurs(tmp_path, capsys):
    """Ray Train's controller callback with Ray's real exception objects: a kill is retried (one terminal line);
    a kill after a new checkpoint is retried again; a kill before any new checkpoint stops the run (a restart would
    only repeat it); with max_failures used up or 0 it stops at once."""
    status = tmp_path / "status"
    status.mkdir()
    # rank 0's record, as the killed worker (pid 14460 in Ray's report) left it
    (status / "rank0.json").write_text('{"pid": 14460, "rank": 0, "start_epoch": 0, "epoch": 1, "step": 2, '
                                       '"stage": "train"}')
    cb = stop_on_fatal_errors(max_failures=3, status_dir=str(status), epochs=3)
    cb.after_exception(None, {0: dead_worker()})
    line = ("out of memory: train worker rank 0 (pid 14460, node 192.0.2.2) was killed by Ray's memory monitor in "
            "epoch 2 of 3, after training step 3 (it used 1.9 GiB; node at 7.3 of 23.5 GiB, threshold 31%); "
            "restarting the workers from the last checkpoint (retry {} of train.max_failures=3)")
    assert capsys.readouterr().err.splitlines() == [line.format(1)]
    cb.after_report(None, [{}], checkpoint=object())  # the restarted workers got further
    cb.after_exception(None, {0: dead_worker()})
    assert capsys.readouterr().err.splitlines() == [line.format(2)]
    with pytest.raises(OutOfMemory) as stop:  # again, with no checkpoint in between
        cb.after_exception(None, {0: dead_worker()})
    assert stop.value.retries == ("Ray Train restarted the workers 2 times from the last checkpoint and they ran out "
                                  "of memory again before reaching another one: further restarts "
                                  "(train.max_failures=3) would only repeat it")
    assert stop.value.details["rank"] == 0 and stop.value.details["kill"]["pid"] == 14460
    assert "node running low on memory" in stop.value.details["ray_text"]
    with pytest.raises(OutOfMemory, match="not retried") as no_retry:
        stop_on_fatal_errors(0).after_exception(None, {0: dead_worker()})
    assert no_retry.value.retries == "not retried (train.max_failures=0)"
    used_up = stop_on_fatal_errors(1)
    used_up.after_exception(None, {0: RuntimeError("a lost node")})  # a failure that is no OOM uses a restart too
    with pytest.raises(OutOfMemory) as last:
        used_up.after_exception(None, {0: dead_worker()})
    assert last.value.retries == "Ray Train's restarts are used up (train.max_failures=1)"
    assert capsys.readouterr().err == ""
    # a Python MemoryError in a worker (an allocation refused): the same rule, told as what it was
    stop_on_fatal_errors(2).after_exception(None, {1: MemoryError()})
    assert capsys.readouterr().err.splitlines() == [
        "out of memory: train worker rank 1 ran out of memory (a Python MemoryError); restarting the workers from "
        "the last checkpoint (retry 1 of train.max_failures=2)"]
    RECORD.add("oom-retry-rule", "Ray's memory-monitor kill of a worker, seen by the Ray Train controller callback "
               "(train.max_failures=3)", "retried from the last checkpoint with one terminal line; a kill before the "
               "next checkpoint stops the run; max_failures 0 or used up stops it",
               "retry lines 1 and 2 (a checkpoint in between); the third kill, with no checkpoint since, stopped the "
               "run; max_failures=0 and used-up retries stopped at once", True, "memory")


def test_the_driver_completes_the_controllers_report(tmp_path):
    """What `rwray train` prints: the controller's part (process, figures, retries) with the stage in steps of the
    epoch and the config fields, from the job's config and the rank's record."""
    from ray.train.v2.api.exceptions import ControllerError

    (tmp_path / "rank0.json").write_text('{"pid": 14460, "rank": 0, "start_epoch": 0, "epoch": 1, "step": 2}')
    stopped = oom_report.partial(0, dead_worker(), oom_report.retries_text(1, 3, True), str(tmp_path), 3)
    cfg = job(tmp_path, tmp_path, train={"epochs": 3, "max_failures": 3}, scaling={"num_workers": 1})
    report = oom_report.explain(ControllerError(stopped), cfg, str(tmp_path), 460, "The MLflow run closes as FAILED.")
    assert str(report).splitlines() == [
        "out of memory: train worker rank 0 (pid 14460, node 192.0.2.2) was killed in epoch 2 of 3, after training "
        "step 3 of 29.",
        "  memory: the process used 1.9 GiB; node 192.0.2.2 had 7.3 of 23.5 GiB in use (31%), over Ray's kill "
        "threshold of 31% (RAY_memory_usage_threshold, read when Ray starts); other processes held 5.4 GiB of it "
        "(largest: pid 8175 python -m pytest tests/test_train_e2e.py... 0.7 GiB, pid 12262 /home/user/.venv/bin/"
        "python3 /home/user/... 0.6 GiB)",
        "  retries: Ray Train restarted the workers 1 time from the last checkpoint and they ran out of memory again "
        "before reaching another one: further restarts (train.max_failures=3) would only repeat it",
        "  fix: lower data.batch_size (now 16; data.batch_size=8 with train.grad_accum=2 keeps the effective batch) "
        "or use a smaller model; run fewer workers per node: scaling.memory_per_worker_gb=3 makes Ray place a "
        "worker only where that much memory is free; or use nodes with more memory (this one has 24 GiB)",
        "  The MLflow run closes as FAILED."]
    assert oom_report.explain(ControllerError(RuntimeError("no memory story")), cfg, None, 460) is None
    logged = oom_report.explain(ControllerError(stopped), cfg, str(tmp_path), 460, "Closed.", "/x/run.log")
    assert str(logged).splitlines()[-1] == "  Closed. Ray's own report is in /x/run.log."
    driver = oom_report.explain(MemoryError(), cfg, None, 460, "Closed.", "/x/run.log")  # in the driver itself
    assert str(driver).splitlines() == ["out of memory: the driver (this process) ran out of memory.",
                                        "  memory: a Python MemoryError (an allocation failed); Ray reported no "
                                        "figures", "  fix: use nodes with more memory", "  Closed."]


def test_fault_injector_spec():
    assert parse_spec("rank=0, epoch=1,step=2,gib=8") == {"rank": 0, "epoch": 1, "step": 2, "gib": 8}
    with pytest.raises(ValueError, match="missing gib"):
        parse_spec("rank=0,epoch=1,step=2")
    with pytest.raises(ValueError, match="is not key=value"):
        parse_spec("rank0,epoch=1,step=2,gib=1")


# ------------------------------------------------------------------------------------------------- a real kill


def meminfo() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_real_oom_kill_is_reported(tmp_path, digits_dir):
    """`rwray train` on its own local Ray whose memory monitor kills above (the machine's use now + 6 GiB); rank 0
    allocates past that after step 3 of epoch 2 every time it gets there. Expected: one retry line, then the report
    (the second kill came before another checkpoint), exit code 1, no traceback, the MLflow run FAILED with epoch 1's
    metrics."""
    mem = meminfo()
    total, used = mem["MemTotal"], mem["MemTotal"] - mem["MemAvailable"]
    if total - used < 10 * GIB:
        pytest.skip(f"needs 10 GiB free for a safe kill threshold; {(total - used) / GIB:.1f} GiB free")
    # The run itself takes ~2 GiB (Ray, driver, controller, one worker); the rest of the margin absorbs what other
    # processes on the machine take meanwhile (else the monitor kills whichever Ray process is newest, too early).
    threshold = (used + 6 * GIB) / total
    cfg = job(tmp_path, digits_dir, train={"epochs": 3, "max_failures": 3}, scaling={"num_workers": 1},
              tracking={"experiment": "oom", "run_name": "oom"})
    path = tmp_path / "job.yaml"
    path.write_text(cfg.to_yaml())
    ray_tmp = tempfile.mkdtemp(prefix="rwoom")  # its own Ray session folder (unix socket paths must stay short)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RWRAY_WORKER_STATUS_DIR")}
    env.update(RAY_memory_usage_threshold=f"{threshold:.4f}", RAY_memory_monitor_refresh_ms="100", RAY_TMPDIR=ray_tmp,
               RWRAY_FAULT_MEMORY="rank=0,epoch=1,step=2,gib=10,hold_s=60")
    happened = ""
    try:
        t0 = time.monotonic()
        proc = subprocess.run([str(BIN / "rwray"), "train", str(path)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=540)
        wall = time.monotonic() - t0
        term = proc.stdout + proc.stderr
        assert proc.returncode == 1, term[-4000:]
        assert "Traceback" not in term, term[-4000:]
        (retry,) = [ln for ln in term.splitlines() if "restarting the workers" in ln]
        assert retry.startswith("out of memory: train worker rank 0 (pid ") and retry.endswith(
            "(retry 1 of train.max_failures=3)"), term[-4000:]
        assert "killed by Ray's memory monitor in epoch 2 of 3, after training step 3 (it used" in retry
        report = term[term.index("error: OutOfMemory"):]
        first_pid = int(re.search(r"\(pid (\d+)", retry)[1])
        last_pid = int(re.search(r"\(pid (\d+)", report)[1])
        assert first_pid != last_pid  # two worker processes, one per attempt, each killed
        assert f"out of memory: train worker rank 0 (pid {last_pid}, node " in report
        assert "was killed in epoch 2 of 3, after training step 3 of 29." in report  # 460 rows / 16 = 29 steps
        figures = re.search(r"memory: the process used (\d+\.\d) GiB; node \S+ had (\d+\.\d) of (\d+\.\d) GiB in use "
                            r"\((\d+)%\), over Ray's kill threshold of (\d+)%", report)
        assert figures, report
        assert int(figures[5]) == round(100 * threshold) and float(figures[3]) == round(total / GIB, 1)
        assert float(figures[1]) >= 0.5  # the injector's chunks: at least two 256 MiB pieces were taken
        assert ("retries: Ray Train restarted the workers 1 time from the last checkpoint and they ran out of memory "
                "again before reaching another one") in report
        assert "lower data.batch_size (now 16; data.batch_size=8 with train.grad_accum=2" in report
        assert "scaling.memory_per_worker_gb=" in report
        assert "closes as FAILED and keeps the metrics and checkpoints logged so far. Ray's own report is in " in report
        c = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        (r,) = c.search_runs([c.get_experiment_by_name("oom").experiment_id])
        assert r.info.status == "FAILED"
        assert r.data.tags["rwray.error"].startswith(f"OutOfMemory: out of memory: train worker rank 0 (pid {last_pid}")
        assert [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] == [0]  # epoch 1, kept
        assert [a.path for a in c.list_artifacts(r.info.run_id, "checkpoints/best")] == ["checkpoints/best/state.pt"]
        log = next((tmp_path / "runs" / "logs").glob("oom-*.log")).read_text()
        assert "were killed due to the node running low on memory" in log  # Ray's own words: in the log file
        happened = ("rank 0 killed twice (epoch 2, after step 3 of 29); the first kill retried with one terminal "
                    "line, the second, before another checkpoint, stopped the run: exit code 1, no traceback, "
                    "OutOfMemory naming the rank and its node, the stage, the process's and the node's memory against "
                    "the threshold, data.batch_size and scaling.memory_per_worker_gb; MLflow run FAILED with epoch "
                    "1's metrics and best checkpoint; Ray's own report in the log file")
        print(f"wall {wall:.0f} s; the process used {figures[1]} GiB; node at {figures[2]} GiB, threshold "
              f"{figures[5]}%")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        RECORD.add("oom-kill", "Ray's memory monitor kills training worker rank 0 in epoch 2 (threshold set 6 GiB "
                   "above the machine's use; RWRAY_FAULT_MEMORY allocates past it; train.max_failures=3)",
                   "one retry line, then a report naming the process, stage, memory figures and config fields; exit "
                   "code 1, no traceback; MLflow run FAILED, earlier epochs kept",
                   happened or "see test failure", bool(happened), "memory")
