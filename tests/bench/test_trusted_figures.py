"""Figures a user can trust: the vendor verdict says when it cannot tell, memory per row is the session's
own, and the latency plots' axis shows the distributions rather than the slowest outlier."""

from __future__ import annotations

import numpy as np
import pytest

from edge_msd.bench import vendor
from edge_msd.bench.report import latency_axis_top, latency_rows, vendor_rows


def test_vendor_verdict_is_inconclusive_when_either_run_is_unstable():
    assert vendor.verdict(True, {"ours": 0.02, "benchmark_model": 0.03}) == "agrees"
    assert vendor.verdict(False, {"ours": 0.02, "benchmark_model": None}) == "disagrees"
    unstable = vendor.verdict(False, {"ours": 0.47, "benchmark_model": 0.05})
    assert unstable == "inconclusive (unstable: ours CV 47%)"
    assert "tool CV 12%" in vendor.verdict(True, {"ours": 0.01, "tool": 0.12})


def test_benchmark_model_std_gives_its_cv():
    text = ("INFO: count=50 first=52162 curr=49785 min=49088 max=686105 avg=63743.2 std=60716 p5=49620 "
            "median=51891 p95=68628\nINFO: Inference timings in us: Inference (avg): 63743.2\n")
    parsed = vendor.parse_benchmark_model(text)
    assert parsed["cv"] == pytest.approx(60716 / 63743.2) and parsed["p50_ms"] == pytest.approx(51.891)


def _report(samples: list[float], vendor_entry: dict | None = None) -> dict:
    m = {"batch": 1, "iters": len(samples), "rss_before_mb": 1500.0, "peak_rss_mb": 1532.5,
         "latency_ms": {"p50": 0.12, "p90": 0.2, "p99": 0.3, "mean": 0.15, "std": 0.07, "cv": 0.47},
         "samples_ms": samples}
    tower = {"measurements": [m]}
    if vendor_entry:
        tower["vendor"] = vendor_entry
    return {"towers": {"image": tower}}


def test_latency_row_shows_the_sessions_memory_beside_the_host_process():
    row = latency_rows(_report([0.1, 0.2]))[0]
    assert row[-3:-1] == ["32.5", "1532"]  # session MB (peak − before), host process peak RSS MB


def test_vendor_row_prints_the_verdict():
    entry = {"tool": "benchmark_litert_model", "compared": "p50", "p50_ms": 0.25, "ours_ms": 0.137,
             "ratio": 0.548, "agrees": False, "verdict": "inconclusive (unstable: ours CV 47%)"}
    assert vendor_rows(_report([0.1], entry))[0][-1] == "inconclusive (unstable: ours CV 47%)"
    old = {**entry, "verdict": None}  # a report written before verdicts
    assert vendor_rows(_report([0.1], old))[0][-1] == "disagrees"


def test_latency_axis_is_not_set_by_one_outlier():
    rng = np.random.default_rng(0)
    fast = list(rng.normal(0.12, 0.005, 2000))
    slow = list(rng.normal(0.2, 0.01, 2000)) + [4.5]  # one 4.5 ms hiccup
    top = latency_axis_top([fast, slow])
    assert np.percentile(slow, 99) < top < 0.5


def test_latency_plot_renders_with_its_axis_clipped(tmp_path):
    pytest.importorskip("matplotlib")
    from edge_msd.bench.report import _plots

    samples = [0.1 + 0.001 * (i % 10) for i in range(500)] + [5.0]
    run = {**_report(samples), "runtime": {"name": "onnxruntime", "provider": "cpu"},
           "device": {"label": "host"}}
    paths = _plots([run], tmp_path)
    assert any(p.name == "latency_image.png" and p.stat().st_size > 1000 for p in paths)
