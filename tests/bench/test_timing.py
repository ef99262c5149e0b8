"""edge_msd.bench.timing: latency statistics, the timing loop, stability warnings."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_msd.bench.timing import Deadline, Timing, latency_stats, time_loop


def test_latency_stats_on_known_data():
    s = latency_stats(np.arange(1, 101) * 1_000_000)  # 1..100 ms
    assert s["n"] == 100 and s["min"] == 1.0 and s["max"] == 100.0
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101)))
    # numpy's linear interpolation: p-th percentile of 1..100 = 1 + 0.99 * p
    for p in (50, 90, 95, 99):
        assert s[f"p{p}"] == pytest.approx(1 + 0.99 * p)
    assert latency_stats([]) == {"n": 0}


def test_time_loop_structure_first_warmup_rotation():
    calls = []
    pool = ["a", "b", "c"]
    t = time_loop(calls.append, pool, warmup=4, iters=7)
    # 1 first inference + 4 warm-up (not timed) + 7 timed, inputs rotating through the pool
    assert len(calls) == 12 and t.warmup == 4 and len(t.samples_ns) == 7
    assert calls[:5] == ["a", "b", "c", "a", "b"]
    assert calls[5:] == ["a", "b", "c", "a", "b", "c", "a"]
    assert t.first_ns is not None and t.wall_ns >= sum(t.samples_ns) and t.stopped is None
    summary = t.summary(batch=2)
    assert summary["iters"] == 7 and summary["complete"] and summary["throughput_items_per_s"] > 0


def test_time_loop_duration_and_deadline():
    t = time_loop(lambda x: time.sleep(0.002), [0], warmup=0, iters=None, duration_s=0.05)
    assert len(t.samples_ns) >= 3 and t.stopped is None
    t = time_loop(lambda x: None, [0], warmup=0, iters=10**9, deadline=Deadline(time.monotonic_ns() - 1))
    assert t.stopped == "time limit" and t.samples_ns == [] and not t.summary(1)["complete"]


def test_time_loop_keeps_samples_on_ctrl_c():
    n = {"calls": 0}

    def run(_):
        n["calls"] += 1
        if n["calls"] == 9:
            raise KeyboardInterrupt

    timing = Timing()
    with pytest.raises(KeyboardInterrupt):
        time_loop(run, [0], warmup=2, iters=100, timing=timing)
    assert len(timing.samples_ns) == 5 and timing.wall_ns > 0  # 1 first + 2 warm-up + 5 timed, 9th raised


def test_stability_warnings():
    from edge_msd.bench.timing import stability_warnings

    steady = latency_stats([1_000_000] * 100)
    assert steady["cv"] == 0 and stability_warnings(steady, 2.0) == []
    noisy = latency_stats([1_000_000, 3_000_000] * 50)  # mean 2 ms, std 1 ms
    assert noisy["cv"] == pytest.approx(0.5)
    (w,) = stability_warnings(noisy, 2.0)
    assert w.startswith("unstable: coefficient of variation 50%")
    (w,) = stability_warnings(latency_stats([1_000_000] * 10), 2.0)
    assert w.startswith("short: 10 timed calls")
