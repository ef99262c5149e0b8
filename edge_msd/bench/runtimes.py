"""One small runtime interface and its backends: ONNX Runtime, LiteRT/TFLite, TensorRT, Core ML.

A backend ``load``s one tower's model into a ``Session``. ``session.prepare(x)`` turns a numpy batch
into what the runtime consumes (dtype, int8 quantization, contiguity) outside the timed region;
``session.run(feed)`` is the timed call and returns the float32 embedding (dequantized, on the host).
Each runtime module is imported only when its backend is used: the benchmark binary needs nothing
beyond numpy and the one runtime the device has.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.errors import ConfigError, EdgeMSDError

_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "int8": np.int8,
    "uint8": np.uint8,
}


class RuntimeMissing(EdgeMSDError):
    """The runtime's Python module (or the OS it needs) is not on this machine."""


class Session:
    """One loaded model. Subclasses set ``input_dtype`` and implement ``_run``."""

    input_dtype: Any = np.float32

    def prepare(self, x: np.ndarray) -> Any:
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def run(self, feed: Any) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Free what the runtime holds (device buffers, streams); a no-op where Python's GC suffices."""


class Backend:
    name = ""
    formats: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # any one of these is the runtime
    install = ""

    @classmethod
    def module_name(cls) -> str | None:
        return next((m for m in cls.modules if _has_module(m)), None)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else why not (in words a user can act on)."""
        if cls.module_name() is None:
            return f"{' / '.join(cls.modules)} not installed ({cls.install})"
        return None

    @classmethod
    def version(cls) -> str:
        mod = cls.module_name()
        if mod is None:
            return "not installed"
        return str(getattr(importlib.import_module(mod), "__version__", "unknown"))

    def load(
        self,
        model_entry: dict[str, Any],
        path: Path,
        threads: int | None,
        batch: int,
        options: dict[str, Any],
    ) -> Session:
        raise NotImplementedError


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def _declared_dtype(model_entry: dict[str, Any], default: Any) -> Any:
    inputs = model_entry.get("inputs") or [{}]
    return _NP_DTYPES.get(str(inputs[0].get("dtype", "")), default)


def _batch_shape(shape: list[int], batch: int) -> tuple[int, ...]:
    return (batch, *[int(d) for d in shape[1:]])


# ---- ONNX Runtime --------------------------------------------------------------------------

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


class OrtSession(Session):
    def __init__(self, sess: Any, providers: list[str], threads: int | None, dtype: Any):
        self.sess = sess
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
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        in_type = sess.get_inputs()[0].type  # e.g. "tensor(float)"
        dtype = {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(int32)": np.int32,
            "tensor(int64)": np.int64,
            "tensor(int8)": np.int8,
            "tensor(uint8)": np.uint8,
        }.get(in_type, _declared_dtype(model_entry, np.float32))
        return OrtSession(sess, providers, threads, dtype)


# ---- LiteRT / TFLite -----------------------------------------------------------------------


def _quant_params(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


class LiteRtSession(Session):
    def __init__(self, interp: Any, module: str, threads: int | None, xnnpack: bool):
        self.interp = interp
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
            info = np.iinfo(dtype)
            q = np.round(np.asarray(x, np.float32) / self.in_scale) + self.in_zero
            return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dtype))
        return np.ascontiguousarray(x, dtype=dtype)

    def run(self, feed: np.ndarray) -> np.ndarray:
        self.interp.set_tensor(self.inp["index"], feed)
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out_scale > 0 and y.dtype.kind in "iu":
            return (y.astype(np.float32) - self.out_zero) * self.out_scale
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
            from importlib.metadata import PackageNotFoundError, version

            try:
                return version("ai-edge-litert")
            except PackageNotFoundError:
                return "unknown"
        return super().version()

    def load(self, model_entry, path, threads, batch, options):
        mod = self.module_name()
        if mod == "ai_edge_litert":
            from ai_edge_litert import interpreter as tfl
        elif mod == "tflite_runtime":
            from tflite_runtime import interpreter as tfl
        else:
            import tensorflow.lite as tfl  # type: ignore[no-redef]
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
        return LiteRtSession(interp, mod, threads, xnnpack)


# ---- TensorRT (Jetson) ---------------------------------------------------------------------


class _Cuda:
    """The few CUDA calls the TensorRT session needs, through cuda-python or pycuda."""

    def __init__(self) -> None:
        if _has_module("cuda.bindings"):
            from cuda.bindings import runtime as cudart
        elif _has_module("cuda.cudart"):
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


class TensorRtSession(Session):
    """Engine + execution context + one CUDA stream; run = H2D, enqueue, D2H, sync (as trtexec times it)."""

    def __init__(self, trt: Any, engine: Any, batch: int, plan: Path):
        self.cuda = _Cuda()
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
            self.ctx.set_input_shape(self.in_name, _batch_shape(in_shape, batch))
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
        if reason is None and not (_has_module("cuda") or _has_module("pycuda")):
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
        return TensorRtSession(trt, engine, batch, path)


# ---- Core ML (macOS) -----------------------------------------------------------------------


class CoreMlSession(Session):
    def __init__(self, model: Any, compute_units: str, dtype: Any):
        self.model = model
        spec = model.get_spec().description
        self.in_name = spec.input[0].name
        self.out_name = spec.output[0].name
        self.compute_units = compute_units
        self.input_dtype = dtype

    def prepare(self, x: np.ndarray) -> Any:
        return {self.in_name: np.ascontiguousarray(x, dtype=self.input_dtype)}

    def run(self, feed: Any) -> np.ndarray:
        return np.asarray(self.model.predict(feed)[self.out_name], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"compute_units": self.compute_units}


class CoreMlBackend(Backend):
    name = "coreml"
    formats = ("mlpackage",)
    modules = ("coremltools",)
    install = "pip install coremltools (macOS)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform != "darwin":
            return f"Core ML predictions run only on macOS (this is {platform.system()})"
        return super().unavailable_reason()

    def load(self, model_entry, path, threads, batch, options):
        import coremltools as ct

        units = str(options.get("compute_units") or "all").upper()
        if units not in ct.ComputeUnit.__members__:
            raise ConfigError(
                f"unknown Core ML compute units {units.lower()!r}; known: "
                f"{', '.join(m.lower() for m in ct.ComputeUnit.__members__)}"
            )
        model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[units])
        return CoreMlSession(model, units.lower(), _declared_dtype(model_entry, np.float32))


# ---- selection -----------------------------------------------------------------------------

# Preference for `auto`: the device's native runtime first, the generic one last.
BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (TensorRtBackend, CoreMlBackend, LiteRtBackend, OnnxRuntimeBackend)
}
ALIASES = {
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
    "tflite": "litert",
    "trt": "tensorrt",
    "coremltools": "coreml",
}


def installed_runtimes() -> dict[str, str]:
    """name → version of the runtimes that can run here."""
    return {n: b.version() for n, b in BACKENDS.items() if b.unavailable_reason() is None}


def _installed_text() -> str:
    inst = installed_runtimes()
    return ", ".join(f"{n} {v}" for n, v in inst.items()) or "none"


def model_files(bundle_root: Path, models: dict[str, dict[str, Any]], engine_dir: Path | None) -> dict:
    """tower → {format: path} of what exists: the bundle's model, and a TensorRT engine if one was built."""
    out: dict[str, dict[str, Path]] = {}
    for tower, entry in models.items():
        path = bundle_root / entry["file"]
        fmt = entry.get("format") or path.suffix.lstrip(".")
        found = {fmt: path}
        # `edge-msd build-engine` writes the manifest's engine file (models/<tower>.plan) on the device
        engine = (entry.get("engine") or {}).get("file")
        candidates = [engine_dir / f"{tower}.plan"] if engine_dir is not None else []
        candidates += [bundle_root / engine] if engine else []
        candidates += [path.parent / f"{tower}.plan"]
        plan = next((c for c in candidates if c.is_file()), None)
        if plan is not None:
            found["plan"] = plan
        out[tower] = found
    return out


def select_backend(requested: str, files: dict[str, dict[str, Path]]) -> type[Backend]:
    """The backend to use for every tower, with an error that says what is installed and what would work."""
    requested = ALIASES.get(requested.lower(), requested.lower())
    formats = {t: sorted(f) for t, f in files.items()}
    have = "; ".join(f"{t}: {', '.join(f)}" for t, f in formats.items())
    if requested != "auto":
        if requested not in BACKENDS:
            raise ConfigError(f"unknown runtime {requested!r}; known: auto, {', '.join(BACKENDS)}")
        backend = BACKENDS[requested]
        lacking = [t for t, f in formats.items() if not set(backend.formats) & set(f)]
        if lacking:
            hint = (
                " (build the engine on the device: edge-msd build-engine)"
                if backend is TensorRtBackend
                else ""
            )
            raise ConfigError(
                f"runtime {requested} runs {', '.join(backend.formats)} models, but this bundle "
                f"has {have}{hint}. {_alternatives(formats)}"
            )
        reason = backend.unavailable_reason()
        if reason:
            raise RuntimeMissing(
                f"runtime {requested} cannot run here: {reason}. "
                f"Installed: {_installed_text()}. {_alternatives(formats)}"
            )
        return backend
    for backend in BACKENDS.values():
        if backend.unavailable_reason() is None and all(
            set(backend.formats) & set(f) for f in formats.values()
        ):
            return backend
    raise RuntimeMissing(
        f"no runtime installed here can run this bundle's models ({have}). "
        f"Installed: {_installed_text()}. {_alternatives(formats)}"
    )


def _alternatives(formats: dict[str, list[str]]) -> str:
    needed = set().union(*formats.values()) if formats else set()
    lines = []
    for b in BACKENDS.values():
        if set(b.formats) & needed:
            state = b.unavailable_reason() or "installed"
            lines.append(f"{b.name} ({state})")
    fits = f"Runtimes for these models: {', '.join(lines)}." if lines else ""
    return (
        fits + " Or export a bundle for this device: edge-msd export --target onnx|tflite|coreml|jetson"
    ).strip()
