"""The device-side runners, one module per runtime behind one interface (``base``), and the choice
of runner for a bundle.

Each runtime's Python module is imported only when its backend is used: the benchmark binary needs
nothing beyond numpy and the one runtime the device has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_msd.bench.runtimes.base import Backend, RuntimeMissing, Session
from edge_msd.bench.runtimes.coreml import CoreMlBackend
from edge_msd.bench.runtimes.executorch import ExecuTorchBackend
from edge_msd.bench.runtimes.litert import LiteRtBackend, LiteRtSession
from edge_msd.bench.runtimes.onnxruntime import OnnxRuntimeBackend, OrtSession
from edge_msd.bench.runtimes.tensorrt import TensorRtBackend
from edge_msd.contract.format import RUNTIMES
from edge_msd.errors import ConfigError

__all__ = [
    "ALIASES",
    "BACKENDS",
    "Backend",
    "CoreMlBackend",
    "ExecuTorchBackend",
    "LiteRtBackend",
    "LiteRtSession",
    "OnnxRuntimeBackend",
    "OrtSession",
    "RuntimeMissing",
    "Session",
    "TensorRtBackend",
    "installed_runtimes",
    "model_files",
    "select_backend",
]

# Keyed by runtime name, in the order `auto` tries them (RUNTIMES of the bundle format, the one list).
BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in sorted(
        (TensorRtBackend, CoreMlBackend, LiteRtBackend, ExecuTorchBackend, OnnxRuntimeBackend),
        key=lambda b: RUNTIMES.index(b.name),
    )
}
ALIASES = {
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
    "tflite": "litert",
    "trt": "tensorrt",
    "coremltools": "coreml",
    "et": "executorch",
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
        fits + " Or export a bundle for this device: "
        "edge-msd export --target onnx|tflite|coreml|jetson|executorch"
    ).strip()
