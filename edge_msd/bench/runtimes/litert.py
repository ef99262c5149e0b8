"""LiteRT / TFLite: ai-edge-litert, tflite-runtime or TensorFlow's interpreter, XNNPACK by default."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.bench import vendor
from edge_msd.bench.placement import Op, summarise, unavailable, with_op_times
from edge_msd.bench.runtimes.base import Backend, RuntimeMissing, Session
from edge_msd.contract.numerics import dequantize, quantize
from edge_msd.delegation import DELEGATE_OP, executed_ops
from edge_msd.errors import ConfigError


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def numpy_abi_problem(module: str | None) -> str | None:
    """tflite-runtime ≤ 2.14 (its last release) is built against numpy 1.x and dies in a numpy ABI
    traceback under numpy 2; say what to install instead of importing it."""
    if module != "tflite_runtime" or int(np.__version__.split(".")[0]) < 2:
        return None
    release = _dist_version("tflite-runtime") or "0"
    if tuple(int(p) for p in release.split(".")[:2] if p.isdigit()) >= (2, 15):
        return None
    return (
        f"tflite-runtime {release} needs numpy 1.x but numpy {np.__version__} is installed: "
        'pip install "numpy<2" (or pip install ai-edge-litert, which works with numpy 2)'
    )


def _quant_params(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


class LiteRtSession(Session):
    def __init__(self, interp: Any, module: str, threads: int | None, xnnpack: bool, path: Path):
        self.interp = interp
        self.path = path
        self.module = module
        self.threads = threads
        self.xnnpack = xnnpack
        self.inp = interp.get_input_details()[0]
        self.out = interp.get_output_details()[0]
        self.input_dtype = self.inp["dtype"]
        self.in_scale, self.in_zero = _quant_params(self.inp)
        self.out_scale, self.out_zero = _quant_params(self.out)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.input_dtype)
        if dtype.kind in "iu" and self.in_scale > 0 and np.asarray(x).dtype.kind == "f":
            # An int8 model takes quantized input: q = round(x / scale) + zero_point, clipped.
            return np.ascontiguousarray(quantize(x, self.in_scale, self.in_zero, dtype))
        return np.ascontiguousarray(x, dtype=dtype)

    def placement(self, feed: Any, calls: int) -> dict[str, Any]:
        """Ops taken by the XNNPACK delegate vs run by the interpreter's own kernels, from the node list;
        per-op times from benchmark_model where it is installed (LiteRT's Python API has no op profiler)."""
        details = getattr(self.interp, "_get_ops_details", None)
        if details is None:
            return unavailable(f"{self.module} does not list its nodes (no _get_ops_details)")
        ops = details()
        ran = executed_ops(ops, [d["index"] for d in self.interp.get_output_details()])
        accelerator = "XNNPACK" if self.xnnpack else "builtin kernels"
        placed = [
            Op(str(o["index"]), o["op_name"], "builtin kernels" if o["index"] in ran else "XNNPACK")
            for o in ops
            if o["op_name"] != DELEGATE_OP
        ]
        summary = summarise(placed, accelerator, f"{self.module} node list")
        timed = vendor.op_profile(self.path, self.threads, {"xnnpack": self.xnnpack}, accelerator)
        return with_op_times(summary, timed, "benchmark_model --enable_op_profiling")

    def run(self, feed: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.inp["index"], feed)
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out_scale > 0 and y.dtype.kind in "iu":
            return dequantize(y, self.out_scale, self.out_zero)
        return y

    def describe(self) -> dict[str, Any]:
        return {
            "interpreter": self.module,
            "threads": self.threads or "default",
            "xnnpack": self.xnnpack,
            "input": {
                "dtype": np.dtype(self.input_dtype).name,
                "shape": self.inp["shape"].tolist(),
                "quantization": [self.in_scale, self.in_zero],
            },
            "output": {
                "dtype": np.dtype(self.out["dtype"]).name,
                "quantization": [self.out_scale, self.out_zero],
            },
        }


class LiteRtBackend(Backend):
    name = "litert"
    formats = ("tflite",)
    modules = ("ai_edge_litert", "tflite_runtime", "tensorflow")
    install = "pip install ai-edge-litert (or tflite-runtime)"

    @classmethod
    def version(cls) -> str:
        mod = cls.module_name()
        if mod == "ai_edge_litert":
            return _dist_version("ai-edge-litert") or "unknown"
        return super().version()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return super().unavailable_reason() or numpy_abi_problem(cls.module_name())

    @classmethod
    def import_runtime(cls) -> Any:
        mod = cls.module_name()
        return importlib.import_module("tensorflow.lite" if mod == "tensorflow" else f"{mod}.interpreter")

    def load(self, model_entry, path, threads, batch, options):
        mod = self.module_name()
        problem = numpy_abi_problem(mod)
        if problem:
            raise RuntimeMissing(problem)
        tfl = self.import_runtime()
        xnnpack = bool(options.get("xnnpack", True))
        kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        if not xnnpack:
            # AUTO applies the default delegate (XNNPACK); this resolver leaves it out.
            kwargs["experimental_op_resolver_type"] = tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interp = tfl.Interpreter(**kwargs)
        inp = interp.get_input_details()[0]
        if int(inp["shape"][0]) != batch:
            sig = inp.get("shape_signature", inp["shape"])
            if int(sig[0]) not in (-1, batch):
                raise ConfigError(
                    f"{path.name}: input batch is fixed at {int(sig[0])}; batch {batch} "
                    "needs a model exported with a dynamic batch"
                )
            interp.resize_tensor_input(inp["index"], [batch, *[int(d) for d in inp["shape"][1:]]])
        interp.allocate_tensors()
        return LiteRtSession(interp, mod, threads, xnnpack, path)
