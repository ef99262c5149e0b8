"""Core ML ML Program (.mlpackage, iOS 17+) through coremltools: torch.export → ct.convert.

fp16 is the default, with the ops that overflow in fp16 (LayerNorm, softmax, the reductions of the
L2 norm: ``options.fp32_ops``) kept in fp32 through coremltools' op selector. The final L2 norm runs
in fp32 end to end: ``reduce_l2_norm``, the clamp (``maximum``) and broadcast (``tile``) that
``F.normalize`` puts before the divide, and the divide; ``spec_check`` verifies it in the saved
program. int8 (W8A8) programs come from the LinearQuantizer recipe below (the token-embedding table int8 per
row: an int8 ``gather`` and a gather of its row scales) and are shipped with the same metadata and spec
checks. Conversion and spec checks run on Linux; predictions need macOS
(libcoremlpython), so parity runs there only.
"""

from __future__ import annotations

import copy
import json
import platform
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_msd import __version__
from edge_msd.contract.numerics import run_batched
from edge_msd.contract.reading import IN_MODEL
from edge_msd.delegation import check_towers, coreml_findings
from edge_msd.errors import ArtifactError, ConfigError, QuantError
from edge_msd.families.common.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    ExportRequest,
    Family,
    Runner,
    example_inputs,
    fused_input,
    io_entry,
    tower_module,
)
from edge_msd.families.common.embedding import int8_token_embedding
from edge_msd.families.common.fused_input import SCALE
from edge_msd.families.common.quantizer import (
    Quantizer,
    calibrate,
    first_line,
    freeze_bn_modules,
    io_entries,
    matches,
    quiet,
    set_submodule,
)
from edge_msd.families.declarations import DECLARATIONS, CoreMLOptions, Recipe
from edge_msd.students.towers import Student, explicit_attention

if TYPE_CHECKING:
    from edge_msd.targets import TargetProfile


DESCRIPTIONS = {"image": "RGB image, (x/255 - mean)/std, NCHW float32",
                "image_type": "RGB image (CVPixelBuffer); x/255 - mean in the ImageType, / std in the model",
                "text": "int32 CLIP BPE token ids: sot, tokens, eot, zero padding"}


# ops that F.normalize puts between reduce_l2_norm and the divide: its clamp_min(eps) and expand_as
_NORM_STEPS = ("maximum", "tile", "cast")


def _after_l2_norm(op) -> bool:  # noqa: ANN001 - a coremltools MIL Operation
    """True for the clamp and broadcast of an L2 norm, so that the op selector keeps them fp32 with it."""
    while op is not None and op.op_type in _NORM_STEPS and "x" in op.inputs:
        op = op.inputs["x"].op
    return op is not None and op.op_type == "reduce_l2_norm"


class StdScale(nn.Module):
    """The image tower behind Core ML's ImageType preprocessing: the ImageType computes ``x * scale +
    bias`` with one scale for all channels (NeuralNetworkImageScaler), so it takes ``x / 255 - mean`` and
    the per-channel ``/ std`` stays in the model, one Mul before the first conv."""

    def __init__(self, tower: nn.Module, std: Iterable[float]):
        super().__init__()
        self.tower = tower
        self.register_buffer("inv_std", 1.0 / torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tower(image * self.inv_std)


def image_type(student: Student, shape: tuple[int, ...]) -> Any:
    """``ct.ImageType`` for RGB frames: scale 1/255 and bias -mean, Core ML's own preprocessing."""
    import coremltools as ct

    return ct.ImageType(name=INPUT_NAMES["image"], shape=shape, scale=SCALE,
                        bias=[-float(m) for m in student.preprocess.mean], color_layout=ct.colorlayout.RGB)


def _convert(module: torch.nn.Module, example: np.ndarray, tower: str, precision: str, opts: CoreMLOptions,
             input_type: Any = None):
    """``input_type``: the ct input type (an ImageType), else a TensorType of the example."""
    import coremltools as ct

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, (torch.from_numpy(example),)).run_decompositions({})
        dtype = np.int32 if tower == "text" else np.float32
        tensor = ct.TensorType(name=INPUT_NAMES[tower], shape=example.shape, dtype=dtype)
        fp32_ops = set(opts.fp32_ops)
        precision_arg = (ct.precision.FLOAT32 if precision == "fp32" else
                         ct.transform.FP16ComputePrecision(
                             op_selector=lambda op: op.op_type not in fp32_ops and not _after_l2_norm(op)))
        try:
            return ct.convert(
                ep, inputs=[input_type or tensor],
                outputs=[ct.TensorType(name=OUTPUT_NAME)], convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, opts.minimum_deployment_target),
                compute_precision=precision_arg,
                compute_units=getattr(ct.ComputeUnit, opts.compute_units))
        except Exception as e:  # coremltools names the unsupported torch op in its message
            msg = str(e).splitlines()[0]
            raise ConfigError(f"Core ML conversion of the {tower} tower failed: {msg}") from e


def _annotate(mlmodel, tower: str, student: Student, precision: str, opts: CoreMLOptions) -> None:
    """Author, licence, version, I/O descriptions and preprocessing, as Xcode shows them."""
    mlmodel.author = opts.author
    mlmodel.license = opts.license
    mlmodel.version = f"{student.name} (edge-msd {__version__})"
    mlmodel.short_description = f"{student.name} {tower} tower: L2-normalised embedding"
    is_image = mlmodel.get_spec().description.input[0].type.WhichOneof("Type") == "imageType"
    mlmodel.input_description[INPUT_NAMES[tower]] = DESCRIPTIONS["image_type" if is_image else tower]
    mlmodel.output_description[OUTPUT_NAME] = f"L2-normalised {student.embed_dim}-d embedding"
    meta = {"preprocessing": json.dumps(student.preprocess.to_manifest()) if tower == "image"
            else json.dumps({"context_length": student.context_length}),
            "student": student.name, "precision": precision}
    mlmodel.user_defined_metadata.update(meta)


# op types that carry int8 in an ML Program: activation Q/DQ and compressed constant weights
INT8_OPS = ("quantize", "dequantize", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
            "constexpr_lut_to_dense")


def spec_check(spec, path: Path, tower: str, precision: str, fp32_ops: list[str]) -> dict:
    """Check a saved spec (no compile, works on Linux): I/O, program, op precisions."""
    import coremltools as ct

    if spec.WhichOneof("Type") != "mlProgram":
        raise ArtifactError(f"{path}: not an ML Program")
    ins = {i.name: i for i in spec.description.input}
    outs = {o.name: o for o in spec.description.output}
    want = "INT32" if tower == "text" else "FLOAT32"
    arr = ct.proto.FeatureTypes_pb2.ArrayFeatureType
    name = INPUT_NAMES[tower]
    kind = ins[name].type.WhichOneof("Type") if name in ins else None
    got = "image" if kind == "imageType" else arr.ArrayDataType.Name(ins[name].type.multiArrayType.dataType) \
        if kind else None
    if got not in (want, "image" if tower == "image" else want):
        raise ArtifactError(f"{path}: input {INPUT_NAMES[tower]!r} missing or not {want} (or an RGB image)")
    if OUTPUT_NAME not in outs:
        raise ArtifactError(f"{path}: output {OUTPUT_NAME!r} missing")
    ops: dict[str, dict[str, int]] = {}
    fp16_in_fp32_ops = []
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                dt = op.outputs[0].type.tensorType.dataType if op.outputs else 0
                name = ct.proto.MIL_pb2.DataType.Name(dt)
                ops.setdefault(op.type, {}).setdefault(name, 0)
                ops[op.type][name] += 1
                if op.type in fp32_ops and name == "FLOAT16":
                    fp16_in_fp32_ops.append(op.type)
    if fp16_in_fp32_ops:
        raise ArtifactError(f"{path}: ops {sorted(set(fp16_in_fp32_ops))} run in fp16 but must stay fp32")
    norms = l2_norm_dtypes([op for fn in spec.mlProgram.functions.values()
                            for block in fn.block_specializations.values() for op in block.operations])
    if any(set(dtypes.values()) != {"FLOAT32"} for dtypes in norms):
        raise ArtifactError(f"{path}: the L2 norm of the embedding does not run in fp32 from reduce_l2_norm "
                            f"to the divide: {norms}")
    if precision == "fp16" and not any("FLOAT16" in v for v in ops.values()):
        raise ArtifactError(f"{path}: fp16 requested but no op computes in fp16")
    if precision == "int8" and not set(INT8_OPS) & set(ops):
        raise ArtifactError(f"{path}: int8 requested but the program holds none of the ops {INT8_OPS}")
    return {"program": "mlProgram", "spec_version": spec.specificationVersion, "ops": ops,
            "l2_norms_fp32": len(norms), "checked": True}


def l2_norm_dtypes(operations: list) -> list[dict[str, str]]:
    """Per L2 norm (a ``real_div`` by a ``reduce_l2_norm``): {op output name: dtype} from the norm to the
    divide, read from the saved program's proto ops."""
    import coremltools as ct

    def dtype(op) -> str:  # noqa: ANN001 - a MIL_pb2.Operation
        return ct.proto.MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)

    producer = {out.name: op for op in operations for out in op.outputs}
    norms = []
    for op in operations:
        if op.type != "real_div" or "y" not in op.inputs:
            continue
        chain = [op]
        src = producer.get(op.inputs["y"].arguments[0].name)
        while src is not None and src.type in _NORM_STEPS and "x" in src.inputs:
            chain.append(src)
            src = producer.get(src.inputs["x"].arguments[0].name)
        if src is not None and src.type == "reduce_l2_norm":
            norms.append({o.outputs[0].name: dtype(o) for o in [src, *reversed(chain)]})
    return norms


class CoreMLQuantizer(Quantizer):
    """coremltools.optimize.torch LinearQuantizer (W8A8 symmetric, per-channel weights); size options:
    weight-only int8, k-means palettization of the converted program's weights."""

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

    def quantize(self, tower: nn.Module, batches: list[torch.Tensor], *, qat: bool = False,
                 keep_float: Iterable[str] = (), n_steps: int | None = None) -> nn.Module:
        """Each Linear/Conv2d gets its own LinearQuantizer (W8A8 on its input, weight and output):
        whole-tower FX tracing fails on open_clip's shape arithmetic, a single layer always traces."""
        from coremltools.optimize.torch.quantization import LinearQuantizer

        model = explicit_attention(copy.deepcopy(tower)).eval()
        model._edge_msd_quantizers = {}  # type: ignore[assignment]  # layer name -> LinearQuantizer
        if _palette_bits(self.recipe.size_option):
            return model  # palettization is applied to the converted program's weights (see write)
        int8_token_embedding(model)
        patterns = (*self.recipe.keep_float, *keep_float)
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d) and not matches(n, patterns)
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
                with quiet():
                    layer = quantizer.prepare(example_inputs=inputs[n], inplace=False)
            except Exception as e:
                raise QuantError(f"LinearQuantizer cannot handle layer {n!r}: {first_line(e)}") from e
            if qat:
                quantizer.step()  # milestone 0: observers and fake quant on, before calibration
            set_submodule(model, n, layer)
            model._edge_msd_quantizers[n] = quantizer
        model.eval()
        calibrate(model, batches)
        return model.train(qat)

    @classmethod
    def check_recipe(cls, recipe: Recipe, where: str) -> None:
        if not (recipe.size_option in ("w8a8", "weight-int8") or _palette_bits(recipe.size_option)):
            raise ConfigError(
                f"{where}: [options.quant] size_option {recipe.size_option!r}; "
                "expected w8a8, weight-int8 or palettize-<1..8>bit"
            )

    def layers(self, prepared: nn.Module) -> list[str]:
        return list(getattr(prepared, "_edge_msd_quantizers", {}))

    def on_qat_step(self, prepared: nn.Module, step: int, n_steps: int) -> None:
        """LinearQuantizer keeps its own milestones (observer and BatchNorm freezing): advance them."""
        for q in getattr(prepared, "_edge_msd_quantizers", {}).values():
            q.step()

    def freeze_observers(self, prepared: nn.Module) -> None:
        from torch.ao.quantization import disable_observer

        prepared.apply(disable_observer)

    def freeze_bn(self, prepared: nn.Module) -> None:
        freeze_bn_modules(prepared)

    def finalize(self, prepared: nn.Module) -> nn.Module:
        """A copy with each fake-quant layer replaced by LinearQuantizer's finalized (reference) layer."""
        model = copy.deepcopy(prepared).eval()
        for n, q in getattr(prepared, "_edge_msd_quantizers", {}).items():
            set_submodule(model, n, q.finalize(model.get_submodule(n), inplace=False).eval())
        return model

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        import coremltools as ct
        import coremltools.optimize.coreml as cto

        model = self.finalize(prepared)
        is_image = example.is_floating_point()
        try:
            with torch.no_grad(), quiet():
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
            raise QuantError(f"{path.name}: Core ML conversion failed: {first_line(e)}") from e
        precision = {"w8a8": "int8", "weight-int8": "int8-weights"}.get(
            self.recipe.size_option, self.recipe.size_option
        )
        io_ = io_entries(example, out_dim, int(example.shape[0]))
        return {"format": "mlpackage", "precision": precision, "quantization": self.recipe.size_option, **io_}


def _palette_bits(option: str) -> int | None:
    if option.startswith("palettize-") and option.endswith("bit"):
        bits = option[len("palettize-") : -len("bit")]
        if bits.isdigit() and 1 <= int(bits) <= 8:
            return int(bits)
    return None


class CoreMLFamily(Family):
    declaration = DECLARATIONS["coreml"]
    quantizer = CoreMLQuantizer
    format = "mlpackage"
    ext = "mlpackage"
    fused_input = True  # as an ImageType (Core ML's own preprocessing) plus the per-channel / std

    def write(self, req: ExportRequest, tower: str, path: Path) -> None:
        opts = req.profile.options
        example = example_inputs(req.student, req.profile.batch_sizes[0])[tower]
        module, input_type = tower_module(req.student, tower), None
        if tower == "image" and fused_input(req):
            module = StdScale(module, req.student.preprocess.std)
            input_type = image_type(req.student, example.shape)
        mlmodel = _convert(module, example, tower, req.precision, opts, input_type)
        _annotate(mlmodel, tower, req.student, req.precision, opts)
        mlmodel.save(str(path))

    def ship(self, src: Path, dest: Path, tower: str, student: Student, profile: TargetProfile) -> None:
        """Re-save the quantized program with the same metadata a float export carries."""
        import coremltools as ct

        mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
        _annotate(mlmodel, tower, student, "int8", profile.options)
        dest.parent.mkdir(parents=True, exist_ok=True)
        mlmodel.save(str(dest))

    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        import coremltools as ct

        spec = ct.models.MLModel(str(folder / rel), skip_model_load=True).get_spec()
        check = spec_check(spec, folder / rel, tower, precision, list(profile.options.fp32_ops))
        arr = ct.proto.FeatureTypes_pb2.ArrayFeatureType

        def io(feature, layout: str | None = None) -> dict:
            if feature.type.WhichOneof("Type") == "imageType":  # an RGB frame per call: uint8 (1, H, W, 3)
                t = feature.type.imageType
                return io_entry(feature.name, [1, t.height, t.width, 3], "uint8", "NHWC")
            t = feature.type.multiArrayType
            return io_entry(feature.name, list(t.shape), arr.ArrayDataType.Name(t.dataType).lower(), layout)

        return {"file": rel, "format": self.format, "precision": precision,
                "inputs": [io(spec.description.input[0], "NCHW" if tower == "image" else None)],
                "outputs": [io(spec.description.output[0])], "coreml_check": check}

    def check_graph(self, profile: TargetProfile, models: dict[str, dict], folder: Path, warn: Any) -> dict:
        """What keeps each program off the Neural Engine, read from its spec (edge_msd.delegation)."""
        import coremltools as ct

        def find(entry: dict) -> list[str]:
            spec = ct.models.MLModel(str(folder / entry["file"]), skip_model_load=True).get_spec()
            return coreml_findings(spec, entry["coreml_check"]["ops"])

        return {"delegate": "Neural Engine", **check_towers(profile.name, models, find, warn)}

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        if platform.system() != "Darwin":
            return "Core ML predictions need macOS (coremltools has no libcoremlpython elsewhere)"
        import coremltools as ct

        model = ct.models.MLModel(str(bundle_dir / entry["file"]))
        name = entry["inputs"][0]["name"]
        if entry["inputs"][0].get(IN_MODEL):  # an ImageType: coremltools predicts it from PIL frames
            from PIL import Image

            return lambda x: np.concatenate([np.asarray(model.predict({name: Image.fromarray(f, "RGB")})
                                                        [OUTPUT_NAME]) for f in x])
        return lambda x: run_batched(lambda c: np.asarray(model.predict({name: c})[OUTPUT_NAME]), x,
                                     entry["inputs"][0]["shape"][0])


FAMILY = CoreMLFamily()
