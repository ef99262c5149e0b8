"""What each target family declares to the profile loader, as data, without its toolchain.

A profile (targets/<name>.toml) is checked when it is loaded against its family's ``FamilyDecl``: the
typed class of its ``[options]`` table, the float precisions the family writes, its int8 ``Recipe``
(int8 exists only where there is one), whether it writes a dynamic batch and the device-side runtimes
of its files. The family classes (edge_msd/families/<name>.py) read these facts from here, so each has
one home, and listing or loading profiles never imports torch or a converter: this module imports only
the standard library, edge_msd.config, edge_msd.errors and the bundle format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edge_msd.config import field
from edge_msd.contract.format import DEFAULT_TIMING_CACHE, ENGINE_DEFAULTS
from edge_msd.errors import ConfigError

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")  # coremltools' ct.ComputeUnit
DELEGATES = ("xnnpack", "coreml")  # ExecuTorch backends a float program is lowered to
# the image tower's input contract: float32 NCHW normalised by the host, or uint8 NHWC frames with
# scale/mean/std folded into the model (edge_msd.families.common.fused_input)
IMAGE_INPUTS = ("float_nchw", "uint8_nhwc")


def image_input_field(default: str) -> Any:
    return field(default, help=f"image tower input: {' | '.join(IMAGE_INPUTS)} (uint8_nhwc: the model "
                               "casts and normalises uint8 RGB frames itself; float fp32/fp16 exports only)")


@dataclasses.dataclass
class FamilyOptions:
    """The ``[options]`` of a profile; each family subclasses it with its own typed fields."""

    quant: dict = dataclasses.field(
        default_factory=dict,
        metadata={"help": "[options.quant]: tuning of the family's int8 recipe (edge_msd.quant.recipes)"},
    )
    # float_nchw where the family's int8 recipe does not fuse the input yet: one profile, one contract
    image_input: str = image_input_field("float_nchw")

    def __post_init__(self) -> None:
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"field 'image_input' is {self.image_input!r}; expected one of "
                             f"{', '.join(IMAGE_INPUTS)}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one target quantizes; each family holds its default, overridable from ``[options.quant]``."""

    name: str
    exporter: str
    backend: str  # the toolchain, for reports and manifests: pt2e | modelopt | coreml | xnnpack
    scheme: str  # one line for reports and manifests
    keep_float: tuple[str, ...] = ()  # module-name patterns (fnmatch, relative to the tower) left in float
    keep_first_last: bool = False  # keep each tower's first and last quantized layer in float
    sensitivity_scan: bool = False  # choose up to scan_max_layers more float layers by leave-one-out
    scan_max_layers: int = 2
    scan_min_gain: float = 1e-3  # mean cosine a layer must give back to be kept in float
    size_option: str = "w8a8"  # coreml: w8a8 | weight-int8 | palettize-<n>bit
    allow_fallback: bool = False  # a tower whose full-int8 conversion fails ships dynamic-range (tflite)
    qat_observer_freeze: float = 0.5  # fraction of QAT steps after which quantization ranges are frozen
    qat_bn_freeze: float = 0.7  # fraction of QAT steps after which BatchNorm statistics are frozen

    def to_manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FamilyDecl:
    """What a family's profiles may ask of it (edge_msd.targets checks every profile against this)."""

    name: str  # the profile's `exporter` value, and the family's module name
    options: type[FamilyOptions]  # the typed [options] table of its profiles
    float_precisions: tuple[str, ...]  # what the family's ``write`` converts to
    runtimes: tuple[str, ...]  # device-side runners of its files; the profile's [bench] runtime is one
    dynamic_batch: bool = False  # whether it writes a dynamic batch dimension
    recipe: Recipe | None = None  # the default int8 recipe; None: no int8 for this family

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision it writes: the float ones, and int8 where it has a recipe."""
        return (*self.float_precisions, *(("int8",) if self.recipe is not None else ()))


# ---- the families' [options] ----------------------------------------------------------------


@dataclasses.dataclass
class OnnxOptions(FamilyOptions):
    """``[options]`` of an onnx profile."""

    opset: int = field(18, help="ONNX opset of the export (17 or later: LayerNormalization)")
    # uint8_nhwc: fp32 only (no int8 recipe to keep in step); ONNX Runtime runs the Cast+Mul+Add here
    image_input: str = image_input_field("uint8_nhwc")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.opset < 17:
            raise ValueError(f"field 'opset' is {self.opset}; expected 17 or later (LayerNormalization)")


@dataclasses.dataclass
class TensorRTOptions(OnnxOptions):
    """``[options]`` of a tensorrt profile: the ONNX export here and the engine build on the device."""

    opset: int = field(17, help="ONNX opset (TensorRT 8.6/10 parse opset 17 fully)")
    # float_nchw: its int8 Q/DQ export does not fuse the input yet, and no engine builds here
    image_input: str = image_input_field("float_nchw")
    workspace_mib: int = field(ENGINE_DEFAULTS["workspace_mib"], help="builder workspace in MiB")
    dla_core: int = field(ENGINE_DEFAULTS["dla_core"], help="DLA core (0 or 1 on Orin AGX/NX), -1: GPU only")
    gpu_fallback: bool = field(ENGINE_DEFAULTS["gpu_fallback"], help="layers the DLA cannot run go to GPU")
    timing_cache: str = field(DEFAULT_TIMING_CACHE, help="timing cache file, relative to the bundle")
    fp32_layers: list[str] = field(ENGINE_DEFAULTS["fp32_layers"], help="layers kept fp32 in fp16/int8")


@dataclasses.dataclass
class CoreMLOptions(FamilyOptions):
    """``[options]`` of a coreml profile."""

    minimum_deployment_target: str = field("iOS17", help="coremltools' ct.target name: iOS17, macOS14, ...")
    compute_units: str = field("ALL", help=f"Core ML compute units: {' | '.join(COMPUTE_UNITS)}")
    fp32_ops: list[str] = field([], help="MIL op types kept in fp32 in fp16 programs")
    author: str = field("edge-msd", help="model author, as Xcode shows it")
    license: str = field("", help="model licence, as Xcode shows it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compute_units not in COMPUTE_UNITS:
            raise ValueError(f"field 'compute_units' is {self.compute_units!r}; "
                             f"expected one of {', '.join(COMPUTE_UNITS)}")


@dataclasses.dataclass
class ExecuTorchOptions(FamilyOptions):
    """``[options]`` of an executorch profile."""

    delegate: str = field("xnnpack", help=f"backend the float program is lowered to: {', '.join(DELEGATES)}")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.delegate not in DELEGATES:
            raise ValueError(f"field 'delegate' is {self.delegate!r}; expected one of {', '.join(DELEGATES)}")


# ---- the families ---------------------------------------------------------------------------

DECLARATIONS: dict[str, FamilyDecl] = {d.name: d for d in (
    # generic ONNX for ONNX Runtime; fp32 only, no int8 recipe (int8 ONNX is the tensorrt family's)
    FamilyDecl("onnx", OnnxOptions, ("fp32",), ("onnxruntime",), dynamic_batch=True),
    FamilyDecl("tensorrt", TensorRTOptions, ("fp32", "fp16"), ("tensorrt",), dynamic_batch=True,
               recipe=Recipe(
                   name="tensorrt-int8-qdq",
                   exporter="tensorrt",
                   backend="modelopt",
                   scheme="int8 symmetric; weights per-channel, activations per-tensor (max); explicit Q/DQ "
                          "ONNX",
                   keep_first_last=True,
                   sensitivity_scan=True,
               )),
    FamilyDecl("coreml", CoreMLOptions, ("fp32", "fp16"), ("coreml",),
               recipe=Recipe(
                   name="coreml-w8a8",
                   exporter="coreml",
                   backend="coreml",
                   scheme="LinearQuantizer W8A8 symmetric; weights per-channel int8, activations uint8",
               )),
    # fp16: fp16 weights; static batch (XNNPACK plans static shapes)
    FamilyDecl("tflite", FamilyOptions, ("fp32", "fp16"), ("litert",),
               recipe=Recipe(
                   name="tflite-int8-pt2e",
                   exporter="tflite",
                   backend="pt2e",
                   scheme="PT2E full-integer int8; weights per-channel symmetric, activations per-tensor "
                          "(histogram)",
               )),
    # static batch: .pte programs are memory-planned for one shape
    FamilyDecl("executorch", ExecuTorchOptions, ("fp32",), ("executorch",),
               recipe=Recipe(
                   name="executorch-xnnpack-int8",
                   exporter="executorch",
                   backend="xnnpack",
                   scheme="PT2E int8 (XNNPACK quantizer); weights per-channel symmetric, activations "
                          "per-tensor",
               )),
)}


def names() -> tuple[str, ...]:
    """The registered families: those declared here, each with its module in ``edge_msd.families``."""
    return tuple(sorted(DECLARATIONS))


def declaration(name: str) -> FamilyDecl:
    """What the family ``name`` declares to its profiles; imports no toolchain."""
    if name not in DECLARATIONS:
        raise ConfigError(f"no target family {name!r}; families: {', '.join(names())}")
    return DECLARATIONS[name]
