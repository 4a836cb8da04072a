"""Can the cluster hold the run's workers? Asked once Ray is connected, before anything waits on a placement group:
Ray Train would otherwise wait forever for workers that no node (present or addable) can hold.

Ray Train V2 places a run's workers as one placement group of ``num_workers`` identical bundles, strategy PACK (soft:
bundles may land on different nodes), and counts resources in fixed point (1/10000 of a unit). With identical
bundles the packing is exact, not a heuristic: a node holds ``min over resources floor(total / need)`` of them, and
the group fits when the nodes hold ``num_workers`` together. Node totals are used, not what is free now: work that
holds resources ends; a bundle no node can ever hold does not.

Under `rwray tune` / `reproduce` each trial is its own placement group: one trial's workers must fit, and the
number of trials whose workers fit side by side caps how many run at once (the rest run after them).

The pure part (Request, fits, explain, local_cpus) needs no Ray; `check` reads the live cluster.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rwray.config import Config
from rwray.errors import ResourceError

GIB = 2**30
UNITS = 10_000  # Ray's fixed point: resource amounts are whole multiples of 1/10000
DATA_SLOTS = 2  # logical CPUs per concurrent run kept for its Ray Data tasks (read, materialize)
POLL_S = 5.0  # how often the wait for an autoscaler looks at the nodes again
# The config field that sets each per-worker resource, and its unit there (memory: GiB in the job, bytes in Ray).
FIELDS = {"CPU": ("scaling.cpus_per_worker", 1), "GPU": ("scaling.gpus_per_worker", 1),
          "memory": ("scaling.memory_per_worker_gb", GIB)}

Node = dict[str, float]  # one node's total resources, as ray.nodes()[i]["Resources"]


@dataclass(frozen=True)
class Request:
    """``workers`` bundles of ``bundle`` per run (one trial under tune/reproduce), for ``trials`` runs."""

    workers: int
    bundle: dict[str, float]  # Ray resources_per_worker: {"CPU": c, "GPU": g (use_gpu), "memory": bytes (if set)}
    trials: int = 1


def request(cfg: Config, trials: int = 1) -> Request:
    """What one run of ``cfg`` asks of Ray; ``bundle`` is the resources_per_worker to hand Ray Train."""
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}),
              **({"memory": int(s.memory_per_worker_gb * GIB)} if s.memory_per_worker_gb is not None else {})}
    return Request(s.num_workers, bundle, max(1, trials))


def local_cpus(machine_cpus: int, concurrent_runs: int) -> int:
    """Logical CPUs of the local Ray rwray starts: the machine's cores plus DATA_SLOTS per concurrent run, never
    sized to the request (a request bigger than the machine is refused by `check`, not left waiting)."""
    return max(1, machine_cpus) + DATA_SLOTS * max(1, concurrent_runs)


def _units(x: float) -> int:
    return round(x * UNITS)


def _holds(bundle: dict[str, float], node: Node) -> int:
    """How many ``bundle`` one node holds (a large number when the bundle asks for nothing)."""
    need = {r: _units(v) for r, v in bundle.items() if _units(v) > 0}
    return min((_units(node.get(r, 0.0)) // n for r, n in need.items()), default=1 << 30)


def capacity(bundle: dict[str, float], nodes: list[Node]) -> int:
    """How many ``bundle`` the nodes hold together (exact for identical bundles, see the module docstring)."""
    return sum(_holds(bundle, n) for n in nodes)


def fits(req: Request, nodes: list[Node]) -> bool:
    """Can one run's (one trial's) workers be placed on these nodes?"""
    return capacity(req.bundle, nodes) >= req.workers


def at_once(req: Request, nodes: list[Node]) -> int:
    """How many of the ``req.trials`` runs the nodes hold side by side (0: not even one)."""
    return min(req.trials, capacity(req.bundle, nodes) // req.workers)


def _num(x: float) -> str:
    return f"{round(x, 4):g}"


def _gib(x: float) -> str:
    return f"{round(x / GIB, 1):g} GiB"


def _shape(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {_gib(v) if r == 'memory' else _num(v)}" for r, v in bundle.items()) + "}"


def _node(n: Node, keys: tuple[str, ...] = ()) -> str:
    """'CPU 4, GPU 0, memory 12.3 GiB': CPU and GPU always, memory when the node counts it, and any other
    resource named in ``keys`` (the ones a bundle asks for)."""
    shown = ["CPU", "GPU", *[k for k in keys if k not in ("CPU", "GPU", "memory")], "memory"]
    return ", ".join(f"{k} {_gib(n[k]) if k == 'memory' else _num(n.get(k, 0.0))}" for k in shown
                     if k != "memory" or k in n)


def describe(nodes: list[Node], keys: tuple[str, ...] = ()) -> str:
    """'2 nodes: CPU 4, GPU 0, memory 12.3 GiB; 1 node: CPU 0, GPU 0' (identical nodes counted together)."""
    if not nodes:
        return "no alive nodes"
    groups: dict[str, int] = {}
    for n in nodes:
        text = _node(n, keys)
        groups[text] = groups.get(text, 0) + 1
    return "; ".join(f"{c} node{'s' if c != 1 else ''}: {t}" for t, c in groups.items())


def _round_down(x: float) -> float:
    """Two significant digits, rounded down (so the value still fits): 0.0625 -> 0.062, 1.333 -> 1.3."""
    if x <= 0:
        return 0.0
    step = 10 ** (math.floor(math.log10(x)) - 1)
    return math.floor(x / step + 1e-9) * step


def largest_share(req: Request, nodes: list[Node], resource: str) -> float:
    """The most of ``resource`` per worker with which ``req.workers`` fit, other resources unchanged (0: none)."""
    others = {r: v for r, v in req.bundle.items() if r != resource}
    hold_others = [_holds(others, n) for n in nodes]

    def count(share_u: int) -> int:
        return sum(min(_units(n.get(resource, 0.0)) // share_u, h) for n, h in zip(nodes, hold_others))

    lo, hi = 0, _units(req.bundle[resource])  # binary search on fixed-point units; count() falls as share grows
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) >= req.workers else (lo, mid - 1)
    return lo / UNITS


def fixes(req: Request, nodes: list[Node]) -> list[str]:
    """The scaling.* overrides that would make one run fit, one alternative per entry."""
    add = "add nodes that hold them (join a cluster with RAY_ADDRESS, or use a bigger machine)"
    bundle, prefix = dict(req.bundle), ""
    if "GPU" in bundle and not any(n.get("GPU", 0.0) > 0 for n in nodes):
        # Without GPUs the bundle is what use_gpu=false would ask; any other change must come with it.
        bundle.pop("GPU")
        prefix = "scaling.use_gpu=false "
        if capacity(bundle, nodes) >= req.workers:
            return ["scaling.use_gpu=false (no node has a GPU)", add]
    base = Request(req.workers, bundle, req.trials)
    out = []
    most = capacity(bundle, nodes)
    if 1 <= most < req.workers:
        out.append(f"{prefix}scaling.num_workers={most} (the most workers of this size the nodes hold)")
    for r, (name, unit) in FIELDS.items():
        val = _round_down(largest_share(base, nodes, r) / unit) if r in bundle else 0.0
        if 0 < val * unit < bundle.get(r, 0.0):
            out.append(f"{prefix}{name}={val:g} (the most per worker with which {req.workers} fit)")
    return out + [add]


def explain(req: Request, nodes: list[Node]) -> str:
    """The refusal: what was asked, what the nodes have, the fixes."""
    asked = f"{req.workers} worker{'s' if req.workers != 1 else ''} x {_shape(req.bundle)}"
    most = capacity(req.bundle, nodes)
    holds = "none of them" if most == 0 else f"only {most}"
    if req.trials > 1:
        head = (f"cannot start: each of the {req.trials} trials asks for {asked}, and the cluster's nodes hold "
                f"{holds} (trials that do not all fit at once run one after another, so one trial's workers "
                f"must fit).")
    else:
        head = f"cannot start: the run asks for {asked}, and the cluster's nodes hold {holds}."
    return "\n".join([head, f"The cluster has {describe(nodes, tuple(req.bundle))}.", "Fix, any one of:",
                      *(f"  - {f}" for f in fixes(req, nodes))])


@dataclass(frozen=True)
class Growth:
    """What an autoscaler may add: its node groups (name, total resources per node, max count; -1 unbounded) and
    cluster-wide caps when it publishes them; ``groups`` None when one runs but does not say what it can add."""

    groups: list[tuple[str, Node, int]] | None = None
    max_resources: dict[str, float] = field(default_factory=dict)


def could_grow(req: Request, nodes: list[Node], growth: Growth | None) -> bool:
    """Could the autoscaler add nodes that hold one run? Optimistic when groups are known (each group's max count
    is added on top of the current nodes); True when an autoscaler runs without saying; False with none."""
    if growth is None:
        return False
    if growth.groups is None:
        return True
    for r, v in req.bundle.items():
        if r in growth.max_resources and v * req.workers > growth.max_resources[r]:
            return False
    # More than `workers` extra nodes of one group never helps: an added node that holds anything holds one bundle.
    extra = [res for _, res, most in growth.groups for _ in range(req.workers if most < 0 else min(most, req.workers))]
    return fits(req, nodes + extra)


def _growth_text(growth: Growth) -> str:
    if not growth.groups:
        return "The autoscaler's node types cannot add them either."
    kinds = "; ".join(f"{name} (up to {'any number' if most < 0 else most}): {_node(res)}"
                      for name, res, most in growth.groups)
    return f"The autoscaler's node types cannot add them either: {kinds}."


# --- the live cluster (Ray connected) ---------------------------------------------------------------------------


def alive_nodes() -> list[Node]:
    """Each alive node's total resources."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _published() -> Growth | None:
    """The node groups an autoscaler published to the GCS (KV __autoscaler/__autoscaler_cluster_config), which Ray
    Train V2 (WorkerGroup._check_cluster_resources_and_raise_if_insufficient) and Ray Data read too. Only
    autoscalers that send ReportClusterConfig write it; Ray 2.60's own Python ones (v1 under `ray up`, v2 under
    KubeRay) do not, hence the fallbacks below."""
    from ray._private.state import state

    conf = state.get_cluster_config()
    if conf is None or not conf.node_group_configs:
        return None
    groups = [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
              for g in conf.node_group_configs if g.resources and g.max_count != 0]
    return Growth(groups, {k: float(v) for k, v in conf.max_resources.items()})


def _readonly(node: str, kind: str) -> bool:
    """Every head runs Ray's monitor; on a Ray with no autoscaling config (ray.init(), `ray start` by hand) it uses a
    read-only provider that names each node's type after the node itself and can add nothing."""
    from ray.autoscaler._private.util import format_readonly_node_type

    return not kind or kind == format_readonly_node_type(node)


def _managed_v1() -> bool:
    """`ray up`'s (v1) autoscaler publishes no node types or limits, only its report (KV __autoscaling_status):
    nodes it manages carry the user's node type names, and launches it has started are listed."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return bool(report.get("pending_launches")) or any(not _readonly(k, t) for k, t in mapping.items())


def _managed_v2() -> bool:
    """The same signal from the v2 autoscaler (KubeRay): its cluster status names each node's type."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if not is_autoscaler_v2():
        return False
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    st = get_cluster_status(internal_kv_get_gcs_client().address)
    return bool(st.pending_launches) or any(not _readonly(n.node_id or "", n.ray_node_type_name)
                                            for n in st.active_nodes + st.idle_nodes + st.pending_nodes)


def autoscaler() -> Growth | None:
    """What may add nodes: the published node groups; else Growth(groups=None) when an autoscaler manages the
    cluster without saying what it can add (then rwray waits, bounded by scaling.resource_wait_s); else None.
    Anything unreadable counts as no autoscaler: a refusal within seconds beats an unbounded wait."""
    for probe in (_published, lambda: Growth() if _managed_v1() else None, lambda: Growth() if _managed_v2() else None):
        with contextlib.suppress(Exception):  # private Ray state whose shape may change: no information, no crash
            if (found := probe()) is not None:
                return found
    return None


def _ask(bundles: list[dict[str, float]]) -> None:
    """Tell the autoscaler what to make room for: it adds nodes for demand only, and before Ray Train creates its
    placement group nothing demands anything. Persistent until overwritten; [] withdraws it."""
    from ray.autoscaler.sdk import request_resources

    with contextlib.suppress(Exception):  # the wait still bounds the run; a failed hint must not hide the message
        request_resources(bundles=bundles)


def check_decoders(cfg: Config, nodes: list[Node]) -> None:
    """A streaming run's decoding actors (data.decode_actors per worker, data.decode_cpus each) need CPUs beside
    the workers': Ray would otherwise wait forever to place actors no CPU is left for (a hang, not an error)."""
    d, s = cfg.data, cfg.scaling
    if d.decode_actors == 0:
        return
    need = s.num_workers * (s.cpus_per_worker + d.decode_actors * d.decode_cpus)
    have = sum(n.get("CPU", 0.0) for n in nodes)
    if need > have + 1e-9:
        raise ResourceError(
            f"streaming needs {_num(need)} CPUs: {s.num_workers} workers x ({_num(s.cpus_per_worker)} CPU + "
            f"{d.decode_actors} decoding actors x {_num(d.decode_cpus)} CPU), and the cluster has {_num(have)}.\n"
            f"Fix: lower data.decode_actors, data.decode_cpus (fractions are fine: 0.5) or scaling.cpus_per_worker, "
            f"use fewer workers, set data.decode_actors=0 to decode in the workers, or add CPU nodes")


def check(cfg: Config, trials: int = 1, wait_s: float | None = None, say: Callable[[str], None] = print,
          streaming: bool = False) -> int:
    """Refuse at once a run whose workers (one trial's, with ``trials`` > 1) no node can hold and no autoscaler
    can add; wait up to ``wait_s`` (default scaling.resource_wait_s) when one may add them. Returns how many of
    the ``trials`` the nodes hold side by side (>= 1). Raises ResourceError."""
    req = request(cfg, trials)
    nodes = alive_nodes()
    if streaming:
        check_decoders(cfg, nodes)
    if fits(req, nodes):
        return at_once(req, nodes)
    growth = autoscaler()
    wait_s = cfg.scaling.resource_wait_s if wait_s is None else wait_s
    if not could_grow(req, nodes, growth):
        extra = f"\n{_growth_text(growth)}" if growth is not None else ""
        raise ResourceError(explain(req, nodes) + extra)
    if wait_s <= 0:
        raise ResourceError(explain(req, nodes) + "\nAn autoscaler may add nodes, but scaling.resource_wait_s=0.")
    say(f"waiting up to {wait_s:g} s for the autoscaler to add nodes for {req.workers} workers x "
        f"{_shape(req.bundle)} (scaling.resource_wait_s)")
    start = time.monotonic()
    _ask([req.bundle] * req.workers)
    try:
        while time.monotonic() - start < wait_s:
            time.sleep(min(POLL_S, max(0.0, wait_s - (time.monotonic() - start))))
            nodes = alive_nodes()
            if fits(req, nodes):
                return at_once(req, nodes)
    finally:
        _ask([])  # Ray Train's own placement group keeps the nodes from here on
    raise ResourceError(f"{explain(req, nodes)}\nWaited {wait_s:g} s for the autoscaler (scaling.resource_wait_s).")
