"""Export-time delegate warnings for TensorRT and Core ML (edge_msd.delegation): on the tiny student's
real exports, on small graphs built to trip each rule, and through the export into the manifest and the
bench report."""

from pathlib import Path

import numpy as np
import pytest
from export_helpers import make_tiny_student, tiny_dataset

from edge_msd.delegation import coreml_findings, tensorrt_findings
from edge_msd.families.common.base import ExportRequest
from edge_msd.students.towers import load_student_towers
from edge_msd.targets import load_target


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("s") / "student")


def _check(family, target: str, student_dir: Path, folder: Path) -> tuple[dict, list[str]]:
    profile = load_target(target)
    request = ExportRequest(load_student_towers(student_dir), profile, profile.precision)
    entries = family.export(request, folder)
    lines: list[str] = []
    return family.check_graph(profile, entries, folder, lines.append), lines


# ---- TensorRT -------------------------------------------------------------------------------------


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


# ---- Core ML --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_coreml_warnings_on_the_students_programs(tmp_path, student_dir):
    from edge_msd.families.coreml import FAMILY

    check, lines = _check(FAMILY, "coreml", student_dir, tmp_path)
    assert check["delegate"] == "Neural Engine" and len(lines) == 2
    for tower in ("image", "text"):  # fp16 programs; fp32_ops (layer_norm, softmax, the L2 norm) stay fp32
        (found,) = check[tower]["warnings"]
        assert "compute in fp32, which the Neural Engine does not" in found
        assert "layer_norm×" in found and "softmax×1" in found and "linear" not in found


def test_coreml_flexible_shape_and_fp32_program(tmp_path):
    ct = pytest.importorskip("coremltools")
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    traced = torch.jit.trace(model, torch.zeros(1, 4))
    shape = ct.Shape(shape=(ct.RangeDim(lower_bound=1, upper_bound=8, default=1), 4))
    ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=shape)], convert_to="mlprogram",
                    minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT32)
    found = coreml_findings(ml.get_spec(), {"linear": {"FLOAT32": 1}, "const": {"FLOAT32": 3}})
    assert len(found) == 2
    assert found[0].startswith("input 'x' has a shape range: the Neural Engine runs its default shape only")
    assert found[1].startswith("1 of 1 ops compute in fp32")  # consts hold weights, they compute nothing
    assert coreml_findings(ml.get_spec(), {"linear": {"FLOAT16": 1}})[1:] == []


# ---- through the export and the bench report ------------------------------------------------------


def test_export_prints_and_records_the_warnings(tmp_path, student_dir, capsys):
    from edge_msd.bench.report import format_table
    from edge_msd.export.bundle import ExportConfig, export_bundle

    cfg = ExportConfig(target="jetson", student=str(student_dir), out=str(tmp_path / "b"), probe_images=8)
    m = export_bundle(cfg, dataset=tiny_dataset())
    (line,) = m["delegate_warnings"]
    assert line.startswith("jetson-orin text tower: ops on integer inputs")
    assert m["delegate_check"]["text"]["warnings"] == [line.removeprefix("jetson-orin text tower: ")]
    assert f"warning: {line}" in capsys.readouterr().err
    report = {"bundle": {"delegate_warnings": [line]}, "towers": {"image": {"placement": {
        "available": True, "source": "s", "accelerator": "XNNPACK", "ops": 2, "on_accelerator": 2,
        "by_device": {"XNNPACK": 2}, "fallback_ops": {}, "cost_unit": "ms", "slowest": [],
        "op_times": {"available": False, "reason": "no profiler"}}}}}
    table = format_table(report, "markdown")
    assert f"  export: {line}" in table and "  image: no per-op times: no profiler" in table
