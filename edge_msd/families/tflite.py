"""LiteRT / TFLite through litert-torch (no TensorFlow): fp32 or fp16 weights, or int8.

int8 models come from the PT2E recipe below (torchao PT2E with litert-torch's quantizer: static int8,
weights per channel, activations per tensor; dynamic-range as fallback), by QAT or PTQ on a
calibration set. They take and return int8 tensors: the manifest records each int8 tensor's (scale,
zero point), and the runner (and the device) quantize inputs / dequantize outputs with them. Token
inputs stay int32. The residual adds are int8 too (litert-torch's add annotator, once the adds carry
the tag it looks for: ``tag_adds``); muls whose neighbours are float stay float (``float_mul``: the
attention's query scale, the text pooling's token mask), and so does the final L2 norm. The text
tower's token-embedding table is int8 per row (``Int8Embedding``). The image tower takes NHWC images,
LiteRT's own layout (``ChannelsLast``): an NCHW input costs a TRANSPOSE before the first conv, in int8
about 8% of the image tower's time. The graph check lists the ops the XNNPACK delegate leaves to the
interpreter.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_msd.contract.numerics import dequantize, quantize, run_batched
from edge_msd.delegation import DELEGATE_OP, executed_ops
from edge_msd.errors import ConfigError, QuantError
from edge_msd.families.common.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    ExportRequest,
    Family,
    Runner,
    export_tower,
    io_entry,
)
from edge_msd.families.common.fused_input import FusedImageInput
from edge_msd.families.common.pt2e import (
    PT2EQuantizer,
    converted,
    finite_inputs,
    float_mul,
    keep_float_filter,
    tag_adds,
)
from edge_msd.families.common.quantizer import first_line, io_entries, quiet
from edge_msd.families.declarations import DECLARATIONS

if TYPE_CHECKING:
    from edge_msd.targets import TargetProfile

NP_DTYPES = {np.float32: "float32", np.int8: "int8", np.int32: "int32", np.uint8: "uint8",
             np.float16: "float16"}


class ChannelsLast(nn.Module):
    """An image tower that takes NHWC images and hands them to ``tower`` as NCHW."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tower(image.permute(0, 3, 1, 2))


def channels_last(module: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``module`` and its example as converted: image towers (4-D input) NHWC, text towers and the fused
    uint8 input (NHWC already) unchanged."""
    if example.ndim != 4 or isinstance(module, FusedImageInput):
        return module, example
    return ChannelsLast(module), example.permute(0, 2, 3, 1).contiguous()


def convert_float(module: torch.nn.Module, example: np.ndarray, precision: str, path: Path) -> None:
    """Write ``module`` as an fp32 (or fp16-weight) .tflite, an image tower NHWC. A copy is converted:
    litert-torch rewrites ±inf in the module's buffers in place (the causal mask becomes ±3.4e38),
    which the caller's tower must not see (a later int8 recipe would quantize that mask)."""
    import litert_torch

    kwargs = {}
    if precision == "fp16":
        from litert_torch.generative.quantize.quant_recipes import full_fp16_recipe

        kwargs["quant_config"] = full_fp16_recipe()
    logging.getLogger("absl").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, x = channels_last(copy.deepcopy(module), torch.from_numpy(example))
            edge = litert_torch.convert(model, (x,), **kwargs)
        except Exception as e:  # the converter raises many types; its first line names the op
            raise ConfigError(f"TFLite conversion of {type(module).__name__} ({precision}) failed: "
                              f"{str(e).strip().splitlines()[0][:300]}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(path))


def interpreter(path: Path, threads: int = 1) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ai_edge_litert.interpreter import Interpreter

    with quiet():  # LiteRT logs its delegate's creation from C++
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
    inputs = [entry(d, d["name"], "NHWC" if len(d["shape"]) == 4 else None) for d in ins]
    return inputs, [entry(d, d["name"]) for d in outs], quant


def model_input(detail: dict, x: np.ndarray) -> np.ndarray:
    """``x`` (images NCHW, as the torch towers take them) in the layout and dtype of the input ``detail``
    describes: NHWC images; int8 with its (scale, zero point)."""
    if x.ndim == 4 and list(detail["shape"][1:]) == [x.shape[2], x.shape[3], x.shape[1]]:
        x = x.transpose(0, 2, 3, 1)
    if np.dtype(detail["dtype"]) == np.int8:
        x = quantize(x, *detail["quantization"])
    return x.astype(detail["dtype"])


def run_tflite(path: Path, x: np.ndarray, interp: Any = None) -> np.ndarray:
    """Run a .tflite over any number of rows at its static batch; int8 I/O is quantized with each
    tensor's (scale, zero point), ``q = round(x / scale) + zero_point``, and dequantized back."""
    interp = interp or interpreter(path)
    i_det, o_det = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(chunk: np.ndarray) -> np.ndarray:
        interp.set_tensor(i_det["index"], model_input(i_det, chunk))
        interp.invoke()
        y = interp.get_tensor(o_det["index"])
        if np.dtype(o_det["dtype"]) == np.int8:
            return dequantize(y, *o_det["quantization"])
        return y.astype(np.float32)

    return run_batched(run, x, int(i_det["shape"][0]))


def tflite_runner(path: Path, threads: int = 1) -> Runner:
    interp = interpreter(path, threads)
    return lambda x: run_tflite(path, x, interp)



class LiteRTQuantizer(PT2EQuantizer):
    suffix = ".tflite"
    runtime = "litert"

    def pt2e_quantizer(self, dynamic: bool, qat: bool, keep_float: tuple[str, ...]) -> Any:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

        class _Quantizer(PT2EQuantizer):
            """litert-torch's quantizer, except that nodes inside ``keep_float`` modules, adds of an
            infinite constant (the causal mask) and muls whose neighbours are float (``float_mul``) stay
            float, and that residual adds are found."""

            # litert-torch 0.10's conv+BN QAT pattern export fails under torch 2.14 (it torch.export()s a
            # plain function); BN is folded into the convs before annotation instead (PT2EQuantizer).
            STATIC_QAT_ONLY_OPS: list[str] = []

            def _annotate_all_static_patterns(self, model, quantization_config, filter_fn=None):  # noqa: ANN001
                tag_adds(model)
                keep = keep_float_filter(
                    keep_float, lambda n: finite_inputs(n) and not float_mul(n) and (filter_fn or bool)(n)
                )
                return super()._annotate_all_static_patterns(model, quantization_config, keep)

            def _annotate_all_dynamic_patterns(self, model, quantization_config, filter_fn=None):  # noqa: ANN001
                keep = keep_float_filter(keep_float, filter_fn)
                return super()._annotate_all_dynamic_patterns(model, quantization_config, keep)

        return _Quantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, is_dynamic=dynamic)
        )

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        meta = prepared.meta["edge_msd"]
        try:
            with torch.no_grad(), quiet():
                model = converted(prepared)
                out_dim = int(model(example).shape[-1])
                model, example = channels_last(model, example)
                edge = litert_torch.convert(
                    model, (example,), quant_config=QuantConfig(pt2e_quantizer=meta["quantizer"])
                )
                edge.export(str(path))
        except Exception as e:
            raise QuantError(f"{path.name}: LiteRT int8 conversion failed: {first_line(e)}") from e
        kind = "dynamic-range" if meta["dynamic"] else "full-integer"
        io_ = io_entries(example, out_dim, int(example.shape[0]))
        io_["inputs"][0].update(self._written_input(path))
        return {"format": "tflite", "precision": "int8", "quantization": kind, **io_}

    @staticmethod
    def _written_input(path: Path) -> dict[str, Any]:
        """What the written model says of its input, as bundles record it (``tflite_io``): its layout, and
        an int8 input's dtype and (scale, zero point) for the runtime."""
        inputs, _, quant = tflite_io(path)
        first = inputs[0]
        out = {"layout": first["layout"]} if "layout" in first else {}
        if first["dtype"] == "int8":
            out |= {"dtype": "int8", "quantization": quant[first["name"]]}
        return out

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        return run_tflite(path, x)


def litert_leftovers(model: Path) -> dict[str, Any]:
    """Ops count and the op types XNNPACK leaves to the interpreter, for one .tflite model."""
    from ai_edge_litert import interpreter as tfl

    with quiet():
        interp = tfl.Interpreter(model_path=str(model), num_threads=1)
        interp.allocate_tensors()
    ops = interp._get_ops_details()
    ran = executed_ops(ops, [d["index"] for d in interp.get_output_details()])
    left = collections.Counter(o["op_name"] for o in ops if o["index"] in ran)
    return {"ops": sum(o["op_name"] != DELEGATE_OP for o in ops), "not_delegated": dict(left.most_common())}


class TFLiteFamily(Family):
    declaration = DECLARATIONS["tflite"]
    format = "tflite"
    ext = "tflite"
    quantizer = LiteRTQuantizer
    fused_input = True  # the float model takes uint8 NHWC; litert-torch keeps the cast (CAST → MUL → ADD)

    def write(self, req: ExportRequest, tower: str, path: Path) -> None:
        convert_float(*export_tower(req, tower, req.profile.batch_sizes[0]), req.precision, path)

    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        inputs, outputs, quant = tflite_io(folder / rel)
        # litert names I/O after the signature (args_0, output_0); keep them, note the roles
        return {"file": rel, "format": self.format, "precision": precision, "inputs": inputs,
                "outputs": outputs, "quantization": quant,
                "roles": {inputs[0]["name"]: INPUT_NAMES[tower], outputs[0]["name"]: OUTPUT_NAME}}

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        return tflite_runner(bundle_dir / entry["file"])

    def check_graph(self, profile: TargetProfile, models: dict[str, dict], folder: Path, warn: Any) -> dict:
        """XNNPACK decides per op when the interpreter is built, the same way on the host as on the phone
        for the same LiteRT version: build one here and list what it leaves to the interpreter."""
        try:
            runtime = f"ai-edge-litert {version('ai-edge-litert')}"
        except PackageNotFoundError:
            return {"skipped": "ai-edge-litert is not installed here (pip install ai-edge-litert)"}
        out: dict[str, Any] = {"delegate": "XNNPACK", "checked_with": runtime}
        for tower, entry in models.items():
            found = out[tower] = litert_leftovers(folder / entry["file"])
            left = found["not_delegated"]
            if left:
                ops = ", ".join(f"{op}×{n}" for op, n in left.items())
                warn(
                    f"{profile.name} {tower} tower: XNNPACK ({runtime}) leaves {sum(left.values())} of "
                    f"{found['ops']} ops to the interpreter's own kernels: {ops}"
                )
        return out


FAMILY = TFLiteFamily()
