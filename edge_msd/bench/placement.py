"""Where a model's ops ran: one summary shape for every runtime, and its table.

Each runtime's session lists its ops as ``Op(name, op type, device, mean ms or None)`` (ONNX Runtime from
its profiling output, LiteRT from the interpreter's node list, TensorRT from the engine inspector, Core
ML from MLComputePlan); ``summarise`` turns that into the report's ``placement`` entry: ops on the
accelerator the run asked for vs elsewhere (silent fallback), the op types that fell back, and the
slowest ops where the runtime times ops. Standard library only.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

TOP_K = 5


class Op(NamedTuple):
    name: str
    op: str
    device: str
    cost: float | None = None  # mean ms per call, or a relative weight where the runtime only estimates


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def summarise(
    ops: list[Op], accelerator: str, source: str, top_k: int = TOP_K, cost_unit: str = "ms"
) -> dict[str, Any]:
    """Counts per device, the op types not on ``accelerator``, and the ``top_k`` slowest timed ops."""
    by_device = collections.Counter(o.device for o in ops)
    fallback = collections.Counter(o.op for o in ops if o.device != accelerator)
    return {
        "available": True,
        "source": source,
        "accelerator": accelerator,
        "ops": len(ops),
        "on_accelerator": by_device.get(accelerator, 0),
        "by_device": dict(by_device.most_common()),
        "fallback_ops": dict(fallback.most_common()),
        "cost_unit": cost_unit,
        "slowest": slowest(ops, top_k),
    }


def slowest(ops: list[Op], top_k: int = TOP_K) -> list[dict[str, Any]]:
    """The ``top_k`` timed ops, costliest first, with their share of all timed ops' cost."""
    timed = sorted((o for o in ops if o.cost is not None), key=lambda o: -o.cost)
    total = sum(o.cost for o in timed)
    return [
        {
            "name": o.name,
            "op": o.op,
            "device": o.device,
            "cost": round(o.cost, 5),
            "share": round(o.cost / total, 4) if total else None,
        }
        for o in timed[:top_k]
    ]


def with_op_times(summary: dict[str, Any], timed: list[Op] | str, source: str) -> dict[str, Any]:
    """``summary`` with its slowest ops taken from another tool's per-op times (``timed``), or with the
    reason there are none (a string)."""
    if isinstance(timed, str):
        return {**summary, "op_times": unavailable(timed)}
    return {**summary, "slowest": slowest(timed), "cost_unit": "ms",
            "op_times": {"available": True, "source": source, "ops": len(timed)}}


def placement_notes(report: dict[str, Any]) -> list[str]:
    """What the placement table cannot show: the export's delegate warnings, why a tower has no op times."""
    notes = [f"export: {w}" for w in (report.get("bundle") or {}).get("delegate_warnings") or []]
    for tower, t in report.get("towers", {}).items():
        times = (t.get("placement") or {}).get("op_times") or {}
        if times.get("available") is False:
            notes.append(f"{tower}: no per-op times: {times['reason']}")
    return notes


def placement_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per tower: ops on the accelerator / all, where the rest ran, the slowest op."""
    out = []
    for tower, t in report.get("towers", {}).items():
        p = t.get("placement")
        if not p:
            continue
        if not p.get("available"):
            out.append([tower, "–", "–", "–", "–", f"not available: {p.get('reason')}"])
            continue
        elsewhere = ", ".join(f"{op}×{n}" for op, n in p["fallback_ops"].items()) or "none"
        slow = p["slowest"][0] if p["slowest"] else None
        times = p.get("op_times") or {}
        source = f"{p['source']} + {times['source']}" if times.get("available") else p["source"]
        out.append(
            [
                tower,
                p["accelerator"],
                f"{p['on_accelerator']}/{p['ops']}",
                elsewhere,
                f"{slow['op']} {slow['cost']:.3f} {p['cost_unit']} ({slow['share']:.0%})" if slow else "–",
                source,
            ]
        )
    return out


PLACEMENT_HEAD = ["tower", "accelerator", "ops on it", "ops elsewhere (type×n)", "slowest op", "source"]
