"""edge_msd.bench.sustained: windowed p50 over a sustained run."""

from __future__ import annotations

import time

from edge_msd.bench.timing import Deadline


def test_sustained_windows():
    from edge_msd.bench.sustained import sustained, windows_p50

    samples = [100_000_000] * 10 + [200_000_000] * 5  # 1 s at 100 ms, then 1 s at 200 ms
    wins = windows_p50(samples, 0.5)
    assert [w["p50_ms"] for w in wins] == [100, 100, 200, 200] and [w["n"] for w in wins] == [5, 5, 2, 3]
    out = sustained(lambda x: time.sleep(0.002), [0], 0.2, Deadline(), "MAXN")
    assert out["power_mode"] == "MAXN" and out["complete"] and sum(w["n"] for w in out["windows"]) > 10
