"""The coreml family: the ML Program spec and its fp32 ops, the W8A8 recipe, the Neural Engine warnings,
and the Core ML runner (on macOS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from export_helpers import TABLE_FP32_BYTES, _check, _export, _export_int8

from edge_msd.bench import runtimes
from edge_msd.contract.reading import open_bundle
from edge_msd.delegation import coreml_findings
from edge_msd.families import family
from edge_msd.families.common.quantizer import cosine_to
from edge_msd.quant.recipes import quantizer_for


@pytest.mark.slow
def test_coreml_spec(tmp_path, student_dir):
    from edge_msd.export.bundle import verify_bundle

    m = _export(tmp_path, student_dir, "coreml")
    assert verify_bundle(tmp_path / "coreml").manifest == m  # .mlpackage folders: every file listed
    text = m["models"]["text"]
    assert text["precision"] == "fp16" and text["inputs"][0]["dtype"] == "int32"
    ops = text["coreml_check"]["ops"]
    assert set(ops["layer_norm"]) == {"FLOAT32"} and set(ops["softmax"]) == {"FLOAT32"}
    assert "FLOAT16" in ops["linear"]
    assert m["parity"]["passed"] is None and "macOS" in m["parity"]["skipped"]
    for tower in ("image", "text"):  # the L2 norm: fp32 from reduce_l2_norm through its clamp to the divide
        assert m["models"][tower]["coreml_check"]["l2_norms_fp32"] == 1
        ops = m["models"][tower]["coreml_check"]["ops"]
        assert set(ops["maximum"]) == set(ops["tile"]) == set(ops["reduce_l2_norm"]) == {"FLOAT32"}


@pytest.mark.slow
def test_coreml_int8_w8a8_bundle(tmp_path, student_dir, calibration):
    m = _export_int8(tmp_path, student_dir, "coreml", calibration)
    for tower in ("image", "text"):
        e = m["models"][tower]
        ops = e["coreml_check"]["ops"]
        assert e["precision"] == "int8" and set(ops["quantize"]) == {"INT8"}
        assert "constexpr_affine_dequantize" in ops  # int8 weights
        assert set(ops["layer_norm"]) == {"FLOAT32"}
    assert m["models"]["text"]["inputs"][0] == {"name": "tokens", "shape": [1, 16], "dtype": "int32"}
    gathers = m["models"]["text"]["coreml_check"]["ops"]["gather"]  # int8 rows, then their float scales
    assert gathers == {"INT8": 1, "FLOAT32": 1}
    text = tmp_path / "coreml" / m["models"]["text"]["file"]
    assert sum(f.stat().st_size for f in text.rglob("*") if f.is_file()) * 3 < TABLE_FP32_BYTES
    assert m["quantization"]["recipe"]["name"] == "coreml-w8a8" and m["calibration"]["n"] == 32
    assert m["parity"]["passed"] is None and m["parity"]["thresholds"]["min_cos"] == 0.95


def test_coreml_predicts_on_macos(tmp_path, student_dir):
    import platform

    if platform.system() != "Darwin":
        pytest.skip("Core ML predictions need macOS")
    m = _export(tmp_path, student_dir, "coreml")
    assert m["parity"]["passed"]


@pytest.mark.slow
def test_coreml_linear_quantizer_prepare_finalize_convert(towers, batches, tmp_path):
    quantizer = quantizer_for(family("coreml").recipe)
    tower, data = towers[1], batches[1]
    prepared = quantizer.quantize(tower, data, qat=True, n_steps=4)
    assert len(quantizer.layers(prepared)) >= 4
    loss = prepared(data[0]).sum()
    loss.backward()  # trainable fake quant
    quantizer.on_qat_step(prepared, 1, 4)
    final = quantizer.finalize(prepared)
    assert cosine_to(tower(data[1]).detach(), final(data[1]).detach()) > 0.98
    entry = quantizer.write(prepared, data[0][:1], tmp_path / "text.mlpackage")
    assert (tmp_path / "text.mlpackage").is_dir() and entry["precision"] == "int8"


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


@pytest.mark.device
@pytest.mark.skipif(
    runtimes.CoreMlBackend.unavailable_reason() is not None,
    reason=f"Core ML: {runtimes.CoreMlBackend.unavailable_reason()}",
)
def test_coreml_backend_is_selected_for_mlpackages():  # pragma: no cover - on macOS
    files = {"image": {"mlpackage": Path("image.mlpackage")}, "text": {"mlpackage": Path("text.mlpackage")}}
    assert runtimes.select_backend("auto", files) is runtimes.CoreMlBackend


@pytest.mark.device
@pytest.mark.skipif(
    runtimes.CoreMlBackend.unavailable_reason() is not None,
    reason=f"Core ML: {runtimes.CoreMlBackend.unavailable_reason()}",
)
def test_coreml_placement_from_compute_plan(tmp_path):  # pragma: no cover - on macOS
    bundle_dir = Path(os.environ.get("EDGE_MSD_COREML_BUNDLE", "runs/export/coreml"))
    b = open_bundle(bundle_dir)
    s = runtimes.CoreMlBackend().load(
        b.model("image"), b.model_path("image"), None, 1, {"compute_units": "all"}
    )
    p = s.placement(None, 0)
    assert p["available"] and p["ops"] > 0 and set(p["by_device"]) <= {"CPU", "GPU", "ANE"}
