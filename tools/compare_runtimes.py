#!/usr/bin/env python3
"""Latency of several bundles of one student side by side: one process, calls interleaved round by
round (drift and noisy neighbours hit every bundle alike), each bundle's own runtime through the
benchmark's runners, batch 1, a fixed thread count. Prints one JSON object: per bundle and tower, the
p50/p90 milliseconds and the runtime used.

    python tools/compare_runtimes.py runs/export/executorch runs/export/tflite --threads 1 --rounds 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_msd.bench import runtimes  # noqa: E402
from edge_msd.bench.timing import latency_stats  # noqa: E402
from edge_msd.contract.reading import open_bundle, tower_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="bundle folders (of the same student)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=200, help="timed calls per bundle and tower")
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    calls = {}
    for path in args.bundles:
        b = open_bundle(path)
        files = runtimes.model_files(b.root, b.manifest["models"], None)
        backend = runtimes.select_backend(b.manifest["target"]["bench"].get("runtime", "auto"), files)
        data = b.load_npz("probe.npz")
        for tower in b.towers:
            session = backend().load(b.model(tower), b.model_path(tower), args.threads, 1, {})
            feed = session.prepare(tower_inputs(b, tower, data)[:1])
            calls[(path, tower)] = (backend.name, session, feed)
    times: dict = {key: [] for key in calls}
    for _ in range(args.warmup):
        for _name, session, feed in calls.values():
            session.run(feed)
    for _ in range(args.rounds):
        for key, (_name, session, feed) in calls.items():
            t0 = time.perf_counter_ns()
            session.run(feed)
            times[key].append(time.perf_counter_ns() - t0)
    out: dict = {"threads": args.threads, "batch": 1, "rounds": args.rounds, "bundles": {}}
    for (path, tower), (name, _s, _f) in calls.items():
        stats = latency_stats(times[(path, tower)])
        out["bundles"].setdefault(path, {"runtime": name})[tower] = {
            f"{k}_ms": round(stats[k], 4) for k in ("p50", "p90")
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
