"""ONNX export (torch.onnx dynamo exporter), checked with onnx.checker and run in ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edge_msd.contract.numerics import run_batched
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.families.common.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    ExportRequest,
    Family,
    Runner,
    export_tower,
    io_entry,
)
from edge_msd.families.declarations import DECLARATIONS

if TYPE_CHECKING:
    from edge_msd.targets import TargetProfile

ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16"}


def export_onnx(module: torch.nn.Module, example: np.ndarray, path: Path, input_name: str, opset: int,
                dynamic_batch: bool, dynamo: bool = True) -> None:
    """Export one tower; a dynamic batch is exported from a batch of 2 (torch.export specialises 1)."""
    x = torch.from_numpy(example)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            if dynamo:
                dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                torch.onnx.export(module, (x,), str(path), input_names=[input_name], opset_version=opset,
                                  dynamo=True, external_data=False, dynamic_shapes=dyn, verbose=False)
                rename_output(path, OUTPUT_NAME)
            else:  # TorchScript exporter: opset 17, what TensorRT 8.5+ parses (toolchain.md)
                axes = {input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(module, (x,), str(path), input_names=[input_name],
                                  output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                                  dynamic_axes=axes)
        except Exception as e:  # the exporters raise many types; name the tower and the cause
            msg = str(e).splitlines()[0]
            raise ConfigError(f"ONNX export of {type(module).__name__} failed: {msg}") from e
    check_onnx(path)


def rename_output(path: Path, name: str) -> None:
    """Name the graph output ``name``; the dynamo exporter may already use it inside (aten.embedding)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    old = graph.output[0].name

    def rename(a: str, b: str) -> None:
        for node in graph.node:
            node.input[:] = [b if v == a else v for v in node.input]
            node.output[:] = [b if v == a else v for v in node.output]
        for v in [*graph.value_info, *graph.output]:
            if v.name == a:
                v.name = b

    if old != name:
        rename(name, f"{name}_internal")
        rename(old, name)
    onnx.save(model, str(path))


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ArtifactError(f"{path}: onnx.checker rejects the graph: {str(e).splitlines()[0]}") from e


def onnx_io(path: Path) -> tuple[list[dict], list[dict], int]:
    """Graph inputs/outputs as manifest entries (-1 for symbolic dims), and the default-domain opset."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def entry(v, layout=None):
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return io_entry(v.name, shape, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), layout)

    graph = model.graph
    inputs = [entry(v, "NCHW" if len(v.type.tensor_type.shape.dim) == 4 else None) for v in graph.input]
    return inputs, [entry(v) for v in graph.output], onnx_opset(model)


def onnx_opset(model: Any) -> int:
    """The default-domain opset of a loaded onnx.ModelProto."""
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def ort_runner(path: Path, batch: int, threads: int = 1, *, fuse_qdq: bool = True) -> Runner:
    """ONNX Runtime on the CPU, run in chunks of a static ``batch`` (-1: all rows at once).

    ``fuse_qdq=False`` keeps QuantizeLinear/DequantizeLinear pairs as the float ops they define (basic
    graph optimizations only): ORT's fused int8 kernels on x86 CPUs without VNNI multiply u8×s8 pairs
    with 16-bit saturation, which is neither the fake-quant reference nor what TensorRT computes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not fuse_qdq:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: run_batched(lambda c: sess.run(None, {name: c})[0], x, batch)


class OnnxFamily(Family):
    """Generic ONNX for ONNX Runtime (declared: fp32 only, dynamic batch, no int8 recipe)."""

    declaration = DECLARATIONS["onnx"]
    format = "onnx"
    ext = "onnx"
    dynamo = True  # the TensorRT subclass uses the TorchScript exporter
    fused_input = True  # Cast → Mul → Add → Transpose before the first conv

    def write(self, req: ExportRequest, tower: str, path: Path) -> None:
        batch = 2 if req.profile.dynamic_batch else req.profile.batch_sizes[0]
        module, example = export_tower(req, tower, batch)
        export_onnx(module, example, path, INPUT_NAMES[tower],
                    req.profile.options.opset, req.profile.dynamic_batch, dynamo=self.dynamo)

    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        inputs, outputs, opset = onnx_io(folder / rel)
        dynamic = inputs[0]["shape"][0] == -1
        return {"file": rel, "format": self.format, "precision": precision, "inputs": inputs,
                "outputs": outputs, "opset": opset,
                "dynamic_axes": {inputs[0]["name"]: {"0": "batch"}, outputs[0]["name"]: {"0": "batch"}}
                if dynamic else {}}

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        return ort_runner(bundle_dir / entry["file"], entry["inputs"][0]["shape"][0])


FAMILY = OnnxFamily()
