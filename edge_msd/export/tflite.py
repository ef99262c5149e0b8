"""LiteRT / TFLite through litert-torch (no TensorFlow): fp32, fp16 weights, or int8 (PT2E).

int8 without a QAT student is post-training: PT2E static per-channel symmetric quantization
calibrated on real images/captions (toolchain.md). The int8 image model takes and returns int8
tensors: the runner (and the device) quantize/dequantize with each tensor's (scale, zero point).
Token inputs stay int32.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from edge_msd.errors import ConfigError
from edge_msd.export.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    TOWERS,
    Exporter,
    ExportRequest,
    Runner,
    example_inputs,
    io_entry,
    run_batched,
    tower_module,
)

NP_DTYPES = {np.float32: "float32", np.int8: "int8", np.int32: "int32", np.uint8: "uint8",
             np.float16: "float16"}


def _convert(module: torch.nn.Module, example: np.ndarray, precision: str, calib: np.ndarray | None,
             path: Path, quantized: bool) -> None:
    import litert_torch

    x = torch.from_numpy(example)
    kwargs = {}
    if precision == "fp16":
        from litert_torch.generative.quantize.quant_recipes import full_fp16_recipe

        kwargs["quant_config"] = full_fp16_recipe()
    elif precision == "int8" and not quantized:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                 is_dynamic=False))
        prepared = prepare_pt2e(torch.export.export(module, (x,)).module(), quantizer)
        with torch.no_grad():  # the exported module is specialised to the example's batch size
            for s in range(0, len(calib) - len(x) + 1, len(x)):
                prepared(torch.from_numpy(calib[s : s + len(x)]))
        module = convert_pt2e(prepared, fold_quantize=False)
        kwargs["quant_config"] = QuantConfig(pt2e_quantizer=quantizer)
    logging.getLogger("absl").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            edge = litert_torch.convert(module, (x,), **kwargs)
        except Exception as e:  # the converter raises many types; its first line names the op
            raise ConfigError(f"TFLite conversion of {type(module).__name__} ({precision}) failed: "
                              f"{str(e).strip().splitlines()[0][:300]}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(path))


def interpreter(path: Path, threads: int = 1):
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


def tflite_runner(path: Path, threads: int = 1) -> Runner:
    interp = interpreter(path, threads)
    i_det, o_det = interp.get_input_details()[0], interp.get_output_details()[0]
    batch = int(i_det["shape"][0])

    def run(x: np.ndarray) -> np.ndarray:
        scale, zp = i_det["quantization"]
        if i_det["dtype"] == np.int8:
            x = np.clip(np.round(x / scale + zp), -128, 127)
        interp.set_tensor(i_det["index"], x.astype(i_det["dtype"]))
        interp.invoke()
        y = interp.get_tensor(o_det["index"])
        scale, zp = o_det["quantization"]
        return (y.astype(np.float32) - zp) * scale if o_det["dtype"] == np.int8 else y.astype(np.float32)

    return lambda x: run_batched(run, x, batch)


class TFLiteExporter(Exporter):
    kind = "tflite"
    format = "tflite"
    ext = "tflite"

    def export(self, req: ExportRequest, out_dir: Path) -> dict[str, dict]:
        if req.profile.dynamic_batch:
            raise ConfigError(f"{req.profile.source}: dynamic_batch is not supported by tflite; set false")
        if req.precision == "int8" and not req.quantized and req.calibration is None:
            raise ConfigError(f"target {req.profile.name} int8: needs a QAT student or a calibration set")
        batch = req.profile.batch_sizes[0]
        examples = example_inputs(req.student, batch)
        calib = {"image": req.calibration.images, "text": req.calibration.tokens} if req.calibration else {}
        entries = {}
        for tower in TOWERS:
            rel = f"models/{tower}.{self.ext}"
            _convert(tower_module(req.student, tower), examples[tower], req.precision, calib.get(tower),
                     out_dir / rel, req.quantized)
            inputs, outputs, quant = tflite_io(out_dir / rel)
            # litert names I/O after the signature (args_0, output_0); keep them, note the roles
            entries[tower] = {"file": rel, "format": self.format, "precision": req.precision,
                              "inputs": inputs, "outputs": outputs, "quantization": quant,
                              "roles": {inputs[0]["name"]: INPUT_NAMES[tower],
                                        outputs[0]["name"]: OUTPUT_NAME}}
        return entries

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        return tflite_runner(bundle_dir / entry["file"])
