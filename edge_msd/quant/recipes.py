"""Per-target int8 recipes: how each target's toolchain wants a tower quantized, and its file format.

=========  =========================================  ===================================================
exporter   backend                                    ships
=========  =========================================  ===================================================
tensorrt   nvidia-modelopt fake quant: int8 symmetric  ONNX with QuantizeLinear/DequantizeLinear pairs
           weights per output channel, activations     (TensorRT explicit quantization), exported with
           per tensor (max calibration)                the TorchScript exporter (dynamo cannot trace it)
coreml     coremltools.optimize.torch LinearQuantizer  .mlpackage (ML Program, iOS 17); size options:
           (W8A8, symmetric, per-channel weights)      weight-only int8, k-means palettization
tflite     torchao PT2E with litert-torch's quantizer  full-integer .tflite (int8 weights per channel,
           (static int8; dynamic-range as fallback)    int8 activations), run by the LiteRT interpreter
=========  =========================================  ===================================================

Each tower (image, text) is quantized on its own: ``backend.quantize(tower, batches, qat=...)`` gives a
fake-quant torch module (trainable for QAT), ``backend.write(prepared, example, path)`` the target file,
``backend.run(path, x)`` runs that file with the target's runtime where one exists on this machine.
A target profile tunes its recipe in an ``[options.quant]`` table (fields of ``Recipe``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import io
import os
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_msd.errors import ConfigError, EdgeMSDError
from edge_msd.export.tflite import interpreter, run_tflite
from edge_msd.export.towers import explicit_attention


class QuantError(EdgeMSDError):
    """A tower cannot be quantized or converted by the target's toolchain (names the op or layer)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one target quantizes; defaults per exporter below, overridable from ``[options.quant]``."""

    name: str
    exporter: str
    backend: str  # pt2e | modelopt | coreml
    scheme: str  # one line for reports and manifests
    keep_float: tuple[str, ...] = ()  # module-name patterns (fnmatch, relative to the tower) left in float
    keep_first_last: bool = False  # keep each tower's first and last quantized layer in float
    sensitivity_scan: bool = False  # choose up to scan_max_layers more float layers by leave-one-out
    scan_max_layers: int = 2
    scan_min_gain: float = 1e-3  # mean cosine a layer must give back to be kept in float
    size_option: str = "w8a8"  # coreml: w8a8 | weight-int8 | palettize-<n>bit
    allow_fallback: bool = False  # tflite: a tower whose full-int8 conversion fails ships dynamic-range
    qat_observer_freeze: float = 0.5  # fraction of QAT steps after which quantization ranges are frozen
    qat_bn_freeze: float = 0.7  # fraction of QAT steps after which BatchNorm statistics are frozen

    def to_manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_RECIPES: dict[str, Recipe] = {
    "tensorrt": Recipe(
        name="tensorrt-int8-qdq",
        exporter="tensorrt",
        backend="modelopt",
        scheme="int8 symmetric; weights per-channel, activations per-tensor (max); explicit Q/DQ ONNX",
        keep_first_last=True,
        sensitivity_scan=True,
    ),
    "coreml": Recipe(
        name="coreml-w8a8",
        exporter="coreml",
        backend="coreml",
        scheme="LinearQuantizer W8A8 symmetric; weights per-channel int8, activations uint8",
    ),
    "tflite": Recipe(
        name="tflite-int8-pt2e",
        exporter="tflite",
        backend="pt2e",
        scheme="PT2E full-integer int8; weights per-channel symmetric, activations per-tensor (histogram)",
    ),
}


def recipe_for_target(target: Any) -> Recipe:
    """The recipe of a target profile (``TargetProfile`` or name); no int8 recipe → ConfigError."""
    from edge_msd.config import load_target

    profile = load_target(target) if isinstance(target, str | Path) else target
    base = DEFAULT_RECIPES.get(profile.exporter)
    if base is None:
        with_recipe = ", ".join(sorted(DEFAULT_RECIPES))
        raise ConfigError(
            f"target {profile.name!r} (exporter {profile.exporter!r}) has no int8 quantization "
            f"recipe; exporters with one: {with_recipe}"
        )
    overrides = dict(profile.options.get("quant", {}))
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "exporter", "backend", "scheme"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"{profile.source or profile.name}: [options.quant] unknown field(s) "
            f"{', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if "keep_float" in overrides:
        overrides["keep_float"] = tuple(overrides["keep_float"])
    recipe = dataclasses.replace(base, **overrides)
    if recipe.backend == "coreml" and not (
        recipe.size_option in ("w8a8", "weight-int8") or _palette_bits(recipe.size_option)
    ):
        raise ConfigError(
            f"{profile.source or profile.name}: [options.quant] size_option "
            f"{recipe.size_option!r}; expected w8a8, weight-int8 or palettize-<1..8>bit"
        )
    return recipe


def _palette_bits(option: str) -> int | None:
    if option.startswith("palettize-") and option.endswith("bit"):
        bits = option[len("palettize-") : -len("bit")]
        if bits.isdigit() and 1 <= int(bits) <= 8:
            return int(bits)
    return None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the converters' progress chatter on stdout (errors still raise)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def cosine_to(reference: torch.Tensor, out: torch.Tensor) -> float:
    """Mean row cosine between two embedding batches."""
    return float(nn.functional.cosine_similarity(out.float(), reference.float(), dim=-1).mean())


class Backend:
    """One toolchain: fake-quantize a tower, write the target file, run it where a runtime exists."""

    suffix = ""
    runtime: str | None = None  # the runtime ``run`` uses; None: only the fake-quant torch model runs here

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def quantize(
        self,
        tower: nn.Module,
        batches: list[torch.Tensor],
        *,
        qat: bool = False,
        keep_float: Iterable[str] = (),
    ) -> nn.Module:
        """A fake-quant copy of ``tower`` calibrated on ``batches``; trainable when ``qat``."""
        raise NotImplementedError

    def simulate(self, prepared: nn.Module) -> nn.Module:
        """A module computing what the deployed int8 model computes (the fake-quant model itself)."""
        return prepared

    def layers(self, prepared: nn.Module) -> list[str]:
        """Names of the quantized layers (module paths in the tower)."""
        raise NotImplementedError

    def freeze_observers(self, prepared: nn.Module) -> None:
        raise NotImplementedError

    def freeze_bn(self, prepared: nn.Module) -> None:
        raise NotImplementedError

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        """Write the deployable file; returns its manifest entry (format, precision, io)."""
        raise NotImplementedError

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        raise QuantError(f"no {self.recipe.exporter} runtime on this machine to run {path}")


def _calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Run the calibration batches through ``model`` (its observers record the ranges)."""
    with torch.no_grad():
        for b in batches:
            model(b)


def _io(example: torch.Tensor, out_dim: int, batch: int | str) -> dict[str, Any]:
    """I/O entries: float32 images or int32 tokens in, a float32 embedding per row out."""
    shape_in = [batch if isinstance(batch, int) else -1, *example.shape[1:]]
    dtype_in = "float32" if example.is_floating_point() else "int32"
    return {
        "inputs": [{"shape": shape_in, "dtype": dtype_in}],
        "outputs": [{"shape": [shape_in[0], out_dim], "dtype": "float32"}],
    }


# ---- TensorRT: nvidia-modelopt → explicit Q/DQ ONNX -------------------------------------------------------
class ModeloptBackend(Backend):
    suffix = ".onnx"
    runtime = "onnxruntime"

    def _config(self, keep_float: Iterable[str]) -> dict[str, Any]:
        cfg: list[dict[str, Any]] = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
        ]
        for cls in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.Embedding", "nn.LayerNorm"):
            cfg.append({"quantizer_name": "*", "parent_class": cls, "enable": False})
        for name in keep_float:
            cfg.append({"quantizer_name": f"{name}.*", "enable": False})
        return {"quant_cfg": cfg, "algorithm": "max"}

    def quantize(
        self,
        tower: nn.Module,
        batches: list[torch.Tensor],
        *,
        qat: bool = False,
        keep_float: Iterable[str] = (),
    ) -> nn.Module:
        import modelopt.torch.quantization as mtq

        model = explicit_attention(copy.deepcopy(tower)).eval()
        patterns = [*self.recipe.keep_float, *keep_float]
        with _quiet():
            model = mtq.quantize(model, self._config(patterns), lambda m: _calibrate(m, batches))
        self._disable_unreached(model)
        # modelopt matches wildcards against quantizer names; fnmatch patterns are applied here
        for name, mod in model.named_modules():
            if _matches(name, patterns):
                for q in self._quantizers(mod):
                    q.disable()
        return model.train(qat)

    @staticmethod
    def _quantizers(mod: nn.Module) -> list[nn.Module]:
        return [
            q
            for n in ("input_quantizer", "weight_quantizer")
            if (q := getattr(mod, n, None)) is not None and hasattr(q, "disable")
        ]

    def _disable_unreached(self, model: nn.Module) -> None:
        """Quantizers that calibration never reached (e.g. nn.MultiheadAttention's out_proj, whose weight
        the fused attention reads directly) would export as dynamic-range garbage: turn them off."""
        for _, mod in model.named_modules():
            q = getattr(mod, "input_quantizer", None)
            if q is not None and getattr(q, "is_enabled", False) and getattr(q, "amax", None) is None:
                for qq in self._quantizers(mod):
                    qq.disable()

    def layers(self, prepared: nn.Module) -> list[str]:
        return [
            n
            for n, m in prepared.named_modules()
            if any(getattr(q, "is_enabled", False) for q in self._quantizers(m))
        ]

    def set_layer(self, prepared: nn.Module, name: str, enabled: bool) -> None:
        for q in self._quantizers(prepared.get_submodule(name)):
            q.enable() if enabled else q.disable()

    def freeze_observers(self, prepared: nn.Module) -> None:
        """modelopt's ranges (amax) are fixed after calibration; QAT trains the weights under them."""

    def freeze_bn(self, prepared: nn.Module) -> None:
        _freeze_bn_modules(prepared)

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        from edge_msd.export.onnx import export_onnx

        prepared = prepared.eval()
        name = "image" if example.is_floating_point() else "tokens"
        with torch.no_grad():
            out_dim = int(prepared(example).shape[-1])
        with _quiet():  # the TorchScript exporter: the dynamo one cannot trace modelopt's quantizers
            export_onnx(prepared, example.numpy(), path, name, opset=17, dynamic_batch=True, dynamo=False)
        return {
            "format": "onnx",
            "precision": "int8",
            "quantization": "explicit-qdq",
            **_io(example, out_dim, "batch"),
        }

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        from edge_msd.export.onnx import ort_runner

        return ort_runner(path, -1, threads=torch.get_num_threads())(x)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _freeze_bn_modules(model: nn.Module) -> None:
    """BatchNorm layers keep their running statistics from here on (eval mode survives model.train())."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, _m=m: _m  # type: ignore[method-assign]


# ---- TFLite: PT2E (torchao) + litert-torch -----------------------------------------------------------------
def _pt2e_quantizer(dynamic: bool, qat: bool, keep_float: tuple[str, ...]) -> Any:
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    class _Quantizer(PT2EQuantizer):
        """litert-torch's quantizer, except that nodes inside ``keep_float`` modules stay float."""

        # litert-torch 0.10's conv+BN QAT pattern export fails under torch 2.14 (it torch.export()s a plain
        # function); BN is folded into the convs before annotation instead (PT2EBackend.quantize).
        STATIC_QAT_ONLY_OPS: list[str] = []

        def _annotate_all_static_patterns(self, model, quantization_config, filter_fn=None):  # noqa: ANN001
            return super()._annotate_all_static_patterns(model, quantization_config, self._keep(filter_fn))

        def _annotate_all_dynamic_patterns(self, model, quantization_config, filter_fn=None):  # noqa: ANN001
            return super()._annotate_all_dynamic_patterns(model, quantization_config, self._keep(filter_fn))

        @staticmethod
        def _keep(filter_fn: Any) -> Any:
            def accept(node: Any) -> bool:
                stack = node.meta.get("nn_module_stack", {})
                if any(_matches(path, keep_float) for path, _ in stack.values()):
                    return False
                return filter_fn(node) if filter_fn is not None else True

            return accept

    q = _Quantizer()
    return q.set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, is_dynamic=dynamic)
    )


class PT2EBackend(Backend):
    suffix = ".tflite"
    runtime = "litert"

    def quantize(
        self,
        tower: nn.Module,
        batches: list[torch.Tensor],
        *,
        qat: bool = False,
        keep_float: Iterable[str] = (),
        dynamic: bool = False,
    ) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.utils import _fuse_conv_bn_

        patterns = (*self.recipe.keep_float, *keep_float)
        example = batches[0]
        tower = copy.deepcopy(tower).eval()
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            gm = torch.export.export(tower, (example,), dynamic_shapes=({0: batch},)).module()
        except Exception as e:
            raise QuantError(
                f"{type(tower).__name__}: torch.export failed, PT2E needs an exportable tower: {e}"
            ) from e
        # BatchNorm is folded into its conv with the float student's running statistics, for QAT too
        # (they stay frozen): the int8 graph then has no float BN ops between quantized convs.
        _fuse_conv_bn_(gm)
        quantizer = _pt2e_quantizer(dynamic, qat and not dynamic, patterns)
        prepared = (prepare_qat_pt2e if qat and not dynamic else prepare_pt2e)(gm, quantizer)
        prepared.meta["edge_msd"] = {
            "quantizer": quantizer,
            "dynamic": dynamic,
            "bn_frozen": False,
            "qat": qat and not dynamic,
        }
        _allow_train_eval(prepared)
        prepared.eval()
        _calibrate(prepared, batches)
        return prepared.train(qat)

    def simulate(self, prepared: nn.Module) -> nn.Module:
        """PTQ's prepared graph only observes; its converted copy runs the quantize/dequantize ops."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        if prepared.meta["edge_msd"].get("qat"):
            return prepared
        return convert_pt2e(_eval_copy(prepared), fold_quantize=False)

    def layers(self, prepared: nn.Module) -> list[str]:
        names = []
        for node in prepared.graph.nodes:
            if node.op == "call_function" and node.target in (
                torch.ops.aten.conv2d.default,
                torch.ops.aten.linear.default,
            ):
                stack = node.meta.get("nn_module_stack", {})
                names.append(list(stack.values())[-1][0] if stack else node.name)
        return names

    def freeze_observers(self, prepared: nn.Module) -> None:
        from torchao.quantization.pt2e import disable_observer

        prepared.apply(disable_observer)

    def freeze_bn(self, prepared: nn.Module) -> None:
        """Switch the exported graph's batch_norm ops to inference (running stats no longer update)."""
        prepared.meta["edge_msd"]["bn_frozen"] = True
        prepared.train(prepared.training)

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        meta = prepared.meta["edge_msd"]
        model = _eval_copy(prepared)
        try:
            with torch.no_grad(), _quiet():
                converted = convert_pt2e(model, fold_quantize=False)
                out_dim = int(converted(example).shape[-1])
                edge = litert_torch.convert(
                    converted, (example,), quant_config=QuantConfig(pt2e_quantizer=meta["quantizer"])
                )
                edge.export(str(path))
        except Exception as e:
            raise QuantError(f"{path.name}: LiteRT int8 conversion failed: {_first_line(e)}") from e
        kind = "dynamic-range" if meta["dynamic"] else "full-integer"
        io_ = _io(example, out_dim, int(example.shape[0]))
        io_["inputs"][0].update(self._input_quant(path))
        return {"format": "tflite", "precision": "int8", "quantization": kind, **io_}

    @staticmethod
    def _input_quant(path: Path) -> dict[str, Any]:
        """The int8 model may take an int8 input: record its (scale, zero point) for the runtime."""
        it = interpreter(path)
        d = it.get_input_details()[0]
        scale, zero = d["quantization"]
        if np.dtype(d["dtype"]) == np.int8:
            return {"dtype": "int8", "quantization": {"scale": float(scale), "zero_point": int(zero)}}
        return {}

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        return run_tflite(path, x)


def _allow_train_eval(gm: nn.Module) -> None:
    """Let the trainer call .train()/.eval() on an exported graph: they rewrite its batch_norm (and
    dropout) ops, and keep BatchNorm in inference once ``freeze_bn`` has frozen its statistics."""
    from torchao.quantization.pt2e.export_utils import (
        _move_exported_model_to_eval,
        _move_exported_model_to_train,
        _replace_batchnorm,
    )

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        # each rewrite torch.exports its patterns (about a second): skip graphs without those ops
        if _has_mode_ops(self) and mode:
            _move_exported_model_to_train(self)
            if self.meta["edge_msd"]["bn_frozen"]:
                _replace_batchnorm(self, train_to_eval=True)
        elif _has_mode_ops(self):
            _move_exported_model_to_eval(self)
        self.training = mode
        return self

    gm.train = types.MethodType(train, gm)  # type: ignore[method-assign]
    gm.eval = types.MethodType(lambda self: self.train(False), gm)  # type: ignore[method-assign]


def _eval_copy(prepared: nn.Module) -> nn.Module:
    """A copy of a prepared PT2E graph in inference mode (``prepared`` keeps its mode), for convert_pt2e."""
    model = copy.deepcopy(prepared)
    _allow_train_eval(model)
    model.eval()
    return model


def _has_mode_ops(gm: nn.Module) -> bool:
    """Whether train/eval changes the graph: only its dropout and batch_norm ops depend on the mode."""
    return any(
        n.op == "call_function" and ("dropout" in str(n.target) or "batch_norm" in str(n.target))
        for n in gm.graph.nodes
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---- Core ML: coremltools.optimize.torch LinearQuantizer ---------------------------------------------
class CoreMLBackend(Backend):
    suffix = ".mlpackage"
    runtime = None  # Core ML predicts only on macOS; here the fake-quant torch model is measured

    def _config(self, keep_float: Iterable[str], n_steps: int | None) -> Any:
        from coremltools.optimize.torch.quantization import LinearQuantizerConfig

        glob: dict[str, Any] = {"quantization_scheme": "symmetric"}
        if self.recipe.size_option == "weight-int8":
            glob["activation_dtype"] = "float32"
        if n_steps:  # enable observers and fake quant at 0, freeze observers, then BatchNorm statistics
            glob["milestones"] = [
                0,
                0,
                max(1, int(n_steps * self.recipe.qat_observer_freeze)),
                max(1, int(n_steps * self.recipe.qat_bn_freeze)),
            ]
        return LinearQuantizerConfig.from_dict(
            {"global_config": glob, "module_name_configs": {name: None for name in keep_float}}
        )

    def quantize(
        self,
        tower: nn.Module,
        batches: list[torch.Tensor],
        *,
        qat: bool = False,
        keep_float: Iterable[str] = (),
        n_steps: int | None = None,
    ) -> nn.Module:
        """Each Linear/Conv2d gets its own LinearQuantizer (W8A8 on its input, weight and output):
        whole-tower FX tracing fails on open_clip's shape arithmetic, a single layer always traces."""
        from coremltools.optimize.torch.quantization import LinearQuantizer

        model = explicit_attention(copy.deepcopy(tower)).eval()
        model._edge_msd_quantizers = {}  # type: ignore[assignment]  # layer name -> LinearQuantizer
        if _palette_bits(self.recipe.size_option):
            return model  # palettization is applied to the converted program's weights (see write)
        patterns = (*self.recipe.keep_float, *keep_float)
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d) and not _matches(n, patterns)
        ]
        inputs: dict[str, tuple] = {}
        hooks = [
            model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, a))
            for n in names
        ]
        with torch.no_grad():
            model(batches[0])
        for h in hooks:
            h.remove()
        config = self._config((), n_steps if qat else None)
        for n in names:
            if n not in inputs:
                continue  # never called (its weight is read by a fused op): stays float
            quantizer = LinearQuantizer(model.get_submodule(n), config)
            try:
                with _quiet():
                    layer = quantizer.prepare(example_inputs=inputs[n], inplace=False)
            except Exception as e:
                raise QuantError(f"LinearQuantizer cannot handle layer {n!r}: {_first_line(e)}") from e
            if qat:
                quantizer.step()  # milestone 0: observers and fake quant on, before calibration
            _set_submodule(model, n, layer)
            model._edge_msd_quantizers[n] = quantizer
        model.eval()
        _calibrate(model, batches)
        return model.train(qat)

    def layers(self, prepared: nn.Module) -> list[str]:
        return list(getattr(prepared, "_edge_msd_quantizers", {}))

    def step(self, prepared: nn.Module) -> None:
        """Advance LinearQuantizer's milestones (observer and BatchNorm freezing)."""
        for q in getattr(prepared, "_edge_msd_quantizers", {}).values():
            q.step()

    def freeze_observers(self, prepared: nn.Module) -> None:
        from torch.ao.quantization import disable_observer

        prepared.apply(disable_observer)

    def freeze_bn(self, prepared: nn.Module) -> None:
        _freeze_bn_modules(prepared)

    def finalize(self, prepared: nn.Module) -> nn.Module:
        """A copy with each fake-quant layer replaced by LinearQuantizer's finalized (reference) layer."""
        model = copy.deepcopy(prepared).eval()
        for n, q in getattr(prepared, "_edge_msd_quantizers", {}).items():
            _set_submodule(model, n, q.finalize(model.get_submodule(n), inplace=False).eval())
        return model

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        import coremltools as ct
        import coremltools.optimize.coreml as cto

        model = self.finalize(prepared)
        is_image = example.is_floating_point()
        try:
            with torch.no_grad(), _quiet():
                out_dim = int(model(example).shape[-1])
                traced = torch.jit.trace(model, (example,), check_trace=False)
                mlmodel = ct.convert(
                    traced,
                    convert_to="mlprogram",
                    minimum_deployment_target=ct.target.iOS17,
                    inputs=[
                        ct.TensorType(
                            name="image" if is_image else "tokens",
                            shape=tuple(example.shape),
                            dtype=np.float32 if is_image else np.int32,
                        )
                    ],
                    outputs=[ct.TensorType(name="embedding")],
                    compute_precision=ct.precision.FLOAT32,
                )
                bits = _palette_bits(self.recipe.size_option)
                if bits:
                    cfg = cto.OptimizationConfig(
                        global_config=cto.OpPalettizerConfig(nbits=bits, mode="kmeans")
                    )
                    mlmodel = cto.palettize_weights(mlmodel, cfg)
                mlmodel.save(str(path))
        except Exception as e:
            raise QuantError(f"{path.name}: Core ML conversion failed: {_first_line(e)}") from e
        precision = {"w8a8": "int8", "weight-int8": "int8-weights"}.get(
            self.recipe.size_option, self.recipe.size_option
        )
        io_ = _io(example, out_dim, int(example.shape[0]))
        return {"format": "mlpackage", "precision": precision, "quantization": self.recipe.size_option, **io_}


BACKENDS: dict[str, type[Backend]] = {
    "modelopt": ModeloptBackend,
    "pt2e": PT2EBackend,
    "coreml": CoreMLBackend,
}


def backend_for(recipe: Recipe) -> Backend:
    return BACKENDS[recipe.backend](recipe)


def file_size(path: Path) -> int:
    """Bytes of a model file, or of all files in a model folder (.mlpackage)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)
