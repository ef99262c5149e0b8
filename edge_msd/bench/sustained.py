"""Sustained runs: ``--sustained SECONDS`` of back-to-back calls, p50 per time window, so that thermal
throttling on a phone or a Jetson shows as a trend (the Jetson power mode is recorded beside it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_msd.bench.timing import Deadline, Timing, time_loop

WINDOWS = 12
SLOWDOWN_WARN = 1.10  # last window's p50 over the first's


def windows_p50(samples_ns: Sequence[int], window_s: float) -> list[dict[str, Any]]:
    """p50 per window of accumulated call time (calls run back to back, so this is wall time less the
    loop's own few µs per call)."""
    x = np.asarray(samples_ns, dtype=np.float64)
    if x.size == 0:
        return []
    ends = np.cumsum(x) / 1e9
    index = np.maximum(np.ceil(ends / window_s - 1e-9).astype(int) - 1, 0)  # a call ending on a boundary
    out = []
    for w in np.unique(index):
        sel = x[index == w] / 1e6
        out.append(
            {"t_s": round(float((w + 1) * window_s), 3), "n": int(sel.size), "p50_ms": float(np.median(sel))}
        )
    return out


def sustained(
    run: Callable[[Any], Any], pool: Sequence[Any], seconds: float, deadline: Deadline, power_mode: str | None
) -> dict[str, Any]:
    """Run for ``seconds`` after the timed measurement (already warm) and summarise per window."""
    timing = Timing()
    time_loop(run, pool, warmup=0, iters=None, duration_s=seconds, deadline=deadline, timing=timing)
    wins = windows_p50(timing.samples_ns, seconds / WINDOWS)
    out: dict[str, Any] = {
        "seconds": seconds,
        "window_s": seconds / WINDOWS,
        "power_mode": power_mode,
        "windows": wins,
        "complete": timing.stopped is None,
        "warning": None,
    }
    if len(wins) >= 2:
        out["slowdown"] = wins[-1]["p50_ms"] / wins[0]["p50_ms"]
        if out["slowdown"] > SLOWDOWN_WARN:
            out["warning"] = (
                f"p50 rose {out['slowdown'] - 1:.0%} from the first to the last window: "
                "thermal throttling or other load"
            )
    return out
