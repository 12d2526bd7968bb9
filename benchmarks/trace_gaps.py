"""Where a profiled window of engine steps spends device time, and where the device sits idle.

Reads the Chrome trace that `ERNIESERVE_PROFILE_TRACE=FILE.json` (with `ERNIESERVE_PROFILE_STEPS`)
writes, and prints per step:

* the window's length, the device's busy time (the union of kernel, copy and memset intervals: with
  programmatic dependent launch kernels overlap) and its idle time;
* device time by the host call that launched it (`cudaGraphLaunch`: the replayed graph;
  `cudaLaunchKernel`, `cudaMemcpyAsync`, ...: work outside any graph), with the outside work by name;
* the idle gaps longer than `--min-gap-us`, grouped by the activity before and after them, each
  marked "host-late" when the call that launched the next activity began after the gap had opened
  (the host was behind, not the device).

    ERNIESERVE_PROFILE_STEPS=20:10 ERNIESERVE_PROFILE_TRACE=/tmp/trace.json python3 -m ernieserve \
        bench latency ... && python3 benchmarks/trace_gaps.py /tmp/trace.json --steps 10
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class Activity:
    name: str
    start: float  # µs
    end: float
    launcher: str  # the host runtime call with the same correlation id ("?" when none was recorded)
    launch_ts: float | None  # when that call began


def load(path: str) -> list[Activity]:
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    runtime = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                runtime[corr] = e
    acts = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in DEVICE_CATS:
            continue
        corr = (e.get("args") or {}).get("correlation")
        call = runtime.get(corr)
        acts.append(Activity(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)),
                             call["name"] if call else "?", float(call["ts"]) if call else None))
    acts.sort(key=lambda a: (a.start, a.end))
    return acts


def short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def analyse(acts: list[Activity], steps: int, min_gap_us: float, rows: int) -> str:
    if not acts:
        return "no device activity in the trace (was it a CUDA run with ERNIESERVE_PROFILE_STEPS?)"
    window = acts[-1].end - acts[0].start
    busy = 0.0
    gaps: list[tuple[float, Activity, Activity]] = []
    cur_end, last = acts[0].start, acts[0]  # the union of the intervals so far ends at cur_end, with `last`
    for a in acts:
        if a.start > cur_end:
            gaps.append((a.start - cur_end, last, a))
        if a.end > cur_end:
            busy += a.end - max(a.start, cur_end)
            cur_end, last = a.end, a
    idle = window - busy
    by_launcher: dict[str, float] = defaultdict(float)
    outside: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for a in acts:
        by_launcher[a.launcher] += a.end - a.start
        if a.launcher != "cudaGraphLaunch":
            outside[a.name][0] += 1
            outside[a.name][1] += a.end - a.start
    per = 1.0 / steps
    lines = [f"{len(acts) * per:.0f} device activities per step; window {window * per / 1e3:.3f} ms/step: "
             f"busy {busy * per / 1e3:.3f} ms, idle {idle * per / 1e3:.3f} ms ({100 * idle / window:.1f}%)",
             "device time by launching call (ms/step, sums overlapping kernels):"]
    lines += [f"  {t * per / 1e3:8.3f}  {k}" for k, t in sorted(by_launcher.items(), key=lambda kv: -kv[1])]
    lines.append("outside the graphs (count/step, ms/step):")
    lines += [f"  {c * per:6.1f}x {t * per / 1e3:8.4f}  {short(n, 90)}"
              for n, (c, t) in sorted(outside.items(), key=lambda kv: -kv[1][1])[:rows]]
    groups: dict[tuple[str, str, bool], list[float]] = defaultdict(lambda: [0, 0.0])
    for gap, before, after in gaps:
        if gap < min_gap_us:
            continue
        host_late = after.launch_ts is not None and after.launch_ts > before.end
        g = groups[(short(before.name), short(after.name), host_late)]
        g[0] += 1
        g[1] += gap
    small = sum(g for g, _, _ in gaps if g < min_gap_us)
    lines.append(f"idle gaps of at least {min_gap_us:g} us (count/step, ms/step; {small * per / 1e3:.3f} ms/step in "
                 f"shorter ones):")
    lines += [f"  {c * per:6.1f}x {t * per / 1e3:8.4f}  {'host-late ' if late else ''}{b}  ->  {a}"
              for (b, a, late), (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:rows]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="the Chrome trace ERNIESERVE_PROFILE_TRACE wrote")
    ap.add_argument("--steps", type=int, default=1, help="steps in the profiled window (figures are per step)")
    ap.add_argument("--min-gap-us", type=float, default=3.0, help="list idle gaps at least this long")
    ap.add_argument("--rows", type=int, default=20, help="rows per table")
    args = ap.parse_args()
    acts = load(args.trace)
    print(analyse(acts, args.steps, args.min_gap_us, args.rows))


if __name__ == "__main__":
    main()
