"""edge_msd.bench.vendor: the vendor tools' output parsed from recorded runs, and the comparison
with a tool found beside the harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bench_helpers import DATA, _fake_tool, _opts

from edge_msd.bench.report import format_table
from edge_msd.bench.run import run_bench

# benchmark_model's output (LiteRT tools/benchmark), the timed run's count= line last.
BENCHMARK_MODEL_OUT = (
    "INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if "
    "exceeding 150 seconds.\n"
    "INFO: count=16 first=87112 curr=55116 min=51226 max=87112 avg=58147.4 std=11478 p5=51629 "
    "median=51962 p95=87112\n"
    "INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if "
    "exceeding 150 seconds.\n"
    "INFO: count=50 first=52162 curr=49785 min=49088 max=686105 avg=63743.2 std=60716 p5=49620 "
    "median=51891 p95=68628\n"
    "INFO: Inference timings in us: Init: 119515, First inference: 87112, Warmup (avg): 58147.4, "
    "Inference (avg): 63743.2\n"
)


TRTEXEC_OUT = (
    "[I] === Performance summary ===\n[I] Throughput: 1162.74 qps\n"
    "[I] Latency: min = 0.836 ms, max = 1.405 ms, mean = 0.861 ms, median = 0.858 ms, "
    "percentile(90%) = 0.871 ms, percentile(95%) = 0.878 ms, percentile(99%) = 0.921 ms\n"
)


PERF_TEST_OUT = """Session creation time cost: 0.0213 s
Total inference time cost: 0.0612 s
Total inference requests: 200
Average inference time cost: 0.306 ms
P50 Latency: 0.000298 s
P90 Latency: 0.000331 s
"""


# ai-edge-litert 2.3's tools/benchmark_litert_model.py on a tflite bundle's image tower, here.
BENCHMARK_LITERT_MODEL_OUT = """
========================================
 BENCHMARK RESULTS
========================================
Model initialization:  3.87 ms
Warmup (first):        0.18 ms
Warmup (avg):          0.06 ms (5 runs)
Inference (avg):       0.02 ms (200 runs)
Inference (min):       0.01 ms
Inference (max):       0.07 ms
Inference (median):    0.02 ms
Inference (std):       0.00 ms
Fully accelerated:     False
========================================
"""


def test_benchmark_model_op_profile_parser():
    from edge_msd.bench import vendor
    from edge_msd.bench.placement import summarise

    ops = vendor.parse_op_profile((DATA / "benchmark_model_op_profile_xnnpack.txt").read_text(), "XNNPACK")
    assert len(ops) == 5  # the run-order table only, not the top-by-time table after it
    assert ops[0] == ("[tfl.quantize]:0", "QUANTIZE", "builtin kernels", 0.203)
    assert ops[2].op == "Convolution (NHWC, QC8) DWConv" and ops[2].device == "XNNPACK"
    assert ops[2].cost == pytest.approx(0.051 * 13)  # avg ms per call × calls per inference
    p = summarise(ops, "XNNPACK", "test")
    assert p["on_accelerator"] == 4 and p["fallback_ops"] == {"QUANTIZE": 1}
    assert [s["op"] for s in p["slowest"][:2]] == [
        "Convolution (NHWC, QC8) DWConv",
        "Convolution (NHWC, QC8) IGEMM",
    ]
    ops = vendor.parse_op_profile((DATA / "benchmark_model_op_profile_nnapi.txt").read_text(), "NNAPI")
    assert [(o.op, o.device) for o in ops] == [
        ("TfLiteNnapiDelegate", "NNAPI"),
        ("AVERAGE_POOL_2D", "builtin kernels"),
        ("RESIZE_BILINEAR", "builtin kernels"),
        ("ARG_MAX", "builtin kernels"),
    ]
    assert ops[0].name == "[MobilenetV2/expanded_conv_16/project/add_fold, aspp0/Relu]:71"
    assert ops[2].cost == pytest.approx(22.369)
    assert vendor.parse_op_profile(BENCHMARK_MODEL_OUT, "XNNPACK") == []  # run without op profiling


def test_vendor_parsers_on_recorded_output():
    from edge_msd.bench import vendor

    assert vendor.parse_benchmark_litert_model(BENCHMARK_LITERT_MODEL_OUT) == {
        "mean_ms": 0.02,
        "n": 200,
        "p50_ms": 0.02,
        "resolution_ms": 0.01,
    }
    assert vendor.parse_benchmark_litert_model("garbage") == {}
    # a tool that prints 0.10 ms cannot tell 0.0945 ms from its own time; a precise one can
    assert vendor.agrees(0.0945, 0.10, 0.01) and not vendor.agrees(0.0945, 0.10)
    assert not vendor.agrees(0.090, 0.10, 0.01) and vendor.agrees(0.104, 0.10)
    assert not vendor.agrees(0.94, 1.0)

    assert vendor.parse_benchmark_model(BENCHMARK_MODEL_OUT) == pytest.approx(
        {"mean_ms": 63.7432, "n": 50, "p50_ms": 51.891, "cv": 60716 / 63743.2}
    )
    assert vendor.parse_trtexec(TRTEXEC_OUT) == {"mean_ms": 0.861, "p50_ms": 0.858}
    assert vendor.parse_perf_test(PERF_TEST_OUT) == pytest.approx({"mean_ms": 0.306, "p50_ms": 0.298})
    assert vendor.parse_trtexec("garbage") == {}


def test_vendor_tool_beside_the_harness(bundle, tmp_path, monkeypatch):
    from edge_msd.bench import vendor

    log = tmp_path / "args.txt"
    _fake_tool(tmp_path / "bin", "onnxruntime_perf_test", PERF_TEST_OUT, log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    report = run_bench(_opts(bundle, tmp_path / "r.json", batch=[1], cold=False))
    v = report["towers"]["image"]["vendor"]
    ours = report["towers"]["image"]["measurements"][-1]["latency_ms"]["p50"]
    assert (
        v["tool"] == "onnxruntime_perf_test"
        and v["compared"] == "p50"
        and v["p50_ms"] == pytest.approx(0.298)
    )
    assert v["ratio"] == pytest.approx(ours / 0.298) and v["agrees"] is (abs(v["ratio"] - 1) <= 0.05)
    assert log.read_text().split() == [
        "-e",
        "cpu",
        "-m",
        "times",
        "-r",
        "5",
        "-x",
        "1",
        str(bundle / "models/image.onnx"),
    ]
    assert "vendor" not in report["towers"]["text"]  # the tools' random integers are not token ids
    assert "vendor tool beside the harness" in format_table(report)
    _fake_tool(tmp_path / "bin2", "benchmark_model", BENCHMARK_MODEL_OUT, log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin2'}{os.pathsep}{os.environ['PATH']}")
    v = vendor.compare("litert", Path("m.tflite"), 1, 2, 50, {"p50": 51.891 * 1.02}, [], {"xnnpack": True})
    assert v["ratio"] == pytest.approx(1.02) and v["agrees"] and "--num_threads=2" in log.read_text()
    assert vendor.compare("coreml", Path("m.mlpackage"), 1, None, 50, {"p50": 1.0}, [], {}) is None
