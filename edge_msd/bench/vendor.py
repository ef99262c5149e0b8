"""The vendor's own benchmark tool beside ours: LiteRT's ``benchmark_model`` (or the Python
``benchmark_litert_model`` that ai-edge-litert ships), TensorRT's ``trtexec``, ONNX Runtime's
``onnxruntime_perf_test``, when one is installed.

The tool runs the same model file at the same batch and threads; its p50 (its mean where it prints no
median) is parsed from its standard output and set next to ours, so that a user sees whether the
harness agrees with the tool they trust. The tools feed random values, so only the image tower is
compared (random integers are not token ids). ``benchmark_model --enable_op_profiling=true`` also gives
LiteRT's per-op times, which its Python API cannot. Standard library only.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_msd.bench.placement import Op
from edge_msd.bench.timing import UNSTABLE_CV

# runtime → its tools, preferred first; a dotted name is a Python module run with this interpreter
TOOLS = {
    "litert": ("benchmark_model", "ai_edge_litert.tools.benchmark_litert_model"),
    "tensorrt": ("trtexec",),
    "onnxruntime": ("onnxruntime_perf_test",),
}
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
        avg, std = re.search(r"avg=([\d.]+)", lines[-1]), re.search(r"std=([\d.]+)", lines[-1])
        if avg and std and float(avg.group(1)) > 0:
            out["cv"] = float(std.group(1)) / float(avg.group(1))
    return out


def parse_benchmark_litert_model(text: str) -> dict[str, float]:
    """ai-edge-litert's benchmark_litert_model.py prints ``Inference (avg):       0.02 ms (200 runs)``
    and ``Inference (median):    0.02 ms`` (two decimals: compare models slower than a few ms)."""
    out: dict[str, float] = {"resolution_ms": 0.01}
    m = re.search(r"Inference \(avg\):\s*([\d.]+) ms \((\d+) runs\)", text)
    if m:
        out["mean_ms"], out["n"] = float(m.group(1)), int(m.group(2))
    m = re.search(r"Inference \(median\):\s*([\d.]+) ms", text)
    if m:
        out["p50_ms"] = float(m.group(1))
    return out if len(out) > 1 else {}


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


OP_PROFILE = "Operator-wise Profiling Info for Regular Benchmark Runs:"


def parse_op_profile(text: str, delegate: str) -> list[Op]:
    """The "Run Order" table that ``benchmark_model --enable_op_profiling=true`` prints after
    ``Operator-wise Profiling Info for Regular Benchmark Runs:`` (TFLite's profile summarizer): a header
    ``[node type] [start] [first] [avg ms] [%] [cdf%] [mem KB] [times called] [Name]`` (newer releases
    drop ``[start]``), then one row per node, columns apart by tabs or two or more spaces, ending at a
    blank line. Nodes a delegate ran are named ``Delegate/…`` (per-op profiling inside XNNPACK) or have a
    ``…Delegate`` node type (one node per delegated partition); they are put on ``delegate``, the rest
    on the interpreter's ``builtin kernels``. Cost: ``avg ms`` × ``times called``, ms per inference."""
    start = text.find(OP_PROFILE)
    if start < 0:
        return []
    head: list[str] | None = None
    ops = []
    for line in text[start:].splitlines()[1:]:
        cells = [c.strip() for c in re.split(r"\t|\s{2,}", line.strip()) if c.strip()]
        if head is None:
            if cells[:1] == ["[node type]"]:
                head = [c.strip("[]") for c in cells]
            continue
        if len(cells) != len(head):  # the blank line (or the next table) after the last row
            break
        row = dict(zip(head, cells, strict=True))
        kind, name = row["node type"], row["Name"]
        delegated = name.startswith("Delegate/") or "Delegate" in kind
        cost = float(row["avg ms"]) * float(row["times called"])
        ops.append(Op(name, kind, delegate if delegated else "builtin kernels", cost))
    return ops


def op_profile(model: Path, threads: int | None, options: dict[str, Any], delegate: str,
               runs: int = 20, timeout_s: float = 300) -> list[Op] | str:
    """LiteRT per-op times from ``benchmark_model --enable_op_profiling=true`` (a separate process: the
    profiler slows every call), or why there are none."""
    if shutil.which("benchmark_model") is None:
        return ("LiteRT's Python API has no op profiler: per-op times need LiteRT's benchmark_model "
                "on the PATH (built from LiteRT, or its prebuilt binary for the device)")
    cmd = [*command("benchmark_model", model, 1, threads, runs, [], options), "--enable_op_profiling=true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}"
    ops = parse_op_profile(done.stdout + done.stderr, delegate)
    if not ops:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"benchmark_model printed no op profile (exit {done.returncode}: {tail[0]})"
    return ops


PARSERS = {
    "benchmark_model": parse_benchmark_model,
    "ai_edge_litert.tools.benchmark_litert_model": parse_benchmark_litert_model,
    "trtexec": parse_trtexec,
    "onnxruntime_perf_test": parse_perf_test,
}


def find_tool(runtime: str) -> str | None:
    """The first of the runtime's tools that is installed: on the PATH, or an importable module."""
    for tool in TOOLS.get(runtime, ()):
        if "." in tool:
            try:
                if importlib.util.find_spec(tool) is not None:
                    return tool
            except ImportError:  # its package is missing
                continue
        elif shutil.which(tool):
            return tool
    return None


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
        xnnpack = str(options.get("xnnpack", True)).lower()
        cmd = [tool, f"--graph={model}", f"--num_runs={iters}", f"--use_xnnpack={xnnpack}"]
        return cmd + ([f"--num_threads={threads}"] if threads else [])
    if "." in tool:  # benchmark_litert_model.py: CompiledModel API, CPU accelerator, 1 thread by default
        cmd = [sys.executable, "-m", tool, f"--model={model}", f"--num_runs={iters}"]
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
) -> dict | None:
    """Run the runtime's vendor tool if one is installed (else None). ``ours`` is the harness's
    ``latency_ms`` for the same batch."""
    tool = find_tool(runtime)
    if tool is None:
        return None
    cmd = command(tool, model, batch, threads, iters, inputs, options)
    entry: dict[str, Any] = {"tool": tool.rsplit(".", 1)[-1], "command": " ".join(cmd)}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {**entry, "error": str(e)}
    parsed = PARSERS[tool](done.stdout + done.stderr)
    if done.returncode != 0 or not parsed:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**entry, "error": f"exit {done.returncode}: {tail[0]}"}
    stat = "p50" if "p50_ms" in parsed else "mean"
    if parsed[f"{stat}_ms"] <= 0:
        return {**entry, **parsed, "error": f"{entry['tool']} printed {stat} 0 ms: below its resolution"}
    agree = agrees(ours[stat], parsed[f"{stat}_ms"], parsed.get("resolution_ms", 0.0))
    return {
        **entry,
        **parsed,
        "compared": stat,
        "ours_ms": ours[stat],
        "ratio": ours[stat] / parsed[f"{stat}_ms"],
        "agrees": agree,
        "verdict": verdict(agree, {"ours": ours.get("cv"), entry["tool"]: parsed.get("cv")}),
    }


def verdict(agree: bool, cvs: dict[str, float | None]) -> str:
    """"agrees" / "disagrees", or "inconclusive (unstable: …)" when either run's coefficient of
    variation is above ``UNSTABLE_CV``: two unstable runs differ by noise, not by the harness."""
    unstable = [f"{who} CV {cv:.0%}" for who, cv in cvs.items() if cv is not None and cv > UNSTABLE_CV]
    if unstable:
        return f"inconclusive (unstable: {', '.join(unstable)})"
    return "agrees" if agree else "disagrees"


def agrees(ours_ms: float, tool_ms: float, resolution_ms: float = 0.0) -> bool:
    """Within ``AGREE_WITHIN`` of the tool's time, which a tool that prints ``resolution_ms`` steps knows
    only to half a step (0.10 ms printed: 0.095–0.105 ms)."""
    low, high = tool_ms - resolution_ms / 2, tool_ms + resolution_ms / 2
    return low * (1 - AGREE_WITHIN) <= ours_ms <= high * (1 + AGREE_WITHIN)
