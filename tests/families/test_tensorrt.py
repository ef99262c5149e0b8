"""The tensorrt family: the ONNX checks for TensorRT, the int8 Q/DQ recipe, the delegate warnings, and
the TensorRT runner (engines, the engine inspector)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bench_helpers import DIM
from export_helpers import TABLE, TABLE_FP32_BYTES, _check, _export, _export_int8

from edge_msd.bench import runtimes
from edge_msd.contract.reading import open_bundle, preprocess_images
from edge_msd.delegation import tensorrt_findings
from edge_msd.errors import ArtifactError
from edge_msd.families import family
from edge_msd.families.common.base import ExportRequest
from edge_msd.families.common.quantizer import cosine_to
from edge_msd.quant.recipes import quantizer_for
from edge_msd.targets import load_target


def test_tensorrt_onnx_checks(tmp_path, student):
    from edge_msd.families.tensorrt import FAMILY, check_tensorrt_onnx

    entries = FAMILY.export(ExportRequest(student, load_target("jetson"), "fp16"), tmp_path)
    for e in entries.values():
        assert e["tensorrt_check"]["opset"] == 17 and e["tensorrt_check"]["qdq_pairs"] == 0
        assert e["outputs"][0]["shape"] == [-1, 32]  # dynamic batch, the student's embedding width
        assert all(i["dtype"] != "int64" for i in e["inputs"] + e["outputs"])
    with pytest.raises(ArtifactError, match="no QuantizeLinear"):
        check_tensorrt_onnx(tmp_path / entries["image"]["file"], expect_qdq=True)


@pytest.mark.slow
def test_tensorrt_int8_bundle_is_qdq_onnx(tmp_path, student_dir, calibration):
    import onnx

    m = _export_int8(tmp_path, student_dir, "jetson", calibration)
    for tower in ("image", "text"):
        e = m["models"][tower]
        assert e["precision"] == "int8" and e["tensorrt_check"]["qdq_pairs"] > 0
        assert e["outputs"][0]["shape"] == [-1, 32]
        graph = onnx.load(str(tmp_path / "jetson" / e["file"])).graph
        assert "QuantizeLinear" in {n.op_type for n in graph.node}
    text = tmp_path / "jetson" / m["models"]["text"]["file"]
    graph = onnx.load(str(text)).graph
    tables = {i.name: i for i in graph.initializer if list(i.dims) == TABLE}
    assert [t.data_type for t in tables.values()] == [onnx.TensorProto.INT8]
    dq = next(n for n in graph.node if n.input and n.input[0] in tables)
    assert dq.op_type == "DequantizeLinear" and [a.i for a in dq.attribute if a.name == "axis"] == [0]
    assert any(n.op_type == "Gather" and n.input[0] == dq.output[0] for n in graph.node)
    assert text.stat().st_size * 3 < TABLE_FP32_BYTES
    assert m["parity"]["passed"] and m["quantization"]["recipe"]["name"] == "tensorrt-int8-qdq"
    assert m["quantization"]["towers"]["image"]["kept_float"]  # first/last layers stay float
    # ... and export says which compute layers TensorRT will therefore build in fp16/fp32, not int8
    (image,) = [w for w in m["delegate_warnings"] if w.startswith("jetson-orin image tower: int8:")]
    assert "run in fp16/fp32" in image and "Conv×1" in image  # the kept-float patch embedding


def test_tensorrt_rejects_unsupported_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_msd.families.tensorrt import check_tensorrt_onnx

    node = helper.make_node("StringNormalizer", ["x"], ["y"], name="layer7/norm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match="StringNormalizer.*layer7/norm"):
        check_tensorrt_onnx(tmp_path / "m.onnx", expect_qdq=False)


def test_build_engine_without_tensorrt_says_so(tmp_path, student_dir):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    from edge_msd.bench.engine import build_engines
    from edge_msd.errors import EdgeMSDError

    m = _export(tmp_path, student_dir, "jetson")
    assert m["parity"]["passed"] and m["target"]["exporter"] == "tensorrt"
    with pytest.raises(EdgeMSDError, match="TensorRT is not installed"):
        build_engines(tmp_path / "jetson")


def test_tensorrt_qdq_onnx_per_channel_runs_in_onnxruntime(towers, batches, tmp_path):
    quantizer = quantizer_for(family("tensorrt").recipe)
    image = towers[0]
    prepared = quantizer.quantize(image, batches[0], keep_float=["visual.conv1"])
    assert "visual.conv1" not in quantizer.layers(prepared)
    assert any(n.endswith("attn.in_proj") for n in quantizer.layers(prepared))  # attention is quantized too
    path = tmp_path / "image.onnx"
    entry = quantizer.write(prepared, batches[0][0], path)
    assert entry["inputs"][0]["shape"][0] == -1
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}

    def scale_len(name: str) -> int:
        t = inits.get(name) or consts.get(name)
        return int(np.prod(t.dims)) if t is not None else 0

    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and scale_len(n.input[1]) > 1]
    assert per_channel and all(a.i == 0 for n in per_channel for a in n.attribute if a.name == "axis")
    out = quantizer.run(path, batches[0][1].numpy())
    fq = prepared.eval()(batches[0][1]).detach()
    np.testing.assert_allclose(out, fq.numpy(), atol=1e-4)
    assert cosine_to(image(batches[0][1]).detach(), torch.from_numpy(out)) > 0.98


def test_tensorrt_warnings_on_the_students_onnx(tmp_path, student_dir):
    from edge_msd.families.tensorrt import FAMILY

    check, lines = _check(FAMILY, "jetson", student_dir, tmp_path)
    assert check["checked_against"].startswith("onnx-tensorrt docs/operators.md")
    assert check["image"] == {"warnings": []}  # a ViT image tower: everything in the parser's matrix
    # the text tower's end-of-text pooling reduces over the int32 token ids
    (text,) = check["text"]["warnings"]
    assert "lists for FP32/FP16 only" in text and "(int32)" in text
    assert lines == [f"jetson-orin text tower: {text}"]


def _onnx(tmp_path: Path, nodes: list, inputs: list, initializers: list = ()) -> Path:
    import onnx
    from onnx import TensorProto, helper

    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs, [output], list(initializers))
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_tensorrt_rules_on_graphs_that_break_them(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"]),
              helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 8])]
    nodes = [
        helper.make_node("ArgMax", ["ids"], ["am"], axis=1),  # integer input: FP32/FP16 only in the matrix
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["axes"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),  # axes computed, not an initializer
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="cubic"),
        helper.make_node("ReduceMean", ["r"], ["y"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    found = tensorrt_findings(_onnx(tmp_path, nodes, inputs, inits), "fp16")
    assert len(found) == 4, found
    assert "input 'x' has dynamic dimensions beyond the batch" in found[0]
    assert "'ids'" not in " ".join(found)  # a dynamic batch alone is what build-engine profiles
    assert found[1].endswith("FP32/FP16 only: ArgMax (int32)×1")
    assert found[2].endswith("are computed: Unsqueeze axes×1")
    assert found[3].endswith("does not support: cubic×1")


def test_tensorrt_int8_layers_without_qdq_run_in_float(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    def qdq(name: str) -> list:
        return [helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"]),
                helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"])]

    nodes = [
        *qdq("x"), *qdq("w"),
        helper.make_node("Transpose", ["w_dq"], ["wt"], perm=[1, 0]),  # Q/DQ commute through a transpose
        helper.make_node("MatMul", ["x_dq", "wt"], ["h"]),  # int8: both inputs dequantized
        helper.make_node("MatMul", ["h", "h2"], ["y"]),  # fp16: neither input is
    ]
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "h2"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    path = _onnx(tmp_path, nodes, inputs, inits)
    assert tensorrt_findings(path, "fp16") == []
    (found,) = tensorrt_findings(path, "int8")
    assert found.startswith("int8: 1 of 2 compute layers lack DequantizeLinear") and "MatMul×1" in found


@pytest.mark.device
@pytest.mark.skipif(
    runtimes.TensorRtBackend.unavailable_reason() is not None,
    reason=f"TensorRT: {runtimes.TensorRtBackend.unavailable_reason()}",
)
def test_tensorrt_session_runs_an_engine(bundle):  # pragma: no cover - on the Jetson
    plan = bundle / "models" / "image.plan"
    if not plan.exists():
        pytest.skip("build the engine first: edge-msd build-engine")
    b = open_bundle(bundle)
    s = runtimes.TensorRtBackend().load(b.model("image"), plan, None, 1, {})
    x = preprocess_images(b.load_npz("probe.npz")["images"][:1], b.manifest["preprocessing"])
    assert s.run(s.prepare(x)).shape == (1, DIM)
    s.close()


# The engine inspector's JSON for an engine built with ProfilingVerbosity.DETAILED (layout as in
# TensorRT's developer guide, "Engine Inspector"), one layer left in FP32 inside an INT8 engine.
TRT_ENGINE_INFO = {
    "Layers": [
        {
            "Name": "conv1 + relu1",
            "LayerType": "CaskConvolution",
            "Outputs": [
                {
                    "Name": "a",
                    "Location": "Device",
                    "Dimensions": [1, 32, 28, 28],
                    "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format",
                }
            ],
        },
        {
            "Name": "norm",
            "LayerType": "Normalization",
            "Outputs": [
                {
                    "Name": "b",
                    "Location": "Device",
                    "Dimensions": [1, 256],
                    "Format/Datatype": "Row major linear FP32",
                }
            ],
        },
    ],
    "Bindings": ["image", "embedding"],
}


def test_tensorrt_inspector_layers_to_precisions():
    from edge_msd.bench.placement import summarise
    from edge_msd.bench.runtimes.tensorrt import inspector_ops

    p = summarise(inspector_ops(TRT_ENGINE_INFO), "INT8", "test")
    assert p["by_device"] == {"INT8": 1, "FP32": 1} and p["fallback_ops"] == {"Normalization": 1}
    names_only = inspector_ops({"Layers": ["conv1 + relu1"]})
    assert names_only[0].device.startswith("unknown")
