"""Core ML on macOS: an .mlpackage per tower, on the compute units the user asks for."""

from __future__ import annotations

import platform
import sys
from typing import Any

import numpy as np

from edge_msd.bench.placement import Op, summarise, unavailable
from edge_msd.bench.runtimes.base import Backend, Session, declared_dtype
from edge_msd.errors import ConfigError

_DEVICES = {"MLCPUComputeDevice": "CPU", "MLGPUComputeDevice": "GPU", "MLNeuralEngineComputeDevice": "ANE"}


class CoreMlSession(Session):
    def __init__(self, model: Any, compute_units: str, dtype: Any):
        self.model = model
        spec = model.get_spec().description
        self.in_name = spec.input[0].name
        self.out_name = spec.output[0].name
        self.image = spec.input[0].type.WhichOneof("Type") == "imageType"  # the fused uint8 frame input
        self.compute_units = compute_units
        self.input_dtype = dtype

    def prepare(self, x: np.ndarray) -> Any:
        if self.image:  # coremltools predicts an ImageType from a PIL image, one frame per call
            from PIL import Image

            if x.dtype != np.uint8 or x.shape[0] != 1:
                raise ConfigError(f"Core ML image input {self.in_name!r} takes one uint8 RGB frame, "
                                  f"not {x.dtype} {tuple(x.shape)}")
            return {self.in_name: Image.fromarray(x[0], "RGB")}
        return {self.in_name: np.ascontiguousarray(x, dtype=self.input_dtype)}

    def run(self, feed: Any) -> np.ndarray:
        return np.asarray(self.model.predict(feed)[self.out_name], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"compute_units": self.compute_units}

    def placement(self, feed: Any, calls: int) -> dict[str, Any]:
        """Per-op preferred compute device and estimated cost from MLComputePlan (macOS 14.4+,
        coremltools 8+); a model of flexible shapes that Core ML sends to the CPU shows up here."""
        import coremltools as ct

        try:
            from coremltools.models.compute_plan import MLComputePlan
        except ImportError:
            return unavailable(f"coremltools {ct.__version__} has no MLComputePlan (needs 8.0+)")
        plan = MLComputePlan.load_from_path(
            path=self.model.get_compiled_model_path(),
            compute_units=ct.ComputeUnit[self.compute_units.upper()],
        )
        ops = []
        for op in plan.model_structure.program.functions["main"].block.operations:
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            device = type(usage.preferred_compute_device).__name__ if usage else "unknown"
            cost = plan.get_estimated_cost_for_mlprogram_operation(op)
            ops.append(
                Op(
                    op.operator_name,
                    op.operator_name,
                    _DEVICES.get(device, device),
                    cost.weight if cost else None,
                )
            )
        accelerator = "ANE" if self.compute_units in ("all", "cpu_and_ne") else "GPU"
        if self.compute_units == "cpu_only":
            accelerator = "CPU"
        return summarise(ops, accelerator, "Core ML MLComputePlan", cost_unit="relative cost")


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
        return CoreMlSession(model, units.lower(), declared_dtype(model_entry, np.float32))
