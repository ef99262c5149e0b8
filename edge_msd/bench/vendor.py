"""The vendor's own benchmark tool beside ours: LiteRT's ``benchmark_model``, TensorRT's ``trtexec``,
ONNX Runtime's ``onnxruntime_perf_test``, when one is on the PATH.

The tool runs the same model file at the same batch and threads; its p50 (its mean where it prints no
median) is parsed from its standard output and set next to ours, so that a user sees whether the
harness agrees with the tool they trust. Standard library only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

TOOLS = {"litert": "benchmark_model", "tensorrt": "trtexec", "onnxruntime": "onnxruntime_perf_test"}
AGREE_WITHIN = 0.05  # |ours / tool − 1|: the goal for the harness


def parse_benchmark_model(text: str) -> dict[str, float]:
    """benchmark_model prints (µs) ``count=50 first=… min=… max=… avg=… std=… p5=… median=… p95=…``
    per phase, the timed run last, then ``Inference timings in us: Init: …, First inference: …,
    Warmup (avg): …, Inference (avg): …``."""
    out: dict[str, float] = {}
    m = re.search(r"Inference \(avg\):\s*([\d.]+)", text)
    if m:
        out["mean_ms"] = float(m.group(1)) / 1000
    counts = re.findall(r"count=(\d+)[^\n]*", text)
    lines = re.findall(r"count=\d+[^\n]*", text)
    if lines:
        out["n"] = int(counts[-1])
        med = re.search(r"median=([\d.]+)", lines[-1])
        if med:
            out["p50_ms"] = float(med.group(1)) / 1000
    return out


def parse_trtexec(text: str) -> dict[str, float]:
    """trtexec's performance summary: ``Latency: min = … ms, max = … ms, mean = … ms, median = … ms,
    percentile(90%) = … ms, …`` (host latency: H2D + compute + D2H, as the harness times it)."""
    m = re.search(
        r"\bLatency: min = [\d.]+ ms, max = [\d.]+ ms, mean = ([\d.]+) ms, median = ([\d.]+) ms", text
    )
    return {"mean_ms": float(m.group(1)), "p50_ms": float(m.group(2))} if m else {}


def parse_perf_test(text: str) -> dict[str, float]:
    """onnxruntime_perf_test: ``Average inference time cost: … ms`` and ``P50 Latency: … s``."""
    out: dict[str, float] = {}
    m = re.search(r"Average inference time cost:\s*([\d.]+) ms", text)
    if m:
        out["mean_ms"] = float(m.group(1))
    m = re.search(r"P50 Latency:\s*([\d.eE+-]+) s", text)
    if m:
        out["p50_ms"] = float(m.group(1)) * 1000
    return out


PARSERS = {
    "benchmark_model": parse_benchmark_model,
    "trtexec": parse_trtexec,
    "onnxruntime_perf_test": parse_perf_test,
}


def command(
    tool: str,
    model: Path,
    batch: int,
    threads: int | None,
    iters: int,
    inputs: list[dict[str, Any]],
    options: dict[str, Any],
) -> list[str]:
    """The tool's command line for the same model, batch, threads and number of timed runs."""
    if tool == "benchmark_model":
        cmd = [
            tool,
            f"--graph={model}",
            f"--num_runs={iters}",
            f"--use_xnnpack={str(options.get('xnnpack', True)).lower()}",
        ]
        return cmd + ([f"--num_threads={threads}"] if threads else [])
    if tool == "trtexec":
        cmd = [tool, f"--loadEngine={model}", f"--iterations={iters}"]
        if inputs and inputs[0].get("name") and inputs[0].get("shape"):
            dims = "x".join(str(d) for d in [batch, *inputs[0]["shape"][1:]])
            cmd.append(f"--shapes={inputs[0]['name']}:{dims}")
        return cmd
    cmd = [tool, "-e", "cpu", "-m", "times", "-r", str(iters)]
    return cmd + (["-x", str(threads)] if threads else []) + [str(model)]


def compare(
    runtime: str,
    model: Path,
    batch: int,
    threads: int | None,
    iters: int,
    ours: dict[str, Any],
    inputs: list[dict[str, Any]],
    options: dict[str, Any],
    timeout_s: float = 300,
) -> dict[str, Any] | None:
    """Run the runtime's vendor tool if it is installed; None when there is none. ``ours`` is the
    harness's ``latency_ms`` for the same batch."""
    tool = TOOLS.get(runtime)
    if tool is None or shutil.which(tool) is None:
        return None
    cmd = command(tool, model, batch, threads, iters, inputs, options)
    entry: dict[str, Any] = {"tool": tool, "command": " ".join(cmd)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {**entry, "error": str(e)}
    parsed = PARSERS[tool](done.stdout + done.stderr)
    if done.returncode != 0 or not parsed:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**entry, "error": f"exit {done.returncode}: {tail[0]}"}
    stat = "p50_ms" if "p50_ms" in parsed else "mean_ms"
    ratio = ours[stat.removesuffix("_ms")] / parsed[stat]
    return {
        **entry,
        **parsed,
        "compared": stat.removesuffix("_ms"),
        "ours_ms": ours[stat.removesuffix("_ms")],
        "ratio": ratio,
        "agrees": abs(ratio - 1) <= AGREE_WITHIN,
    }
