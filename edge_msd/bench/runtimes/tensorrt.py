"""TensorRT on the Jetson: a serialized engine per tower, CUDA through cuda-python or pycuda."""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.bench.placement import Op, summarise, unavailable
from edge_msd.bench.runtimes.base import Backend, Session, batch_shape, has_module
from edge_msd.errors import ConfigError, EdgeMSDError


class _Cuda:
    """The few CUDA calls the TensorRT session needs, through cuda-python or pycuda."""

    def __init__(self) -> None:
        if has_module("cuda.bindings"):
            from cuda.bindings import runtime as cudart
        elif has_module("cuda.cudart"):
            from cuda import cudart  # cuda-python < 12.6
        else:
            cudart = None
        self.cudart = cudart
        self.host_ptrs: list[Any] = []
        if cudart is None:
            import pycuda.autoinit  # noqa: F401  (creates the context)
            import pycuda.driver as drv

            self.drv = drv

    def _check(self, result: tuple) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise EdgeMSDError(f"CUDA error {err}")
        return rest[0] if rest else None

    def stream(self) -> Any:
        return self._check(self.cudart.cudaStreamCreate()) if self.cudart else self.drv.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream) if self.cudart else stream.handle

    def malloc(self, nbytes: int) -> Any:
        return self._check(self.cudart.cudaMalloc(nbytes)) if self.cudart else self.drv.mem_alloc(nbytes)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if self.cudart:  # page-locked buffers make the async copies truly async
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            ptr = self._check(self.cudart.cudaMallocHost(nbytes))
            self.host_ptrs.append(ptr)
            buf = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(int(ptr)))
            return buf.view(dtype).reshape(shape)
        return self.drv.pagelocked_empty(shape, dtype)

    def h2d(self, dst: Any, src: np.ndarray, stream: Any) -> None:
        if self.cudart:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))
        else:
            self.drv.memcpy_htod_async(dst, src, stream)

    def d2h(self, dst: np.ndarray, src: Any, stream: Any) -> None:
        if self.cudart:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))
        else:
            self.drv.memcpy_dtoh_async(dst, src, stream)

    def sync(self, stream: Any) -> None:
        if self.cudart:
            self._check(self.cudart.cudaStreamSynchronize(stream))
        else:
            stream.synchronize()

    def free(self, ptr: Any) -> None:
        if self.cudart:
            self.cudart.cudaFree(ptr)
        else:
            ptr.free()

    def free_host(self) -> None:
        for ptr in self.host_ptrs:
            self.cudart.cudaFreeHost(ptr)
        self.host_ptrs.clear()


_PRECISION = re.compile(r"\b(FP32|FP16|BF16|FP8|Int8|INT8|Int4|INT4)\b")


def inspector_ops(info: dict[str, Any]) -> list[Op]:
    """The engine inspector's JSON (``IEngineInspector.get_engine_information``) → one ``Op`` per layer,
    its device being the precision of its first output (e.g. "Row major linear FP32" → FP32). Layers
    are plain names unless the engine was built with ``ProfilingVerbosity.DETAILED``."""
    ops = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            ops.append(Op(str(layer), "?", "unknown (build with detailed profiling verbosity)"))
            continue
        outputs = layer.get("Outputs") or [{}]
        m = _PRECISION.search(str(outputs[0].get("Format/Datatype", "")))
        ops.append(
            Op(
                str(layer.get("Name")),
                str(layer.get("LayerType", "?")),
                m.group(1).upper() if m else "unknown",
            )
        )
    return ops


class TensorRtSession(Session):
    """Engine + execution context + one CUDA stream; run = H2D, enqueue, D2H, sync (as trtexec times it)."""

    def __init__(self, trt: Any, engine: Any, batch: int, plan: Path, precision: str = "fp32"):
        self.cuda = _Cuda()
        self.precision = precision  # what the bundle asked for: layers above it fell back
        self.engine = engine
        self.plan = plan
        self.ctx = engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.in_name, self.out_name = inputs[0], outputs[0]
        in_shape = list(engine.get_tensor_shape(self.in_name))
        if in_shape[0] == -1:
            self.ctx.set_input_shape(self.in_name, batch_shape(in_shape, batch))
        elif in_shape[0] != batch:
            raise ConfigError(f"{plan.name}: engine batch is fixed at {in_shape[0]}, asked for {batch}")
        self.input_dtype = trt.nptype(engine.get_tensor_dtype(self.in_name))
        self.in_shape = tuple(self.ctx.get_tensor_shape(self.in_name))
        self.out_shape = tuple(self.ctx.get_tensor_shape(self.out_name))
        out_dtype = trt.nptype(engine.get_tensor_dtype(self.out_name))
        self.h_in = self.cuda.pinned(self.in_shape, self.input_dtype)
        self.h_out = self.cuda.pinned(self.out_shape, out_dtype)
        self.d_in = self.cuda.malloc(self.h_in.nbytes)
        self.d_out = self.cuda.malloc(self.h_out.nbytes)
        self.ctx.set_tensor_address(self.in_name, int(self.d_in))
        self.ctx.set_tensor_address(self.out_name, int(self.d_out))
        self.trt_version = trt.__version__

    def run(self, feed: np.ndarray) -> np.ndarray:
        self.h_in[...] = feed
        self.cuda.h2d(self.d_in, self.h_in, self.stream)
        if not self.ctx.execute_async_v3(self.cuda.stream_handle(self.stream)):
            raise EdgeMSDError(f"{self.plan.name}: TensorRT execution failed")
        self.cuda.d2h(self.h_out, self.d_out, self.stream)
        self.cuda.sync(self.stream)
        return self.h_out.astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.plan.name,
            "tensorrt": self.trt_version,
            "input": list(self.in_shape),
            "input_dtype": np.dtype(self.input_dtype).name,
            "cuda": "cuda-python" if self.cuda.cudart else "pycuda",
            "streams": 1,
        }

    def placement(self, feed: Any, calls: int) -> dict[str, Any]:
        """Layer precisions from the engine inspector: a layer above the bundle's precision (FP32 in an
        FP16/INT8 engine) is TensorRT's silent fallback."""
        import tensorrt as trt

        inspector = self.engine.create_engine_inspector()
        if inspector is None:
            return unavailable("this TensorRT build has no engine inspector")
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        return summarise(inspector_ops(info), self.precision.upper(), "TensorRT engine inspector")

    def close(self) -> None:
        self.cuda.free(self.d_in)
        self.cuda.free(self.d_out)
        self.h_in = self.h_out = None  # views of pinned memory: drop them before it is freed
        if self.cuda.cudart:
            self.cuda.free_host()
            self.cuda.cudart.cudaStreamDestroy(self.stream)


class TensorRtBackend(Backend):
    name = "tensorrt"
    formats = ("plan",)
    modules = ("tensorrt",)
    install = "JetPack ships TensorRT; plus pip install cuda-python (or pycuda)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = super().unavailable_reason()
        if reason is None and not (has_module("cuda") or has_module("pycuda")):
            reason = "tensorrt is installed but neither cuda-python nor pycuda is (pip install cuda-python)"
        return reason

    def load(self, model_entry, path, threads, batch, options):
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EdgeMSDError(
                f"{path}: TensorRT could not deserialize the engine (built with another "
                "TensorRT version or GPU? rebuild it here with `edge-msd build-engine`)"
            )
        return TensorRtSession(trt, engine, batch, path, str(model_entry.get("precision") or "fp32"))
