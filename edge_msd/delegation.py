"""What a device's delegate or compiler will not take, known without the device.

LiteRT: which ops a delegate took, read from the interpreter's node list (shared by the export-side
check and the device-side LiteRT runner; standard library only). TensorRT: rules of its ONNX parser
and of explicit int8 quantization, applied to the exported ONNX graph (``onnx`` is imported lazily, so
the benchmark binary, which ships this module, never needs it). Core ML: what keeps an ML Program off
the Neural Engine, read from the saved spec. Each rule names its source.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
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


def check_towers(target: str, models: dict[str, dict], find: Callable[[dict], list[str]], warn: Any) -> dict:
    """``find(entry)`` per tower's manifest entry; each finding is passed to ``warn`` and recorded."""
    out = {}
    for tower, entry in models.items():
        found = find(entry)
        out[tower] = {"warnings": found}
        for line in found:
            warn(f"{target} {tower} tower: {line}")
    return out


def _counts(items: list[str] | collections.Counter[str]) -> str:
    counts = items if isinstance(items, collections.Counter) else collections.Counter(items)
    return ", ".join(f"{k}×{n}" for k, n in counts.most_common())


# ---- TensorRT ----------------------------------------------------------------------------------
TRT_MATRIX = "onnx-tensorrt docs/operators.md (TensorRT 8.5, JetPack 5)"
# Inputs the parser needs as initializers or Constant nodes (the matrix's "Restrictions" column).
TRT_CONST_INPUTS = {"Slice": (3, "axes"), "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"),
                    "TopK": (1, "K"), "CumSum": (1, "axis")}
# Ops the matrix lists for FP32/FP16 only (its "Supported Types" column): an integer input is refused.
TRT_FLOAT_ONLY = frozenset({
    "ArgMax", "ArgMin", "MatMul", "Softmax", "LogSoftmax", "TopK", "Pow", "Sqrt", "Exp", "Log", "Erf",
    "Reciprocal", "CumSum", "Resize", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})
TRT_RESIZE_MODES = frozenset({"nearest", "linear"})  # matrix, Resize: "Supported resize modes"
# Explicit quantization (TensorRT developer guide, "Explicit Quantization"): a layer computes in int8
# only where DequantizeLinear feeds its data and weight inputs; Q/DQ commute through these data moves.
TRT_INT8_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TRT_QDQ_COMMUTES = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def tensorrt_findings(path: Path, precision: str) -> list[str]:
    """What TensorRT's parser refuses or its builder leaves outside the requested precision, from the
    exported ONNX (shape-inferred, so that each node's input dtype is known)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    values = [*graph.input, *graph.value_info, *graph.output]
    dtype = {v.name: v.type.tensor_type.elem_type for v in values}
    dtype |= {i.name: i.data_type for i in graph.initializer}
    consts = {i.name for i in graph.initializer}
    consts |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    producer = {out: n for n in graph.node for out in n.output}
    ints = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
            onnx.TensorProto.INT64, onnx.TensorProto.BOOL}
    found = []
    for v in graph.input:  # build-engine's optimization profile spans the batch only
        dims = v.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in dims):
            found.append(f"input {v.name!r} has dynamic dimensions beyond the batch: every dynamic dimension "
                         "needs an optimization profile range (TensorRT developer guide, dynamic shapes)")
    float_only, not_const, resize = [], [], []
    for n in graph.node:
        if n.op_type in TRT_FLOAT_ONLY and n.input and dtype.get(n.input[0]) in ints:
            float_only.append(f"{n.op_type} ({onnx.TensorProto.DataType.Name(dtype[n.input[0]]).lower()})")
        idx, what = TRT_CONST_INPUTS.get(n.op_type, (None, ""))
        if idx is not None and len(n.input) > idx and n.input[idx] and n.input[idx] not in consts:
            not_const.append(f"{n.op_type} {what}")
        if n.op_type == "Resize":
            mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "nearest")
            if mode not in TRT_RESIZE_MODES:
                resize.append(mode)
    if float_only:
        found.append(f"ops on integer inputs that {TRT_MATRIX} lists for FP32/FP16 only: "
                     f"{_counts(float_only)}")
    if not_const:
        found.append(f"inputs {TRT_MATRIX} needs as initializers are computed: {_counts(not_const)}")
    if resize:
        found.append(f"Resize modes {TRT_MATRIX} does not support: {_counts(resize)}")
    if precision == "int8":
        found += _trt_int8_fallbacks(graph, producer, consts)
    return found


def _trt_int8_fallbacks(graph: Any, producer: dict[str, Any], consts: set[str]) -> list[str]:
    """Compute layers of an explicit-Q/DQ graph that TensorRT will run in fp16/fp32, not int8."""

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in TRT_QDQ_COMMUTES:
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    layers = [n for n in graph.node if n.op_type in TRT_INT8_LAYERS]
    left = [n.op_type for n in layers if not all(dequantized(i) for i in n.input[:2])]
    if not left:
        return []
    return [f"int8: {len(left)} of {len(layers)} compute layers lack DequantizeLinear on their data or "
            f"weight input and run in fp16/fp32 ({_counts(left)}; TensorRT explicit quantization)"]


# ---- Core ML -----------------------------------------------------------------------------------
COREML_BOOKKEEPING = ("const",)


def coreml_findings(spec: Any, ops: dict[str, dict[str, int]]) -> list[str]:
    """What keeps a saved ML Program (``spec``; ``ops``: op type → output dtype → count, as the export's
    spec check counts them) off the Neural Engine."""
    found = []
    for feature in spec.description.input:
        if feature.type.multiArrayType.WhichOneof("ShapeFlexibility") == "shapeRange":
            # Apple's answer (developer forums, thread 724930): with range flexibility the Neural Engine
            # runs the default shape only; enumerated shapes each can run there.
            found.append(f"input {feature.name!r} has a shape range: the Neural Engine runs its default "
                         "shape only, other shapes go to the GPU or CPU (use enumerated shapes)")
    fp32: collections.Counter[str] = collections.Counter()
    computing = 0
    for op, by_dtype in ops.items():
        if op in COREML_BOOKKEEPING or op.startswith("constexpr_"):  # weights, not computation
            continue
        computing += sum(by_dtype.values())
        fp32[op] += by_dtype.get("FLOAT32", 0)
    fp32 = +fp32  # drop the zero counts
    if fp32:
        # coremltools "Typed Execution": the Neural Engine computes in float 16; float 32 ops run on the
        # GPU or CPU (a float 32 program never uses the Neural Engine).
        found.append(f"{fp32.total()} of {computing} ops compute in fp32, which the Neural Engine does not: "
                     f"they run on the GPU or CPU ({_counts(fp32)})")
    return found
