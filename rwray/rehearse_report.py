"""A rehearsal (`rwray.rehearse`) as markdown: one section per job, a row per stage with its wall time and the peak
memory of each process it ran (driver, each train worker, each decoding actor, the rest by kind), then what the run
left in MLflow. Pure: rehearsal records in, text out."""

from __future__ import annotations

from typing import Any, Sequence

# the kinds of process named one by one, in this order; the rest are summed up as "others: largest"
NAMED = ("driver", "train worker", "decoding actor", "scoring actor", "train controller", "Ray Data task")


def size(n: float | None) -> str:
    """Bytes in powers of 2 (as RSS and `ray status` count): 950 KiB, 12.3 MiB, 1.2 GiB."""
    if n is None:
        return "-"
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.0f} {units[i]}" if i < 2 or n >= 100 else f"{n:.1f} {units[i]}"


def duration(s: float) -> str:
    s = round(s)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def peaks_text(peaks: dict[str, list[int]]) -> str:
    """``driver 1.2 GiB; train worker 1.1, 1.1 GiB; ...; others (raylet, ...) max 300 MiB``."""
    parts = []
    for kind in NAMED:
        if peaks.get(kind):
            each = ", ".join(size(b) for b in peaks[kind][:8])
            more = f" (+{len(peaks[kind]) - 8} more)" if len(peaks[kind]) > 8 else ""
            parts.append(f"{kind}{'s' if len(peaks[kind]) > 1 else ''} {each}{more}")
    rest = [(k, max(v)) for k, v in peaks.items() if k not in NAMED and v]
    if rest:
        top = max(rest, key=lambda kv: kv[1])
        n = sum(len(peaks[k]) for k, _ in rest)
        parts.append(f"{n} other process{'es' if n > 1 else ''}, largest {size(top[1])} ({top[0]})")
    return "; ".join(parts) or "-"


def section(r: dict[str, Any], level: str = "###") -> str:
    """One job's rehearsal (a `rwray.rehearse.Rehearsal` as a dict)."""
    splits = ", ".join(f"{n:,} {s}" for s, n in r["splits"].items())
    lines = [f"{level} {r['name']}", "",
             f"`{r['job']}` on synthetic {r['dataset']}: {r['num_classes']:,} classes, {splits}; train per class "
             f"{r['train_range'][1]:,} … {r['train_range'][0]:,}.", "",
             "| stage | wall | peak RSS | detail |", "|---|---:|---|---|"]
    for st in r["stages"]:
        lines.append(f"| {st['name']} | {duration(st['seconds'])} | {peaks_text(st['peaks'])} | {st['note']} |")
    fp = r.get("footprint") or {}
    if fp:
        rows = fp.get("rows") or {}
        art = fp.get("artifact_bytes") or {}
        lines += ["", f"MLflow store: {size(fp.get('store_bytes'))}, this run's rows: "
                      + ", ".join(f"{t} {n:,}" for t, n in rows.items())
                      + f" ({fp.get('metric_keys', 0):,} metric names). Artifacts: {size(sum(art.values()))}"
                      + (" (" + ", ".join(f"{k} {size(v)}" for k, v in art.items()) + ")" if art else "") + "."]
    return "\n".join(lines) + "\n"


def memory_comparison(small: dict[str, Any], large: dict[str, Any]) -> str:
    """The same job at two class counts: each kind's largest peak per stage, and the ratio large / small."""
    lines = [f"| stage | process | K = {small['num_classes']:,} | K = {large['num_classes']:,} | ratio |",
             "|---|---|---:|---:|---:|"]
    by_stage = {st["name"]: st for st in small["stages"]}
    for st in large["stages"]:
        other = by_stage.get(st["name"])
        if other is None:
            continue
        for kind in (*NAMED, *sorted(set(st["peaks"]) - set(NAMED))):
            a, b = other["peaks"].get(kind), st["peaks"].get(kind)
            if a and b:
                lines.append(f"| {st['name']} | {kind} | {size(max(a))} | {size(max(b))} | "
                             f"{max(b) / max(a):.2f} |")
    return "\n".join(lines) + "\n"


def markdown(title: str, intro: str, rehearsals: Sequence[dict[str, Any]]) -> str:
    return "\n".join([f"## {title}", "", intro, "", *(section(r) for r in rehearsals)])
