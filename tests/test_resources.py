"""The resource preflight (rwray.train.resources): packing, the refusal message, the local Ray's size, the wait for
an autoscaler; one test against the shared local Ray."""

from __future__ import annotations

import json

import pytest
from conftest import job

from rwray.errors import ConfigError, ResourceError
from rwray.train import resources as R
from rwray.train.resources import Growth, Request

GIB = 2**30
LAPTOP = {"CPU": 4.0, "memory": 12.3 * GIB, "object_store_memory": 2e9, "node:10.0.0.1": 1.0}


def cfg_with(tmp_path, **scaling):
    return job(tmp_path, tmp_path / "data", scaling=scaling)


# --- schema and request -----------------------------------------------------------------------------------------


def test_request_from_config(tmp_path):
    assert R.request(cfg_with(tmp_path)) == Request(2, {"CPU": 1.0}, 1)  # gpus_per_worker ignored without use_gpu
    cfg = cfg_with(tmp_path, num_workers=3, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=2,
                   memory_per_worker_gb=1.5)
    assert R.request(cfg, trials=4) == Request(3, {"CPU": 2.0, "GPU": 0.5, "memory": 1610612736}, 4)
    assert cfg.scaling.resource_wait_s == 600.0 and cfg_with(tmp_path).scaling.memory_per_worker_gb is None


@pytest.mark.parametrize("field,value,text", [
    ("resource_wait_s", -1, "scaling.resource_wait_s: Input should be greater than or equal to 0"),
    ("resource_wait_s", 86401, "scaling.resource_wait_s: Input should be less than or equal to 86400"),
    ("memory_per_worker_gb", 0, "scaling.memory_per_worker_gb: Input should be greater than 0"),
])
def test_scaling_bounds(tmp_path, field, value, text):
    with pytest.raises(ConfigError) as e:
        cfg_with(tmp_path, **{field: value})
    assert text in str(e.value)


def test_local_cpus():
    # the machine's cores + 2 data slots per concurrent run, whatever the request
    assert [R.local_cpus(2, 1), R.local_cpus(2, 3), R.local_cpus(16, 1), R.local_cpus(0, 0)] == [4, 8, 18, 3]


# --- packing ----------------------------------------------------------------------------------------------------


def test_fits():
    assert not R.fits(Request(2, {"CPU": 1.0, "GPU": 1.0}), [LAPTOP])  # no GPU anywhere
    assert not R.fits(Request(64, {"CPU": 1.0}), [LAPTOP])
    assert R.fits(Request(4, {"CPU": 1.0}), [LAPTOP])
    assert R.fits(Request(8, {"CPU": 0.5}), [LAPTOP]) and not R.fits(Request(9, {"CPU": 0.5}), [LAPTOP])
    assert R.fits(Request(10, {"CPU": 0.3}), [{"CPU": 3.0}])  # 3 / 0.3 = 9.999... in floats; Ray counts 1/10000s
    # 6 CPUs in all, but no node holds a 3-CPU bundle: Ray never splits a bundle
    assert not R.fits(Request(2, {"CPU": 3.0}), [{"CPU": 2.0}] * 3)
    assert R.fits(Request(2, {"CPU": 3.0}), [{"CPU": 3.0}, {"CPU": 3.5}])  # one bundle per node (PACK is soft)
    assert R.fits(Request(2, {"CPU": 1.0, "memory": 8 * GIB}), [{"CPU": 8.0, "memory": 16 * GIB}])
    assert not R.fits(Request(3, {"CPU": 1.0, "memory": 8 * GIB}), [{"CPU": 8.0, "memory": 16 * GIB}])
    assert not R.fits(Request(1, {"CPU": 1.0, "memory": GIB}), [{"CPU": 8.0}])  # a node without memory counted


def test_at_once():
    six = [{"CPU": 6.0}]
    assert R.at_once(Request(1, {"CPU": 1.0}, trials=4), six) == 4
    assert R.at_once(Request(1, {"CPU": 1.0}, trials=8), six) == 6
    assert R.at_once(Request(2, {"CPU": 1.0}, trials=5), six) == 3
    assert R.at_once(Request(2, {"CPU": 3.0}, trials=5), [{"CPU": 2.0}] * 3) == 0


# --- the message ------------------------------------------------------------------------------------------------

ADD = "  - add nodes that hold them (join a cluster with RAY_ADDRESS, or use a bigger machine)"


def test_explain_gpu_without_gpus():
    lines = R.explain(Request(2, {"CPU": 1.0, "GPU": 1.0}), [LAPTOP]).split("\n")
    assert lines == [
        "cannot start: the run asks for 2 workers x {CPU: 1, GPU: 1}, and the cluster's nodes hold none of them.",
        "The cluster has 1 node: CPU 4, GPU 0, memory 12.3 GiB.",
        "Fix, any one of:",
        "  - scaling.use_gpu=false (no node has a GPU)",
        ADD]


def test_explain_too_many_workers():
    lines = R.explain(Request(64, {"CPU": 1.0}), [LAPTOP]).split("\n")
    assert lines == [
        "cannot start: the run asks for 64 workers x {CPU: 1}, and the cluster's nodes hold only 4.",
        "The cluster has 1 node: CPU 4, GPU 0, memory 12.3 GiB.",
        "Fix, any one of:",
        "  - scaling.num_workers=4 (the most workers of this size the nodes hold)",
        "  - scaling.cpus_per_worker=0.062 (the most per worker with which 64 fit)",  # 4 / 64 = 0.0625, rounded down
        ADD]


def test_explain_fractional_cpus_and_shared_gpu():
    text = R.explain(Request(3, {"CPU": 1.5}), [{"CPU": 4.0}])
    assert "3 workers x {CPU: 1.5}" in text and "hold only 2." in text and "1 node: CPU 4, GPU 0." in text
    assert "scaling.num_workers=2 " in text and "scaling.cpus_per_worker=1.3 " in text  # 3 x 1.3 <= 4 < 3 x 1.4
    text = R.explain(Request(2, {"CPU": 1.0, "GPU": 1.0}), [{"CPU": 8.0, "GPU": 1.0}])
    assert "scaling.gpus_per_worker=0.5 " in text and "use_gpu=false" not in text


def test_explain_packing_and_memory():
    text = R.explain(Request(2, {"CPU": 3.0}), [{"CPU": 2.0}] * 3)
    assert "The cluster has 3 nodes: CPU 2, GPU 0." in text and "hold none of them" in text
    assert "scaling.cpus_per_worker=2 " in text and "num_workers" not in text
    text = R.explain(Request(4, {"CPU": 1.0, "memory": 8 * GIB}), [{"CPU": 8.0, "memory": 16 * GIB}])
    assert "4 workers x {CPU: 1, memory: 8 GiB}" in text and "CPU 8, GPU 0, memory 16 GiB" in text
    assert "scaling.num_workers=2 " in text and "scaling.memory_per_worker_gb=4 " in text


def test_explain_gpu_and_too_many_workers_combine():
    text = R.explain(Request(8, {"CPU": 1.0, "GPU": 1.0}), [LAPTOP])
    assert "scaling.use_gpu=false scaling.num_workers=4 " in text
    assert "scaling.use_gpu=false scaling.cpus_per_worker=0.5 " in text
    # nothing the run can change helps on a CPU-less head node
    assert R.explain(Request(2, {"CPU": 1.0}), [{"CPU": 0.0}]).endswith("Fix, any one of:\n" + ADD)


def test_explain_trials():
    text = R.explain(Request(64, {"CPU": 1.0}, trials=8), [LAPTOP])
    assert text.startswith("cannot start: each of the 8 trials asks for 64 workers x {CPU: 1}, and the cluster's "
                           "nodes hold only 4 (trials that do not all fit at once run one after another, so one "
                           "trial's workers must fit).\n")
    assert "scaling.num_workers=4 " in text


# --- autoscalers ------------------------------------------------------------------------------------------------


def test_could_grow():
    head = [{"CPU": 0.0, "memory": 30 * GIB}]  # cluster.yaml: a CPU-less head, GPU workers added on demand
    gpus = Request(2, {"CPU": 1.0, "GPU": 1.0})
    assert not R.could_grow(gpus, head, None)
    assert R.could_grow(gpus, head, Growth())  # an autoscaler that does not say what it can add
    assert R.could_grow(gpus, head, Growth([("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 8)]))
    assert not R.could_grow(gpus, head, Growth([("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 1)]))
    assert R.could_grow(Request(64, {"CPU": 1.0}), head, Growth([("cpu", {"CPU": 4.0}, -1)]))
    assert not R.could_grow(gpus, head, Growth([("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 8)], {"GPU": 1.0}))
    assert not R.could_grow(gpus, head, Growth([]))


def test_v1_report(monkeypatch):
    """A laptop's monitor (read-only provider) names each node after itself; `ray up` nodes carry their types."""
    import ray.experimental.internal_kv as kv

    def report(mapping, launches=None):
        blob = json.dumps({"autoscaler_report": {"node_type_mapping": mapping, "pending_launches": launches or {}}})
        monkeypatch.setattr(kv, "_internal_kv_get", lambda key, **kw: blob.encode())

    report({"a0e5": "node_a0e5"})
    assert not R._managed_v1()
    report({"10.0.0.1": "head"})
    assert R._managed_v1()
    report({"a0e5": "node_a0e5"}, {"gpu_worker": 2})
    assert R._managed_v1()
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, **kw: None)
    assert not R._managed_v1()


class Clock:
    def __init__(self):
        self.t = 0.0

    def monotonic(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.fixture
def fake_cluster(monkeypatch):
    """check() against scripted node lists, a scripted autoscaler and a fake clock (no Ray, no real waiting)."""
    state = {"nodes": [[LAPTOP]], "growth": None, "asked": [], "said": []}
    clock = Clock()
    monkeypatch.setattr(R.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(R.time, "sleep", clock.sleep)
    monkeypatch.setattr(R, "alive_nodes", lambda: state["nodes"].pop(0) if len(state["nodes"]) > 1
                        else state["nodes"][0])
    monkeypatch.setattr(R, "autoscaler", lambda: state["growth"])
    monkeypatch.setattr(R, "_ask", lambda bundles: state["asked"].append(bundles))
    state["clock"] = clock
    return state


def test_check_without_autoscaler_refuses_at_once(tmp_path, fake_cluster):
    with pytest.raises(ResourceError) as e:
        R.check(cfg_with(tmp_path, num_workers=64), say=fake_cluster["said"].append)
    assert str(e.value) == R.explain(Request(64, {"CPU": 1.0}), [LAPTOP])
    assert fake_cluster["said"] == [] and fake_cluster["asked"] == [] and fake_cluster["clock"].t == 0


def test_check_with_known_groups_that_cannot_hold_it(tmp_path, fake_cluster):
    fake_cluster["growth"] = Growth([("cpu_worker", {"CPU": 4.0}, 2)])
    with pytest.raises(ResourceError) as e:
        R.check(cfg_with(tmp_path, use_gpu=True), say=fake_cluster["said"].append)
    assert str(e.value).endswith("\nThe autoscaler's node types cannot add them either: cpu_worker (up to 2): "
                                 "CPU 4, GPU 0.")
    assert fake_cluster["said"] == [] and fake_cluster["clock"].t == 0


def test_check_waits_for_the_autoscaler(tmp_path, fake_cluster):
    gpu_node = {"CPU": 8.0, "GPU": 1.0}
    fake_cluster.update(growth=Growth(), nodes=[[LAPTOP], [LAPTOP], [LAPTOP, gpu_node], [LAPTOP, gpu_node, gpu_node]])
    got = R.check(cfg_with(tmp_path, use_gpu=True), trials=3, say=fake_cluster["said"].append)
    assert got == 1  # two GPU nodes: one 2-worker trial at a time
    assert fake_cluster["said"] == [("waiting up to 600 s for the autoscaler to add nodes for 2 workers x "
                                     "{CPU: 1, GPU: 1} (scaling.resource_wait_s)")]
    assert fake_cluster["asked"] == [[{"CPU": 1.0, "GPU": 1.0}] * 2, []]  # asked for, then withdrawn
    assert fake_cluster["clock"].t == 3 * R.POLL_S


def test_check_gives_up_after_the_wait(tmp_path, fake_cluster):
    fake_cluster["growth"] = Growth()
    with pytest.raises(ResourceError) as e:
        R.check(cfg_with(tmp_path, use_gpu=True, resource_wait_s=12), say=fake_cluster["said"].append)
    assert str(e.value).endswith("\nWaited 12 s for the autoscaler (scaling.resource_wait_s).")
    assert "scaling.use_gpu=false (no node has a GPU)" in str(e.value)
    assert fake_cluster["clock"].t == 12 and fake_cluster["asked"][-1] == []
    with pytest.raises(ResourceError, match="scaling.resource_wait_s=0"):
        R.check(cfg_with(tmp_path, use_gpu=True), wait_s=0, say=fake_cluster["said"].append)


# --- the real local Ray -----------------------------------------------------------------------------------------


def test_check_on_local_ray(tmp_path, ray_local):
    """ray_local declares 6 CPUs and no GPU, and has no autoscaler: refusals come at once (nothing is said, so
    nothing was waited for), a run that fits returns how many trials fit side by side."""
    said: list[str] = []
    assert R.autoscaler() is None
    with pytest.raises(ResourceError) as e:
        R.check(cfg_with(tmp_path, use_gpu=True), say=said.append)
    assert "  - scaling.use_gpu=false (no node has a GPU)" in str(e.value)
    with pytest.raises(ResourceError) as e:
        R.check(cfg_with(tmp_path, num_workers=64), say=said.append)
    assert "hold only 6." in str(e.value) and "  - scaling.num_workers=6 " in str(e.value)
    assert said == []
    assert R.check(cfg_with(tmp_path, num_workers=2), trials=4, say=said.append) == 3
