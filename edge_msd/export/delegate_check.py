"""Export-time warning: ops of a bundle's graph that the profile's delegate will not take.

Known without the device for LiteRT: the XNNPACK delegate decides per op when the interpreter is built,
the same way on the host as on the phone for the same LiteRT version, so the exporter builds one here
and lists what the delegate leaves to the interpreter's own (slower, often single-threaded) kernels.
"""

from __future__ import annotations

import collections
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edge_msd.config import TargetProfile
from edge_msd.delegation import DELEGATE_OP, executed_ops


def litert_leftovers(model: Path) -> dict[str, Any]:
    """Ops count and the op types XNNPACK leaves to the interpreter, for one .tflite model."""
    from ai_edge_litert import interpreter as tfl

    interp = tfl.Interpreter(model_path=str(model), num_threads=1)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    ran = executed_ops(ops, [d["index"] for d in interp.get_output_details()])
    left = collections.Counter(o["op_name"] for o in ops if o["index"] in ran)
    return {"ops": sum(o["op_name"] != DELEGATE_OP for o in ops), "not_delegated": dict(left.most_common())}


def check_delegates(profile: TargetProfile, models: dict[str, dict], folder: Path, warn: Any) -> dict:
    """Per tower, what the profile's delegate cannot take; ``warn(line)`` is called for each tower with
    leftovers. Profiles without a host-side check (TensorRT, Core ML decide on the device) get ``{}``."""
    if profile.exporter != "tflite":
        return {}
    try:
        runtime = f"ai-edge-litert {version('ai-edge-litert')}"
    except PackageNotFoundError:
        return {"skipped": "ai-edge-litert is not installed here (pip install ai-edge-litert)"}
    out: dict[str, Any] = {"delegate": "XNNPACK", "checked_with": runtime}
    for tower, entry in models.items():
        found = out[tower] = litert_leftovers(folder / entry["file"])
        left = found["not_delegated"]
        if left:
            ops = ", ".join(f"{op}×{n}" for op, n in left.items())
            warn(
                f"{profile.name} {tower} tower: XNNPACK ({runtime}) leaves {sum(left.values())} of "
                f"{found['ops']} ops to the interpreter's own kernels: {ops}"
            )
    return out
