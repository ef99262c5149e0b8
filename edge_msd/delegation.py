"""Which ops a LiteRT delegate took, read from the interpreter's node list.

Shared by the export-side delegate check and the device-side LiteRT runner; standard library only.
"""

from __future__ import annotations

from typing import Any

DELEGATE_OP = "DELEGATE"  # the node a delegate puts in place of the ops it took


def executed_ops(ops: list[dict[str, Any]], graph_outputs: list[int]) -> set[int]:
    """Indices of the ops the interpreter runs itself (not inside a delegate).

    A delegate appends a DELEGATE node per partition it took and leaves the original nodes listed; an
    original op runs on its own iff its output is needed (by a DELEGATE node, an op that runs, or the
    graph output) and no DELEGATE node produces it."""
    delegates = [o for o in ops if o["op_name"] == DELEGATE_OP]
    from_delegate = {int(t) for o in delegates for t in o["outputs"]}
    producer = {int(t): o for o in ops if o["op_name"] != DELEGATE_OP for t in o["outputs"]}
    todo = [int(t) for o in delegates for t in o["inputs"]] + [int(t) for t in graph_outputs]
    ran: set[int] = set()
    while todo:
        t = todo.pop()
        if t in from_delegate or t not in producer or producer[t]["index"] in ran:
            continue
        ran.add(producer[t]["index"])
        todo += [int(i) for i in producer[t]["inputs"]]
    return ran
