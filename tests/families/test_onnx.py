"""The onnx family: the fp32 bundle's parity and I/O, and its ONNX Runtime runner (providers, profiling)."""

from __future__ import annotations

import pytest
from export_helpers import _export

from edge_msd.bench import runtimes
from edge_msd.contract.reading import open_bundle
from edge_msd.errors import ConfigError


@pytest.mark.slow
def test_onnx_bundle_parity(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "onnx")
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999
    assert m["models"]["text"]["inputs"][0] == {"name": "tokens", "shape": [-1, 16], "dtype": "int32"}
    assert m["models"]["image"]["outputs"][0]["name"] == "embedding"
    assert m["delegate_check"] == {}  # ONNX Runtime places nodes on the device; nothing to check here


def test_unknown_ort_provider_lists_available(bundle):
    b = open_bundle(bundle)
    msg = "'NoSuchExecutionProvider' is not available here; available: .*CPU"
    with pytest.raises(ConfigError, match=msg):
        runtimes.OnnxRuntimeBackend().load(
            b.model("image"), b.model_path("image"), 1, 1, {"provider": "NoSuchExecutionProvider"}
        )


def test_ort_profile_events_to_ops():
    from edge_msd.bench.runtimes.onnxruntime import profile_ops

    ev = [
        {"cat": "Session", "name": "model_run", "dur": 500},
        {"cat": "Node", "name": "/fc/MatMul_fence_before", "dur": 0, "args": {"op_name": "MatMul"}},
        {
            "cat": "Node",
            "name": "/fc/MatMul_kernel_time",
            "dur": 30,
            "args": {"op_name": "MatMul", "provider": "CUDAExecutionProvider"},
        },
        {
            "cat": "Node",
            "name": "/fc/MatMul_kernel_time",
            "dur": 10,
            "args": {"op_name": "MatMul", "provider": "CUDAExecutionProvider"},
        },
        {
            "cat": "Node",
            "name": "/norm/ReduceL2_kernel_time",
            "dur": 60,
            "args": {"op_name": "ReduceL2", "provider": "CPUExecutionProvider"},
        },
    ]
    from edge_msd.bench.placement import summarise

    p = summarise(profile_ops(ev), "CUDAExecutionProvider", "test")
    assert p["ops"] == 2 and p["on_accelerator"] == 1 and p["fallback_ops"] == {"ReduceL2": 1}
    assert [(o["op"], o["cost"], o["share"]) for o in p["slowest"]] == [
        ("ReduceL2", 0.06, 0.75),
        ("MatMul", 0.02, 0.25),
    ]
