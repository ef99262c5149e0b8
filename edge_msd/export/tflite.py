"""LiteRT / TFLite through litert-torch (no TensorFlow): fp32 or fp16 weights; int8 is shipped.

int8 models come from ``edge_msd.quant``'s PT2E recipe (QAT, or PTQ on a calibration set). They take
and return int8 tensors: the manifest records each int8 tensor's (scale, zero point), and the runner
(and the device) quantize inputs / dequantize outputs with them. Token inputs stay int32.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_msd.config import TargetProfile
from edge_msd.errors import ConfigError
from edge_msd.export.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    Exporter,
    ExportRequest,
    Runner,
    check_static_float,
    example_inputs,
    io_entry,
    run_batched,
    tower_module,
)

NP_DTYPES = {np.float32: "float32", np.int8: "int8", np.int32: "int32", np.uint8: "uint8",
             np.float16: "float16"}


def _convert(module: torch.nn.Module, example: np.ndarray, precision: str, path: Path) -> None:
    import litert_torch

    kwargs = {}
    if precision == "fp16":
        from litert_torch.generative.quantize.quant_recipes import full_fp16_recipe

        kwargs["quant_config"] = full_fp16_recipe()
    logging.getLogger("absl").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            edge = litert_torch.convert(module, (torch.from_numpy(example),), **kwargs)
        except Exception as e:  # the converter raises many types; its first line names the op
            raise ConfigError(f"TFLite conversion of {type(module).__name__} ({precision}) failed: "
                              f"{str(e).strip().splitlines()[0][:300]}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(path))


def interpreter(path: Path, threads: int = 1) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    return interp


def tflite_io(path: Path) -> tuple[list[dict], list[dict], dict]:
    """I/O entries plus each tensor's quantization (scale, zero point) when it is int8."""
    interp = interpreter(path)
    quant = {}

    def entry(d: dict, name: str, layout: str | None = None) -> dict:
        scale, zp = d["quantization"]
        if scale:
            quant[name] = {"scale": float(scale), "zero_point": int(zp)}
        return io_entry(name, list(d["shape"]), NP_DTYPES.get(d["dtype"], str(d["dtype"])), layout)

    ins = interp.get_input_details()
    outs = interp.get_output_details()
    inputs = [entry(d, d["name"], "NCHW" if len(d["shape"]) == 4 else None) for d in ins]
    return inputs, [entry(d, d["name"]) for d in outs], quant


def run_tflite(path: Path, x: np.ndarray, interp: Any = None) -> np.ndarray:
    """Run a .tflite over any number of rows at its static batch; int8 I/O is quantized with each
    tensor's (scale, zero point), ``q = round(x / scale) + zero_point``, and dequantized back."""
    interp = interp or interpreter(path)
    i_det, o_det = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(chunk: np.ndarray) -> np.ndarray:
        if np.dtype(i_det["dtype"]) == np.int8:
            scale, zp = i_det["quantization"]
            chunk = np.clip(np.round(chunk / scale) + zp, -128, 127)
        interp.set_tensor(i_det["index"], chunk.astype(i_det["dtype"]))
        interp.invoke()
        y = interp.get_tensor(o_det["index"])
        if np.dtype(o_det["dtype"]) == np.int8:
            scale, zp = o_det["quantization"]
            return (y.astype(np.float32) - zp) * np.float32(scale)
        return y.astype(np.float32)

    return run_batched(run, x, int(i_det["shape"][0]))


def tflite_runner(path: Path, threads: int = 1) -> Runner:
    interp = interpreter(path, threads)
    return lambda x: run_tflite(path, x, interp)


class TFLiteExporter(Exporter):
    kind = "tflite"
    format = "tflite"
    ext = "tflite"

    def check(self, req: ExportRequest) -> None:
        check_static_float(req, self.kind)

    def write(self, req: ExportRequest, tower: str, path: Path) -> None:
        example = example_inputs(req.student, req.profile.batch_sizes[0])[tower]
        _convert(tower_module(req.student, tower), example, req.precision, path)

    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        inputs, outputs, quant = tflite_io(folder / rel)
        # litert names I/O after the signature (args_0, output_0); keep them, note the roles
        return {"file": rel, "format": self.format, "precision": precision, "inputs": inputs,
                "outputs": outputs, "quantization": quant,
                "roles": {inputs[0]["name"]: INPUT_NAMES[tower], outputs[0]["name"]: OUTPUT_NAME}}

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        return tflite_runner(bundle_dir / entry["file"])
