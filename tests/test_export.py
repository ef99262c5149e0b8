"""Exporters on a tiny open_clip student: ONNX and TFLite run here with parity; Core ML spec;
TensorRT's ONNX checks; target profiles and their errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import make_tiny_student, tiny_dataset

from edge_msd.config import load_target
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.export.base import ExportRequest, example_inputs
from edge_msd.export.bundle import ExportConfig, export_bundle
from edge_msd.export.towers import load_student


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("s") / "student")


@pytest.fixture(scope="module")
def student(student_dir):
    return load_student(student_dir)


def _export(tmp_path, student_dir, target, precision="", **kw):
    cfg = ExportConfig(target=target, student=str(student_dir), precision=precision,
                       out=str(tmp_path / target), probe_images=8, **kw)
    return export_bundle(cfg, dataset=tiny_dataset(), calibration_data=tiny_dataset())


def test_text_tower_int32_matches_open_clip(student):
    toks = student.tokenizer(["a cat", "", "a dog " * 30])
    with torch.no_grad():
        ref = student.model.encode_text(toks, normalize=True)
        out = student.text(toks.to(torch.int32))
    assert torch.allclose(ref, out, atol=1e-6)


def test_onnx_bundle_parity(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "onnx")
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999
    assert m["models"]["text"]["inputs"][0] == {"name": "tokens", "shape": [-1, 16], "dtype": "int32"}
    assert m["models"]["image"]["outputs"][0]["name"] == "embedding"


def test_tflite_fp32_bundle_parity(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "tflite")
    assert m["parity"]["passed"] and m["parity"]["text"]["min_cos"] > 0.999
    assert m["models"]["text"]["inputs"][0]["dtype"] == "int32"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tflite_quantized_parity(tmp_path, student_dir, precision):
    m = _export(tmp_path, student_dir, "tflite", precision)
    assert m["parity"]["passed"], m["parity"]
    if precision == "int8":
        assert m["models"]["image"]["quantization"] and m["calibration"]["method"] == "post-training"


def test_tensorrt_onnx_checks(tmp_path, student):
    from edge_msd.export.tensorrt import TensorRTExporter, check_tensorrt_onnx

    entries = TensorRTExporter().export(ExportRequest(student, load_target("jetson"), "fp16"), tmp_path)
    for e in entries.values():
        assert e["tensorrt_check"]["opset"] == 17 and e["tensorrt_check"]["qdq_pairs"] == 0
        assert all(i["dtype"] != "int64" for i in e["inputs"] + e["outputs"])
    with pytest.raises(ArtifactError, match="no QuantizeLinear"):
        check_tensorrt_onnx(tmp_path / entries["image"]["file"], expect_qdq=True)


def test_tensorrt_int8_qdq(tmp_path, student):
    import onnxruntime as ort

    from edge_msd.export.base import Calibration
    from edge_msd.export.tensorrt import TensorRTExporter

    ex = example_inputs(student, 8)
    req = ExportRequest(student, load_target("jetson"), "int8", Calibration(ex["image"], ex["text"]))
    entries = TensorRTExporter().export(req, tmp_path)
    assert entries["image"]["tensorrt_check"]["qdq_pairs"] > 0
    sess = ort.InferenceSession(str(tmp_path / entries["image"]["file"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": ex["image"][:3]})[0]
    with torch.no_grad():
        ref = student.image(torch.from_numpy(ex["image"][:3])).numpy()
    assert (out * ref).sum(1).min() > 0.99


def test_tensorrt_rejects_unsupported_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_msd.export.tensorrt import check_tensorrt_onnx

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
    from edge_msd.errors import EdgeMSDError
    from edge_msd.export.tensorrt import build_engines

    m = _export(tmp_path, student_dir, "jetson")
    assert m["parity"]["passed"] and m["target"]["exporter"] == "tensorrt"
    with pytest.raises(EdgeMSDError, match="TensorRT is not installed"):
        build_engines(tmp_path / "jetson")


def test_coreml_spec(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "coreml")
    text = m["models"]["text"]
    assert text["precision"] == "fp16" and text["inputs"][0]["dtype"] == "int32"
    ops = text["coreml_check"]["ops"]
    assert set(ops["layer_norm"]) == {"FLOAT32"} and set(ops["softmax"]) == {"FLOAT32"}
    assert "FLOAT16" in ops["linear"]
    assert m["parity"]["passed"] is None and "macOS" in m["parity"]["skipped"]


def test_coreml_predicts_on_macos(tmp_path, student_dir):
    import platform

    if platform.system() != "Darwin":
        pytest.skip("Core ML predictions need macOS")
    m = _export(tmp_path, student_dir, "coreml")
    assert m["parity"]["passed"]


def test_unknown_target_lists_known():
    with pytest.raises(ConfigError, match="unknown target 'pixel'.*jetson.*tflite"):
        load_target("pixel")


def test_profile_missing_and_wrong_field(tmp_path):
    p = tmp_path / "dev.toml"
    p.write_text('exporter = "onnx"\nprecision = "fp32"\n')
    with pytest.raises(ConfigError, match="dev.toml: missing field.*precisions"):
        load_target(p)
    p.write_text(Path("targets/onnx.toml").read_text().replace('exporter = "onnx"', 'exporter = "openvino"'))
    with pytest.raises(ConfigError, match="field 'exporter'"):
        load_target(p)
    p.write_text("batchsize = 3\n" + Path("targets/onnx.toml").read_text())
    with pytest.raises(ConfigError, match="unknown field.*batchsize"):
        load_target(p)


def test_not_a_student_folder(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="open_clip_model.safetensors is missing"):
        load_student(tmp_path)


def test_existing_output_refused(tmp_path, student_dir):
    (tmp_path / "onnx").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        _export(tmp_path, student_dir, "onnx")


def test_failing_parity_fails_export(tmp_path, student_dir):
    p = tmp_path / "strict.toml"
    p.write_text(Path("targets/tflite.toml").read_text().replace('precision = "fp32"', 'precision = "int8"')
                 .replace("min_cos = 0.90", "min_cos = 1.01"))
    cfg = dict(target=str(p), student=str(student_dir), precision="", out=str(tmp_path / "b"), probe_images=8)
    data = dict(dataset=tiny_dataset(), calibration_data=tiny_dataset())
    with pytest.raises(ArtifactError, match="parity failed"):
        export_bundle(ExportConfig(**cfg), **data)
    assert not (tmp_path / "b").exists()
    m = export_bundle(ExportConfig(**cfg, allow_parity_fail=True), **data)
    assert m["parity"]["passed"] is False and (tmp_path / "b" / "manifest.json").is_file()
    assert np.load(tmp_path / "b" / "probe.npz")["images"].dtype == np.uint8
