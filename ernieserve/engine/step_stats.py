"""Where the engine's time goes, step by step. Opt-in: `ERNIESERVE_STEP_STATS=1`.

`EngineCore.step()` is schedule -> execute -> update. Execute (rank 0's model runner) builds the
step's inputs, launches the forward (a CUDA graph replay or eager kernels) and the sampler, and
reads the PREVIOUS step's sampled ids, the one host sync; the time blocked there is device time the
host could not hide. A step whose host work exceeds its device work never waits: it is
host-bound. The summary groups steps by kind:

- ``decode-graph``: every request has one new token, replayed from a captured graph;
- ``decode-eager``: the same without a graph (batch above the capture sizes, or eager mode);
- ``mixed``: prefill chunks (and decodes) in one eager step;
- ``idle``: nothing scheduled (only the previous step's ids are read).

`ERNIESERVE_PROFILE_STEPS=START:COUNT` additionally runs torch.profiler over COUNT steps from the
START-th and logs the kernels that took the most device time (`ERNIESERVE_PROFILE_ROWS` of them,
20 unless set) and the kernel launches per step; `ERNIESERVE_PROFILE_TRACE=FILE.json` also writes
the timeline there (Chrome trace format; `benchmarks/trace_gaps.py` finds where the device idles).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# runner-side segments, in the order they happen within one execute call
RUNNER_SEGMENTS = ("build", "forward", "sample", "wait")
_COLUMNS = ("schedule", *RUNNER_SEGMENTS, "update", "total")
# CUDA only: mean device span per step of the kind (first kernel launched to sampler done, read
# back with the step's ids; on eager steps it includes the device idling between slow launches)
_DEVICE = "device"


def step_stats_enabled() -> bool:
    return os.environ.get("ERNIESERVE_STEP_STATS", "0") not in ("", "0")


@dataclass(slots=True)
class StepTimes:
    """One execute call of the model runner, filled as it goes (seconds)."""

    kind: str = "idle"
    num_tokens: int = 0
    num_reqs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # CUDA: (kind, ms) of the steps read back during this call (the previous step's, usually): the
    # device-side time from the first launch of that step's forward to the end of its sampler
    device_spans: list[tuple[str, float]] = field(default_factory=list)

    def add(self, segment: str, dt: float) -> None:
        self.seconds[segment] = self.seconds.get(segment, 0.0) + dt


class StepStats:
    def __init__(self) -> None:
        self._steps: dict[str, int] = defaultdict(int)
        self._tokens: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._device_ms: dict[str, list[float]] = defaultdict(list)

    def record(self, runner: StepTimes, schedule_s: float, update_s: float, total_s: float) -> None:
        kind = runner.kind
        self._steps[kind] += 1
        self._tokens[kind] += runner.num_tokens
        acc = self._seconds[kind]
        for segment, dt in runner.seconds.items():
            acc[segment] += dt
        acc["schedule"] += schedule_s
        acc["update"] += update_s
        acc["total"] += total_s
        for span_kind, ms in runner.device_spans:
            self._device_ms[span_kind].append(ms)

    def reset(self) -> None:
        self._steps.clear()
        self._tokens.clear()
        self._seconds.clear()
        self._device_ms.clear()

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Per kind: steps, tokens, and the mean milliseconds of each segment per step."""
        out = {}
        for kind, n in self._steps.items():
            row = {"steps": n, "tokens": self._tokens[kind]}
            row.update({f"{c}_ms": self._seconds[kind].get(c, 0.0) / n * 1e3 for c in _COLUMNS})
            spans = self._device_ms.get(kind)
            if spans:
                row[f"{_DEVICE}_ms"] = sum(spans) / len(spans)
            out[kind] = row
        return out

    def summary(self) -> str:
        rows = self.as_dict()
        if not rows:
            return "step stats: no steps recorded"
        total_s = sum(self._seconds[k]["total"] for k in rows)
        columns = _COLUMNS + ((_DEVICE,) if self._device_ms else ())
        head = f"{'kind':<13}{'steps':>7}{'tokens':>9}{'wall s':>8}" + "".join(f"{c:>10}" for c in columns)
        lines = [f"step stats ({sum(self._steps.values())} steps, {total_s:.2f} s in EngineCore.step; "
                 f"columns after 'wall s': mean ms per step)", head]
        for kind in sorted(rows, key=lambda k: -self._seconds[k]["total"]):
            r = rows[kind]
            lines.append(f"{kind:<13}{r['steps']:>7}{r['tokens']:>9}{self._seconds[kind]['total']:>8.2f}"
                         + "".join(f"{r[c + '_ms']:>10.3f}" if c + "_ms" in r else f"{'-':>10}"
                                   for c in columns))
        return "\n".join(lines)


class StepProfiler:
    """torch.profiler over a window of steps (ERNIESERVE_PROFILE_STEPS=START:COUNT)."""

    def __init__(self, spec: str) -> None:
        try:
            start, count = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ValueError(f"ERNIESERVE_PROFILE_STEPS must be START:COUNT, got {spec!r}") from None
        if start < 0 or count < 1:
            raise ValueError(f"ERNIESERVE_PROFILE_STEPS must be START:COUNT with COUNT >= 1, got {spec!r}")
        self.start, self.count = start, count
        self.step = 0
        self._prof = None

    @classmethod
    def from_env(cls) -> StepProfiler | None:
        spec = os.environ.get("ERNIESERVE_PROFILE_STEPS", "")
        return cls(spec) if spec else None

    def before_step(self) -> None:
        if self.step == self.start:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()

    def after_step(self) -> None:
        self.step += 1
        if self._prof is not None and self.step == self.start + self.count:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            logger.info("torch.profiler over steps %d..%d:\n%s", self.start, self.step - 1, self.report())
            trace = os.environ.get("ERNIESERVE_PROFILE_TRACE", "")
            if trace:  # the timeline (Chrome trace format): benchmarks/trace_gaps.py reads it
                self._prof.export_chrome_trace(trace)
                logger.info("torch.profiler trace written to %s", trace)
            self._prof = None

    def report(self) -> str:
        assert self._prof is not None
        events = self._prof.key_averages()
        device = [e for e in events if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA")]
        if not device:  # CPU only: the host ops
            return events.table(sort_by="self_cpu_time_total", row_limit=20)
        launches = sum(e.count for e in device)
        busy_us = sum(e.self_device_time_total for e in device)
        rows = int(os.environ.get("ERNIESERVE_PROFILE_ROWS", "20"))
        top = sorted(device, key=lambda e: -e.self_device_time_total)[:rows]
        lines = [f"{launches / self.count:.0f} kernels and {busy_us / self.count / 1e3:.3f} ms of device time per step"]
        lines += [f"  {e.self_device_time_total / self.count / 1e3:8.3f} ms/step {e.count / self.count:7.1f}x  {e.key[:90]}"
                  for e in top]
        return "\n".join(lines)


def report_step_stats(llm: object) -> str | None:
    """The summary of an offline `LLM`'s engine when step stats are on (for the benchmarks)."""
    core = getattr(getattr(llm, "llm_engine", None), "core", None)
    stats = getattr(core, "step_stats", None)
    return stats.summary() if stats is not None else None
