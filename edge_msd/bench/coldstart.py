"""Cold start and the runtime's own memory, measured in a fresh process that imports no torch.

``edge-msd bench`` on the host lives beside torch and the converters, so its process RSS says little
about the model. ``cold_start`` runs ``python -m edge_msd.bench.coldstart`` (the same code as the .pyz,
found on the same path) and reports: import of the runtime, model load and first inference times
(cold), RSS after the runtime import and after the load minus before, and the peak during inference
minus before. Standard library + numpy + the runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CALLS = 20  # inferences after the first, for the peak


def _child(args: dict[str, Any]) -> dict[str, Any]:
    """In the fresh process: import, load, first inference and ``CALLS`` more, measuring as it goes."""
    from edge_msd.bench import sysinfo
    from edge_msd.bench.runtimes import BACKENDS, model_files
    from edge_msd.contract.format import EVALSET, PROBE
    from edge_msd.contract.reading import open_bundle, tower_inputs

    bundle = open_bundle(args["bundle"])
    tower, batch = args["tower"], args["batch"]
    data = bundle.load_npz(PROBE) or bundle.load_npz(EVALSET)
    x = tower_inputs(bundle, tower, data)[:batch]
    x = x[[i % len(x) for i in range(batch)]]
    engines = Path(args["engine_dir"]) if args.get("engine_dir") else None
    backend = BACKENDS[args["runtime"]]
    path = model_files(bundle.root, {tower: bundle.model(tower)}, engines)[tower][args["format"]]
    before = sysinfo.rss_mb()
    t0 = time.perf_counter_ns()
    backend.import_runtime()
    t1 = time.perf_counter_ns()
    after_import = sysinfo.rss_mb()
    session = backend().load(bundle.model(tower), path, args["threads"], batch, args["options"])
    t2 = time.perf_counter_ns()
    after_load = sysinfo.rss_mb()
    feed = session.prepare(x)
    sysinfo.reset_peak_rss()
    t3 = time.perf_counter_ns()
    session.run(feed)
    t4 = time.perf_counter_ns()
    for _ in range(CALLS):
        session.run(feed)
    peak = sysinfo.peak_rss_mb()
    session.close()
    return {
        "available": True,
        "import_ms": (t1 - t0) / 1e6,
        "load_ms": (t2 - t1) / 1e6,
        "first_inference_ms": (t4 - t3) / 1e6,
        "rss_before_mb": before,
        "runtime_import_mb": after_import - before,
        "model_load_mb": after_load - after_import,
        "footprint_mb": after_load - before,
        "peak_inference_mb": peak - before,
        "process_peak_mb": peak,
        "torch_imported": "torch" in sys.modules,  # the point of the child: must stay False
    }


def package_root() -> str:
    """The folder (or .pyz) that holds the edge_msd package, for the child's PYTHONPATH."""
    import edge_msd

    return str(Path(edge_msd.__file__).parent.parent)


def cold_start(args: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
    """Run the child on ``args`` (bundle, tower, batch, runtime, format, threads, options, engine_dir)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH")) if p)
    flags = ["-S"] if sys.flags.no_site else []  # the interpreter as this process was started
    cmd = [sys.executable, *flags, "-m", "edge_msd.bench.coldstart", json.dumps(args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"available": False, "reason": str(e)}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"available": False, "reason": f"fresh process failed: {tail[0]}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
