"""The bundle format: what a bundle's files are called, its schema version, its towers, the device-side
runtimes, and where a manifest keeps the options the device reads."""

from __future__ import annotations

from typing import Any

from edge_msd.artifacts import MANIFEST

__all__ = [
    "DEFAULT_TIMING_CACHE", "ENGINE_DEFAULTS", "ENGINES_JSON", "EVALSET", "FORMATS", "KIND", "MANIFEST",
    "PROBE", "RUNTIMES",
    "SCHEMA", "SIGNATURE", "TABLES", "TARGET_TOML", "TOKENIZER_DIR", "TOKENIZER_JSON", "TOWERS", "at",
    "engine_file", "model_file", "timing_cache_file",
]

KIND = "edge-msd-bundle"
SCHEMA = 1
TOWERS = ("image", "text")
PROBE = "probe.npz"  # the parity probe: images, tokens and the PyTorch student's embeddings
EVALSET = "evalset.npz"  # the retrieval set the device measures recall on
TARGET_TOML = "target.toml"  # the profile the bundle was exported for, as written
TOKENIZER_DIR = "tokenizer"
TOKENIZER_JSON = "tokenizer.json"  # inside TOKENIZER_DIR, beside the BPE vocabulary
SIGNATURE = "manifest.sig"  # written by `edge-msd bundle sign`, beside the manifest
# What `edge-msd build-engine` writes into a bundle on the device; no manifest can list these.
ENGINES_JSON = "engines.json"
DEFAULT_TIMING_CACHE = "timing.cache"
# How engines are built where a bundle's target options leave it open: the tensorrt family's typed
# [options] take their defaults from here, and the device-side builder applies them.
ENGINE_DEFAULTS = {
    "workspace_mib": 2048, "dla_core": -1, "gpu_fallback": True, "fp32_layers": ["LayerNorm", "Softmax"],
}
# The device-side runners (edge_msd/bench/runtimes), in the order `--runtime auto` tries them: the
# device's native runtime first, the generic one last. A family's `runtimes` name some of these.
RUNTIMES = ("tensorrt", "coreml", "litert", "executorch", "onnxruntime")
# Manifest entries that are tables when present: readers look inside them.
TABLES = ("target", "preprocessing", "tokenizer", "student", "parity", "calibration", "quantization")
# Model formats by file suffix; a TensorRT engine (.plan) is built on the device, next to the ONNX.
FORMATS = {
    ".onnx": "onnx",
    ".tflite": "tflite",
    ".mlpackage": "mlpackage",
    ".mlmodel": "mlpackage",
    ".plan": "plan",
    ".engine": "plan",
}


def model_file(tower: str, ext: str) -> str:
    """Where a bundle keeps a tower's model, relative to the bundle."""
    return f"models/{tower}.{ext}"


def engine_file(tower: str) -> str:
    """Where the device builds a tower's TensorRT engine, relative to the bundle."""
    return model_file(tower, "plan")


def at(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]…``, or None where a level is missing or no table (hostile manifests must not crash)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def timing_cache_file(manifest: dict[str, Any]) -> Any:
    """The TensorRT timing cache the profile names (``options.timing_cache``), relative to the bundle."""
    value = at(manifest, "target", "options", "timing_cache")
    return DEFAULT_TIMING_CACHE if value is None else value
