"""TokenWeave timelines out: a Chrome/Perfetto trace and a Gantt PNG.

One process per mode (baseline, tokenweave, no-comm), two threads each (``compute``, ``comm``);
``wait`` spans on the compute thread are where it waits on communication. Open the JSON in
https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import os

from tokenloom.simulator.tokenweave import TokenweaveResult

_US = 1e6
_MODES = ("baseline", "tokenweave", "no-comm")


def chrome_trace(result: TokenweaveResult) -> dict:
    events: list[dict] = []
    for pid, mode in enumerate(_MODES):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": mode}})
        for tid in ("compute", "comm"):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": tid}})
        for s in result.modes[mode].spans:
            cat = "exposed_comm" if s.kind == "wait" else ("comm" if s.stream == "comm" else "compute")
            events.append({"name": s.name, "cat": cat, "ph": "X", "pid": pid, "tid": s.stream,
                           "ts": s.start * _US, "dur": max(s.end - s.start, 0.0) * _US})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": result.summary()}


def write_chrome_trace(result: TokenweaveResult, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(chrome_trace(result), handle)


def write_gantt(result: TokenweaveResult, path: str | os.PathLike, max_layers: int = 2) -> None:
    """PNG: per mode a compute row and a comm row, over the first ``max_layers`` layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"attn": "#4C72B0", "mlp": "#8172B2", "norm": "#937860", "wait": "#C44E52",
              "comm": "#55A868"}
    fig, ax = plt.subplots(figsize=(12, 3.2))
    labels = []
    for i, mode in enumerate(_MODES):
        for j, stream in enumerate(("compute", "comm")):
            y = -(2 * i + j)
            labels.append((y, f"{mode} {stream}"))
            for s in result.modes[mode].spans:
                if s.stream != stream or s.layer >= max_layers:
                    continue
                ax.barh(y, (s.end - s.start) * 1e3, left=s.start * 1e3, height=0.8, color=colors[s.kind],
                        edgecolor="white", linewidth=0.3)
    ax.set_yticks([y for y, _ in labels])
    ax.set_yticklabels([name for _, name in labels], fontsize=8)
    ax.set_xlabel("time (ms)")
    s = result.summary()
    ax.set_title(f"{s['model']} TP{s['tp']} on {s['hardware']}, {s['tokens']} tokens, first "
                 f"{min(max_layers, s['layers'])} layer(s): baseline {s['baseline_ms']:.2f}, TokenWeave "
                 f"{s['tokenweave_ms']:.2f}, no-comm {s['no_comm_ms']:.2f} ms/layer", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8,
              ncol=len(colors), frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
