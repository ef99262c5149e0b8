"""The timing loop and its statistics, with trtexec / benchmark_model discipline.

First inference timed on its own, warm-up excluded, ``time.perf_counter_ns`` around each call only,
inputs rotated across a pool of distinct batches (so caches and branch predictors don't see the same
tensor every time), a count or a duration, and a deadline that stops the loop between two calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
UNSTABLE_CV = 0.10  # std/mean above this: the percentiles move between runs; say so
MIN_STABLE_ITERS = 50  # fewer timed calls, or under MIN_STABLE_WALL_S seconds: too short to trust p99
MIN_STABLE_WALL_S = 1.0


class Stop(Exception):
    """The run's deadline passed (``--time-limit``); what was measured so far is kept."""


@dataclasses.dataclass
class Deadline:
    """A monotonic deadline; ``None`` means no limit."""

    at_ns: int | None = None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic_ns() + int(seconds * 1e9))

    def passed(self) -> bool:
        return self.at_ns is not None and time.monotonic_ns() >= self.at_ns


def latency_stats(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """min/mean/std/max and p50..p99 in milliseconds (linear interpolation between order statistics)."""
    x = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if x.size == 0:
        return {"n": 0}
    out = {
        "n": int(x.size),
        "min": float(x.min()),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "max": float(x.max()),
        "cv": float(x.std() / x.mean()) if x.mean() > 0 else 0.0,  # coefficient of variation
    }
    for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    return out


@dataclasses.dataclass
class Timing:
    first_ns: int | None = None
    warmup: int = 0
    samples_ns: list[int] = dataclasses.field(default_factory=list)
    wall_ns: int = 0  # steady-state wall time, loop overhead included (for throughput)
    stopped: str | None = None  # "time limit" when the deadline cut the loop short

    def summary(self, batch: int) -> dict[str, Any]:
        stats = latency_stats(self.samples_ns)
        n = len(self.samples_ns)
        return {
            "first_inference_ms": None if self.first_ns is None else self.first_ns / 1e6,
            "warmup_iters": self.warmup,
            "iters": n,
            "latency_ms": stats,
            "throughput_items_per_s": (n * batch / (self.wall_ns / 1e9)) if n and self.wall_ns else None,
            "complete": self.stopped is None,
            "warnings": stability_warnings(stats, self.wall_ns / 1e9),
        }


def stability_warnings(stats: dict[str, float], wall_s: float) -> list[str]:
    """What makes a measurement untrustworthy, as trtexec warns: high variation, or a run too short."""
    out = []
    n = int(stats.get("n", 0))
    if n and stats["cv"] > UNSTABLE_CV:
        out.append(
            f"unstable: coefficient of variation {stats['cv']:.0%} (> {UNSTABLE_CV:.0%}); "
            "close other programs, fix the CPU governor/clocks, or run longer"
        )
    if n < MIN_STABLE_ITERS or wall_s < MIN_STABLE_WALL_S:
        out.append(
            f"short: {n} timed calls in {wall_s:.2f} s (want ≥ {MIN_STABLE_ITERS} calls and ≥ "
            f"{MIN_STABLE_WALL_S:.0f} s); raise --iters or use --duration"
        )
    return out


def time_loop(
    run: Callable[[Any], Any],
    pool: Sequence[Any],
    *,
    warmup: int = 10,
    iters: int | None = 100,
    duration_s: float | None = None,
    deadline: Deadline | None = None,
    timing: Timing | None = None,
) -> Timing:
    """Time ``run(pool[i % len(pool)])``: first call, ``warmup`` untimed calls, then ``iters`` calls or
    ``duration_s`` seconds (whichever is given; both → whichever ends first).

    ``timing`` may be passed in so that a caller interrupted by Ctrl-C still holds what was measured.
    """
    if not pool:
        raise ValueError("the input pool is empty")
    if iters is None and duration_s is None:
        raise ValueError("give iters or duration_s")
    deadline = deadline or Deadline()
    t = timing if timing is not None else Timing()
    n_pool = len(pool)
    clock = time.perf_counter_ns
    t0 = clock()
    run(pool[0])
    t.first_ns = clock() - t0
    for i in range(warmup):
        if deadline.passed():
            t.stopped = "time limit"
            return t
        run(pool[(i + 1) % n_pool])
        t.warmup = i + 1
    end_ns = None if duration_s is None else clock() + int(duration_s * 1e9)
    max_iters = iters if iters is not None else -1
    samples = t.samples_ns
    start = clock()
    i = 0
    try:
        while i != max_iters:
            if deadline.passed():
                t.stopped = "time limit"
                break
            feed = pool[i % n_pool]
            a = clock()
            run(feed)
            b = clock()
            samples.append(b - a)
            i += 1
            if end_ns is not None and b >= end_ns:
                break
    finally:  # also on Ctrl-C, so that a partial report has a throughput
        t.wall_ns = clock() - start
    return t
