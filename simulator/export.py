"""Timelines out: Chrome/Perfetto trace events and a Gantt chart (matplotlib).

Both lay the passes of an :class:`~tokenloom.simulator.scenario.AttentionResult` end to end.
Tracks: per rank (``pid``) one ``compute`` thread (kernels, merges, and ``wait`` where the compute
stream waits on communication), one ``send:<channel>`` thread per channel it sends on, and one
``a2a:<kind>`` thread per all-to-all. Open the JSON in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterator

from tokenloom.common.files import atomic_write
from tokenloom.simulator.scenario import AttentionResult
from tokenloom.simulator.timeline import Timeline

_US = 1e6


def _span(name: str, cat: str, rank: int, track: str, start: float, end: float, **args) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": track,
            "ts": start * _US, "dur": max(end - start, 0.0) * _US, "args": args}


def _compute_spans(tl: Timeline, offset: float, label: str, max_ranks: int | None = None) -> Iterator[dict]:
    cost = tl.cost
    for r, steps in enumerate(tl.schedule.ranks[:max_ranks]):
        for s, step in enumerate(steps):
            t = offset + tl.post[r, s]
            for op in step.computes:
                dur = cost.compute_s(op)
                yield _span(str(op), "compute", r, "compute", t, t + dur, step=s, **{"pass": label})
                t += dur
            wait_end = offset + tl.wait_end[r, s]
            if wait_end > t:
                yield _span("wait", "exposed_comm", r, "compute", t, wait_end, step=s, **{"pass": label})
            t = wait_end
            for op in step.merges:
                dur = cost.merge_s(op)
                yield _span(str(op), "merge", r, "compute", t, t + dur, step=s, **{"pass": label})
                t += dur


def _comm_spans(tl: Timeline, offset: float, label: str, max_ranks: int | None = None) -> Iterator[dict]:
    a2a: dict[tuple[int, str], list] = defaultdict(list)
    for tr in tl.transfers:
        if max_ranks is not None and tr.src >= max_ranks:
            continue
        if tr.channel.startswith("a2a:"):
            a2a[(tr.src, tr.label, tr.ready)].append(tr)
            continue
        yield _span(f"{tr.label} >{tr.dst}", "p2p", tr.src, f"send:{tr.channel}", offset + tr.ready,
                    offset + tr.end, bytes=tr.num_bytes, latency_end_us=(offset + tr.start) * _US, **{"pass": label})
    for (src, name, ready), group in sorted(a2a.items()):
        end = max(t.end for t in group)
        yield _span(name, "all_to_all", src, group[0].channel, offset + ready, offset + end,
                    bytes=sum(t.num_bytes for t in group), **{"pass": label})


def chrome_trace(result: AttentionResult, max_ranks: int | None = None) -> dict:
    """The Chrome trace-event JSON object for every pass of ``result`` (the first ``max_ranks``
    ranks only, if given)."""
    events: list[dict] = []
    offset = 0.0
    for tl in result.passes:
        label = "backward" if tl.schedule.backward else "forward"
        events.extend(_compute_spans(tl, offset, label, max_ranks))
        events.extend(_comm_spans(tl, offset, label, max_ranks))
        offset += tl.total_s
    tracks = sorted({(ev["pid"], ev["tid"]) for ev in events}, key=lambda x: (x[0], x[1] != "compute", x[1]))
    meta = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}}
            for r in sorted({p for p, _ in tracks})]
    meta += [{"name": "thread_name", "ph": "M", "pid": p, "tid": t, "args": {"name": t}} for p, t in tracks]
    summary = result.summary()
    summary.pop("passes")
    return {"traceEvents": meta + events, "displayTimeUnit": "ms", "otherData": summary}


def write_chrome_trace(result: AttentionResult, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(chrome_trace(result), handle, allow_nan=False)  # strict JSON: Perfetto rejects NaN


def write_gantt(result: AttentionResult, path: str | os.PathLike, max_ranks: int = 8) -> None:
    """PNG Gantt chart: per rank a compute row and a communication row (first ``max_ranks`` ranks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in chrome_trace(result, max_ranks)["traceEvents"] if e["ph"] == "X"]
    ranks = sorted({e["pid"] for e in events})
    colors = {"compute": "#4C72B0", "merge": "#8172B2", "exposed_comm": "#C44E52", "p2p": "#55A868",
              "all_to_all": "#DD8452"}
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.6 * len(ranks)))
    rows = {}
    for r in ranks:
        rows[(r, "compute")] = len(rows)
        rows[(r, "comm")] = len(rows)
    lanes: dict[int, list[str]] = defaultdict(list)  # rank -> its comm channels, stacked in the comm row
    for tid, pid in sorted({(e["tid"], e["pid"]) for e in events if e["tid"] != "compute"}):
        lanes[pid].append(tid)
    # One broken_barh per (row band, colour): a bar per event made 64 ranks take a minute.
    bands: dict[tuple[float, float, str], list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        y, height = rows[(e["pid"], "compute" if e["tid"] == "compute" else "comm")], 0.8
        if e["tid"] != "compute":  # stack channels inside the comm row
            mine = lanes[e["pid"]]
            height = 0.8 / len(mine)
            y = y - 0.4 + height * (mine.index(e["tid"]) + 0.5)
        bands[(-y, height, colors[e["cat"]])].append((e["ts"] / 1e3, e["dur"] / 1e3))
    for (y, height, color), spans in bands.items():
        ax.broken_barh(spans, (y - height * 0.45, height * 0.9), facecolors=color, edgecolor="white",
                       linewidth=0.3)
    ax.set_yticks([-v for v in rows.values()])
    ax.set_yticklabels([f"r{r} {kind}" for r, kind in rows])
    ax.set_xlabel("time (ms)")
    s = result.summary()
    ax.set_title(f"{result.strategy} ({result.layout}) on {s['hardware']}: seq {s['seq']}, "
                 f"{'causal' if s['causal'] else 'full'}, {'fwd+bwd' if s['backward'] else 'fwd'}: "
                 f"{s['total_ms']:.2f} ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(ranks)),
              fontsize=8, ncol=len(colors), frameon=False)
    try:
        fig.tight_layout()
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
    finally:
        plt.close(fig)
