"""ONNX Runtime: any machine, with the execution provider the user asks for (CPU as fallback)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.bench.placement import Op, summarise
from edge_msd.bench.runtimes.base import Backend, Session, declared_dtype
from edge_msd.errors import ConfigError

_ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
}


def _session_options(ort: Any, threads: int | None) -> Any:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def profile_ops(profile: list[dict[str, Any]]) -> list[Op]:
    """ONNX Runtime's profiling events (Chrome trace JSON) → one ``Op`` per node with its median kernel time.

    Node events look like ``{"cat": "Node", "name": "/fc/MatMul_kernel_time", "dur": 12,
    "args": {"op_name": "MatMul", "provider": "CPUExecutionProvider", …}}`` (dur in µs).
    """
    durations: dict[str, list[float]] = {}
    kinds: dict[str, tuple[str, str]] = {}
    for ev in profile:
        name = str(ev.get("name", ""))
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name.removesuffix("_kernel_time")
        args = ev.get("args") or {}
        kinds[node] = (str(args.get("op_name", "?")), str(args.get("provider", "?")))
        durations.setdefault(node, []).append(float(ev.get("dur", 0)) / 1000)
    # the median, not the mean: the first profiled call carries one-off allocations
    return [Op(n, kinds[n][0], kinds[n][1], statistics.median(d)) for n, d in durations.items()]


class OrtSession(Session):
    def __init__(self, sess: Any, providers: list[str], threads: int | None, dtype: Any, path: Path):
        self.sess = sess
        self.path = path
        self.input_name = sess.get_inputs()[0].name
        self.output_name = sess.get_outputs()[0].name
        self.input_dtype = dtype
        self.providers = providers
        self.threads = threads

    def prepare(self, x: np.ndarray) -> Any:
        return {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)}

    def run(self, feed: Any) -> np.ndarray:
        return self.sess.run([self.output_name], feed)[0]

    def describe(self) -> dict[str, Any]:
        return {
            "providers": self.sess.get_providers(),
            "requested_providers": self.providers,
            "intra_op_threads": self.threads or "default",
        }

    def placement(self, feed: Any, calls: int) -> dict[str, Any]:
        """Node → execution provider and per-node time from a second, profiling session (profiling
        slows every call, so the timed session never profiles)."""
        import onnxruntime as ort

        so = _session_options(ort, self.threads)
        so.enable_profiling = True
        with tempfile.TemporaryDirectory() as tmp:
            so.profile_file_prefix = os.path.join(tmp, "ort")
            sess = ort.InferenceSession(str(self.path), sess_options=so, providers=self.providers)
            for _ in range(calls):
                sess.run([self.output_name], feed)
            trace = Path(sess.end_profiling())
            events = json.loads(trace.read_text(encoding="utf-8"))
        return summarise(profile_ops(events), self.providers[0], "onnxruntime profiling")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = ("onnx",)
    modules = ("onnxruntime",)
    install = "pip install onnxruntime (or onnxruntime-gpu; on Jetson the JetPack wheel)"

    def load(self, model_entry, path, threads, batch, options):
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = options.get("provider") or "cpu"
        providers = []
        for p in str(wanted).split(","):
            full = _ORT_PROVIDERS.get(p.strip().lower(), p.strip())
            if full not in available:
                raise ConfigError(
                    f"ONNX Runtime execution provider {full!r} is not available here; "
                    f"available: {', '.join(available)}"
                )
            providers.append(full)
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")  # fallback for nodes the accelerator lacks
        so = _session_options(ort, threads)
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        in_type = sess.get_inputs()[0].type  # e.g. "tensor(float)"
        dtype = {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(int32)": np.int32,
            "tensor(int64)": np.int64,
            "tensor(int8)": np.int8,
            "tensor(uint8)": np.uint8,
        }.get(in_type, declared_dtype(model_entry, np.float32))
        return OrtSession(sess, providers, threads, dtype, path)
