#!/usr/bin/env python3
"""Harness overhead: the benchmark's timed loop vs a bare loop over the same session and inputs.

Both loops run in one process, interleaved round by round (so drift and noisy neighbours hit both
alike), on one loaded session of the bundle's model and one pool of prepared inputs. The bare loop
calls the runtime directly (ONNX Runtime ``sess.run``; LiteRT set_tensor/invoke/get_tensor) and
times each call with perf_counter_ns; the harness loop is ``edge_msd.bench.timing.time_loop`` over
``session.run``. Prints one JSON object: p50 of each, and the overhead in percent (target: < 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_msd.bench import runtimes  # noqa: E402
from edge_msd.bench.run import _pool  # noqa: E402
from edge_msd.bench.timing import latency_stats, time_loop  # noqa: E402
from edge_msd.contract.reading import open_bundle, tower_inputs  # noqa: E402


def bare_call(session: runtimes.Session) -> Callable[[Any], Any]:
    """The runtime's own call, without the harness's session wrapper."""
    if isinstance(session, runtimes.OrtSession):
        sess, out = session.sess, [session.output_name]
        return lambda feed: sess.run(out, feed)
    if isinstance(session, runtimes.LiteRtSession):
        interp, i, o = session.interp, session.inp["index"], session.out["index"]

        def call(feed: np.ndarray) -> np.ndarray:
            interp.set_tensor(i, feed)
            interp.invoke()
            return interp.get_tensor(o)

        return call
    raise SystemExit(f"no bare loop for {type(session).__name__}")


def bare_loop(call: Callable[[Any], Any], pool: list[Any], iters: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for i in range(iters):
        feed = pool[i % len(pool)]
        a = clock()
        call(feed)
        samples.append(clock() - a)
    return samples


def measure(
    bundle: str,
    runtime: str,
    tower: str,
    batch: int,
    threads: int | None,
    iters: int,
    rounds: int,
    warmup: int,
) -> dict[str, Any]:
    b = open_bundle(bundle)
    files = runtimes.model_files(b.root, {tower: b.model(tower)}, None)
    backend = runtimes.select_backend(runtime, files)
    fmt = next(f for f in files[tower] if f in backend.formats)
    session = backend().load(b.model(tower), files[tower][fmt], threads, batch, {})
    data = b.load_npz("evalset.npz") or b.load_npz("probe.npz")
    pool = _pool(tower_inputs(b, tower, data), batch, 8, session)
    call = bare_call(session)
    for i in range(warmup):
        call(pool[i % len(pool)])
    harness, bare = [], []
    for r in range(rounds):  # alternate which loop goes first
        first, second = ("harness", "bare") if r % 2 == 0 else ("bare", "harness")
        for which in (first, second):
            if which == "harness":
                harness += time_loop(session.run, pool, warmup=0, iters=iters).samples_ns
            else:
                bare += bare_loop(call, pool, iters)
    h, bb = latency_stats(harness), latency_stats(bare)
    return {
        "bundle": str(b.root),
        "runtime": backend.name,
        "tower": tower,
        "batch": batch,
        "threads": threads,
        "iters_each": len(harness),
        "harness_p50_ms": h["p50"],
        "bare_p50_ms": bb["p50"],
        "harness_mean_ms": h["mean"],
        "bare_mean_ms": bb["mean"],
        "overhead_p50_pct": 100 * (h["p50"] / bb["p50"] - 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="runs/export/onnx")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--tower", default="image", choices=["image", "text"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=200, help="calls per loop per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=20)
    a = p.parse_args()
    print(
        json.dumps(
            measure(a.bundle, a.runtime, a.tower, a.batch, a.threads, a.iters, a.rounds, a.warmup), indent=2
        )
    )


if __name__ == "__main__":
    main()
