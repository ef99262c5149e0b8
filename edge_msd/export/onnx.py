"""ONNX export (torch.onnx dynamo exporter), checked with onnx.checker and run in ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.export.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    TOWERS,
    Exporter,
    ExportRequest,
    Runner,
    example_inputs,
    io_entry,
    run_batched,
    tower_module,
)

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
            else:  # TorchScript exporter: opset 17 and modelopt's Q/DQ nodes (toolchain.md)
                axes = {input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)  # its fused op has no ONNX symbolic
                try:
                    torch.onnx.export(module, (x,), str(path), input_names=[input_name],
                                      output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                                      dynamic_axes=axes)
                finally:
                    torch.backends.mha.set_fastpath_enabled(fastpath)
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


def onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Graph inputs/outputs as manifest entries (-1 for symbolic dims)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def entry(v, layout=None):
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return io_entry(v.name, shape, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), layout)

    inputs = [entry(v, "NCHW" if len(v.type.tensor_type.shape.dim) == 4 else None) for v in graph.input]
    return inputs, [entry(v) for v in graph.output]


def ort_runner(path: Path, batch: int) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: run_batched(lambda c: sess.run(None, {name: c})[0], x, batch)


class OnnxExporter(Exporter):
    kind = "onnx"
    format = "onnx"
    ext = "onnx"

    def opset(self, req: ExportRequest) -> int:
        opset = int(req.profile.options.get("opset", 18))
        if opset < 17:
            raise ConfigError(f"{req.profile.source}: options.opset {opset} < 17 (LayerNormalization)")
        return opset

    def export(self, req: ExportRequest, out_dir: Path) -> dict[str, dict]:
        if req.precision != "fp32":
            raise ConfigError(f"target {req.profile.name}: onnx exports fp32 only, not {req.precision}")
        return self._export(req, out_dir, dynamo=True)

    def _export(self, req: ExportRequest, out_dir: Path, dynamo: bool) -> dict[str, dict]:
        batch = 2 if req.profile.dynamic_batch else req.profile.batch_sizes[0]
        examples = example_inputs(req.student, batch)
        entries = {}
        for tower in TOWERS:
            rel = f"models/{tower}.{self.ext}"
            export_onnx(tower_module(req.student, tower), examples[tower], out_dir / rel, INPUT_NAMES[tower],
                        self.opset(req), req.profile.dynamic_batch, dynamo=dynamo)
            inputs, outputs = onnx_io(out_dir / rel)
            entries[tower] = {"file": rel, "format": self.format, "precision": req.precision,
                              "inputs": inputs, "outputs": outputs, "opset": self.opset(req),
                              "dynamic_axes": {inputs[0]["name"]: {"0": "batch"}, OUTPUT_NAME: {"0": "batch"}}
                              if req.profile.dynamic_batch else {}}
        return entries

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        return ort_runner(bundle_dir / entry["file"], entry["inputs"][0]["shape"][0])
