"""Build a jetson bundle's TensorRT engines on the device: ``edge-msd build-engine BUNDLE``, or the same
from the benchmark binary (``python3 edge-msd-bench.pyz build-engine BUNDLE``).

Each tower's verified ONNX is parsed with the TensorRT Python API (TensorRT 8.6/10) and built into
``models/<tower>.plan``; the timing cache and ``engines.json`` are written beside it. Only tensorrt (from
JetPack), the bundle contract and the standard library: this module ships inside the benchmark binary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edge_msd.artifacts import atomic_write_bytes, atomic_write_json
from edge_msd.contract.format import ENGINE_DEFAULTS, ENGINES_JSON, engine_file, timing_cache_file
from edge_msd.contract.integrity import check_bundle
from edge_msd.errors import ArtifactError, ConfigError, EdgeMSDError

NOT_INSTALLED = ("TensorRT is not installed: build-engine runs on the Jetson, where JetPack ships "
                 "the tensorrt Python module")
# The options of `edge-msd build-engine` and of the benchmark binary's build-engine, with their help.
OPTIONS = {
    "precision": (str, "fp32 | fp16 | int8 [default: the bundle's]"),
    "workspace_mib": (int, "builder workspace [default: the profile's]"),
    "dla_core": (int, "DLA core (-1: GPU only) [default: the profile's]"),
    "timing_cache": (Path, "timing cache file"),
}


@dataclasses.dataclass
class EngineSettings:
    """How the engines are built: the options as given, else the bundle's target profile."""

    precision: str
    workspace_mib: int
    dla_core: int
    timing_cache: Path
    batch_profile: tuple[int, int, int]  # min, opt, max of the optimization profile
    fp32_layers: tuple[str, ...]  # layers kept fp32 in an fp16/int8 engine (name or type contains one)
    gpu_fallback: bool


def engine_settings(bundle: Path, manifest: dict[str, Any], precision: str | None, workspace_mib: int | None,
                    dla_core: int | None, timing_cache: Path | None) -> EngineSettings:
    target = manifest["target"]
    opts = {**ENGINE_DEFAULTS, **target.get("options", {})}
    sizes = target["batch_sizes"]
    return EngineSettings(
        precision=precision or manifest["models"]["image"]["precision"],
        workspace_mib=workspace_mib or int(opts["workspace_mib"]),
        dla_core=int(opts["dla_core"]) if dla_core is None else dla_core,
        timing_cache=timing_cache or bundle / timing_cache_file(manifest),  # confined by check_bundle
        batch_profile=(min(sizes), sorted(sizes)[len(sizes) // 2], max(sizes)),
        fp32_layers=tuple(opts["fp32_layers"]),
        gpu_fallback=bool(opts["gpu_fallback"]),
    )


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EdgeMSDError(NOT_INSTALLED) from e
    return trt


def _builder_config(trt: Any, builder: Any, network: Any, s: EngineSettings) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mib << 20)
    if s.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        # LayerNorm/Softmax overflow in fp16: keep them fp32 (explicit precision constraints)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(k.lower() in (layer.name + str(layer.type)).lower() for k in s.fp32_layers):
                layer.precision = trt.float32
    if s.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ in the graph: no calibrator
    if s.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = s.dla_core
        if s.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_bytes = s.timing_cache.read_bytes() if s.timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    return config


def build_tower(trt: Any, logger: Any, tower: str, onnx_path: Path, entry: dict[str, Any], s: EngineSettings
                ) -> tuple[bytes, bytes]:
    """One tower's serialized engine and the timing cache after building it."""
    builder = trt.Builder(logger)
    trt10 = int(trt.__version__.split(".")[0]) >= 10  # explicit batch is the only mode in TensorRT 10
    flags = 0 if trt10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT cannot parse it: {errs}")
    config = _builder_config(trt, builder, network, s)
    inp = entry["inputs"][0]
    if any(d == -1 for d in inp["shape"]):
        profile = builder.create_optimization_profile()
        rest = tuple(inp["shape"][1:])
        bmin, bopt, bmax = s.batch_profile
        profile.set_shape(inp["name"], (bmin, *rest), (bopt, *rest), (bmax, *rest))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"TensorRT failed to build the {tower} engine (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engines(bundle: Path, precision: str | None = None, workspace_mib: int | None = None,
                  dla_core: int | None = None, timing_cache: Path | None = None) -> dict[str, Path]:
    """Build models/<tower>.plan for every tower of a jetson bundle; returns tower → engine file."""
    manifest = check_bundle(bundle).manifest  # the bundle rules: only verified ONNX inside it is parsed
    exporter = manifest["target"].get("exporter")
    if exporter != "tensorrt":
        raise ConfigError(f"{bundle}: built for exporter {exporter!r}, not tensorrt")
    trt = import_tensorrt()
    s = engine_settings(bundle, manifest, precision, workspace_mib, dla_core, timing_cache)
    logger = trt.Logger(trt.Logger.WARNING)
    built = {}
    for tower, entry in manifest["models"].items():
        plan, cache = build_tower(trt, logger, tower, bundle / entry["file"], entry, s)
        built[tower] = bundle / engine_file(tower)
        atomic_write_bytes(built[tower], plan)
        atomic_write_bytes(s.timing_cache, cache)
    atomic_write_json(bundle / ENGINES_JSON,
                      {"precision": s.precision, "dla_core": s.dla_core, "workspace_mib": s.workspace_mib,
                       "batch_profile": list(s.batch_profile), "tensorrt": trt.__version__,
                       "plans": {t: p.name for t, p in built.items()}})
    return built
