"""Jetson / TensorRT: the ONNX TensorRT parses (opset 17, int32 I/O, explicit Q/DQ for int8); the device
builds the engines from it (``edge-msd build-engine``, edge_msd/bench/engine.py; TensorRT ships with JetPack).

fp32 and fp16 bundles hold the fp32 ONNX; TensorRT lowers it to fp16 while building the engine,
keeping LayerNorm/Softmax in fp32 (``options.fp32_layers``). int8 bundles ship the explicit
QuantizeLinear/DequantizeLinear ONNX of the modelopt recipe below (QAT or PTQ), with the text tower's
token-embedding table stored int8 per row behind a DequantizeLinear (``int8_gather_tables``), checked
here like the float graph.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_msd.contract.format import engine_file
from edge_msd.delegation import TRT_MATRIX, check_towers, tensorrt_findings
from edge_msd.errors import ArtifactError
from edge_msd.families.common.embedding import per_row_int8
from edge_msd.families.common.quantizer import (
    Quantizer,
    calibrate,
    freeze_bn_modules,
    io_entries,
    matches,
    quiet,
)
from edge_msd.families.declarations import DECLARATIONS
from edge_msd.families.onnx import OnnxFamily, check_onnx, export_onnx, onnx_opset, ort_runner
from edge_msd.students.towers import explicit_attention

if TYPE_CHECKING:
    from edge_msd.targets import TargetProfile

# ONNX ops the TensorRT 8.6/10 ONNX parser imports (onnx-tensorrt operators.md), those that matter here.
TRT_OPS = frozenset([
    "Abs", "Acos", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout",
    "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "If",
    "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "OneHot",
    "Or", "Pad", "Pow", "PRelu", "QuantizeLinear", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "ScatterElements", "ScatterND",
    "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where",
    "Xor",
])


def check_tensorrt_onnx(path: Path, expect_qdq: bool) -> dict:
    """What TensorRT needs from the graph; returns a summary for the manifest, raises naming op/node."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    for v in [*graph.input, *graph.output]:
        if v.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            raise ArtifactError(f"{path}: graph I/O {v.name!r} is int64; TensorRT/DLA want int32")
    for node in graph.node:
        if node.op_type not in TRT_OPS:
            raise ArtifactError(f"{path}: op {node.op_type} (node {node.name!r}) unsupported by TensorRT")
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for v in node.input:
            consumers.setdefault(v, []).append(node)
    n_q = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        n_q += 1
        where = f"{path}: QuantizeLinear {node.name!r}"
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            raise ArtifactError(f"{where} is not followed only by DequantizeLinear (TensorRT wants pairs)")
        if node.input[1] not in consts:
            raise ArtifactError(f"{where}: scale is not a constant")
        if len(node.input) > 2 and node.input[2] in consts:
            zp = consts[node.input[2]]
            if zp.dtype != np.int8 or np.any(zp != 0):
                raise ArtifactError(f"{where}: zero point must be int8 0 (TensorRT quantizes symmetrically)")
    if expect_qdq and n_q == 0:
        raise ArtifactError(f"{path}: int8 requested but the graph holds no QuantizeLinear/DequantizeLinear")
    if not expect_qdq and n_q:
        raise ArtifactError(f"{path}: a float export holds {n_q} QuantizeLinear nodes")
    ops = sorted({n.op_type for n in graph.node})
    return {"opset": onnx_opset(model), "qdq_pairs": n_q, "ops": ops, "checked": True}


def int8_gather_tables(path: Path, min_rows: int = 1024) -> list[str]:
    """Store each large float table that a Gather reads (the token embedding) as int8 rows with one
    scale per row, dequantized by a DequantizeLinear (axis 0, zero point 0: TensorRT's symmetric
    per-channel IDequantizeLayer on a constant) that feeds the Gather; returns the tables' names."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = []
    for node in [n for n in graph.node if n.op_type == "Gather"]:
        table = inits.get(node.input[0])
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
            continue
        if table.dims[0] < min_rows or table.name in done:
            continue
        q, scale = per_row_int8(torch.from_numpy(numpy_helper.to_array(table).copy()))
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q.numpy(), f"{table.name}_int8"),
                                  numpy_helper.from_array(scale.numpy(), f"{table.name}_scale")])
        dq = helper.make_node("DequantizeLinear", [f"{table.name}_int8", f"{table.name}_scale"], [table.name],
                              name=f"{table.name}_dequantize", axis=0)
        graph.node.insert(0, dq)  # its inputs are initializers: first is a valid topological place
        done.append(table.name)
    onnx.save(model, str(path))
    return done


def resolved_outputs(path: Path, outputs: list[dict]) -> list[dict]:
    """``outputs`` with every dimension but the batch resolved by ONNX shape inference: the TorchScript
    exporter names the embedding width symbolically (``Divembedding_dim_1``) although it is fixed."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    inferred = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                for v in graph.output}
    resolved = []
    for out in outputs:
        shape = inferred.get(out["name"], out["shape"])
        if len(shape) != len(out["shape"]) or -1 in shape[1:]:
            raise ArtifactError(f"{path}: the shape of output {out['name']!r} cannot be resolved beyond the "
                                f"batch ({shape}); the embedding width must be fixed")
        resolved.append({**out, "shape": [out["shape"][0], *shape[1:]]})
    return resolved


class ModeloptQuantizer(Quantizer):
    """nvidia-modelopt fake quant: int8 symmetric, weights per output channel, activations per tensor
    (max calibration); ships ONNX with QuantizeLinear/DequantizeLinear pairs (TensorRT explicit
    quantization), exported with the TorchScript exporter (dynamo cannot trace it)."""

    suffix = ".onnx"
    runtime = "onnxruntime"

    def _config(self, keep_float: Iterable[str]) -> dict[str, Any]:
        cfg: list[dict[str, Any]] = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
        ]
        for cls in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.Embedding", "nn.LayerNorm"):
            cfg.append({"quantizer_name": "*", "parent_class": cls, "enable": False})
        for name in keep_float:
            cfg.append({"quantizer_name": f"{name}.*", "enable": False})
        return {"quant_cfg": cfg, "algorithm": "max"}

    def quantize(self, tower: nn.Module, batches: list[torch.Tensor], *, qat: bool = False,
                 keep_float: Iterable[str] = (), n_steps: int | None = None) -> nn.Module:
        import modelopt.torch.quantization as mtq

        model = explicit_attention(copy.deepcopy(tower)).eval()
        patterns = [*self.recipe.keep_float, *keep_float]
        with quiet():
            model = mtq.quantize(model, self._config(patterns), lambda m: calibrate(m, batches))
        self._disable_unreached(model)
        # modelopt matches wildcards against quantizer names; fnmatch patterns are applied here
        for name, mod in model.named_modules():
            if matches(name, patterns):
                for q in self._quantizers(mod):
                    q.disable()
        return model.train(qat)

    @staticmethod
    def _quantizers(mod: nn.Module) -> list[nn.Module]:
        return [
            q
            for n in ("input_quantizer", "weight_quantizer")
            if (q := getattr(mod, n, None)) is not None and hasattr(q, "disable")
        ]

    def _disable_unreached(self, model: nn.Module) -> None:
        """Quantizers that calibration never reached (e.g. nn.MultiheadAttention's out_proj, whose weight
        the fused attention reads directly) would export as dynamic-range garbage: turn them off."""
        for _, mod in model.named_modules():
            q = getattr(mod, "input_quantizer", None)
            if q is not None and getattr(q, "is_enabled", False) and getattr(q, "amax", None) is None:
                for qq in self._quantizers(mod):
                    qq.disable()

    def layers(self, prepared: nn.Module) -> list[str]:
        return [
            n
            for n, m in prepared.named_modules()
            if any(getattr(q, "is_enabled", False) for q in self._quantizers(m))
        ]

    def set_layer(self, prepared: nn.Module, name: str, enabled: bool) -> None:
        for q in self._quantizers(prepared.get_submodule(name)):
            q.enable() if enabled else q.disable()

    def freeze_observers(self, prepared: nn.Module) -> None:
        """modelopt's ranges (amax) are fixed after calibration; QAT trains the weights under them."""

    def freeze_bn(self, prepared: nn.Module) -> None:
        freeze_bn_modules(prepared)

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        prepared = prepared.eval()
        name = "image" if example.is_floating_point() else "tokens"
        with torch.no_grad():
            out_dim = int(prepared(example).shape[-1])
        with quiet():  # the TorchScript exporter: the dynamo one cannot trace modelopt's quantizers
            export_onnx(prepared, example.numpy(), path, name, opset=17, dynamic_batch=True, dynamo=False)
        int8_gather_tables(path)
        check_onnx(path)
        return {
            "format": "onnx",
            "precision": "int8",
            "quantization": "explicit-qdq",
            **io_entries(example, out_dim, "batch"),
        }

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        return ort_runner(path, -1, threads=torch.get_num_threads(), fuse_qdq=False)(x)


class TensorRTFamily(OnnxFamily):
    declaration = DECLARATIONS["tensorrt"]
    quantizer = ModeloptQuantizer
    dynamo = False  # TorchScript exporter: opset 17 (TensorRT 8.5+), like the int8 Q/DQ ONNX

    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        entry = super().describe(folder, rel, tower, precision, profile)
        entry["outputs"] = resolved_outputs(folder / rel, entry["outputs"])
        entry["tensorrt_check"] = check_tensorrt_onnx(folder / rel, expect_qdq=precision == "int8")
        entry["parity_runtime"] = "onnxruntime (the engine's source ONNX; fp16 is applied on the device)"
        entry["engine"] = {"file": engine_file(tower), "built_on_device": True}
        return entry

    def check_graph(self, profile: TargetProfile, models: dict[str, dict], folder: Path, warn: Any) -> dict:
        """What TensorRT's parser refuses or builds outside the requested precision (edge_msd.delegation)."""
        def find(entry: dict) -> list[str]:
            return tensorrt_findings(folder / entry["file"], entry["precision"])

        return {"checked_against": TRT_MATRIX, **check_towers(profile.name, models, find, warn)}


FAMILY = TensorRTFamily()
