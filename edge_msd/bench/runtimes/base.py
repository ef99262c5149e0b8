"""The runtime interface every device-side runner implements: a ``Backend`` loads one tower's model
into a ``Session``.

``session.prepare(x)`` turns a numpy batch into what the runtime consumes (dtype, int8 quantization,
contiguity) outside the timed region; ``session.run(feed)`` is the timed call and returns the float32
embedding (dequantized, on the host); ``session.placement()`` says where the model's ops run.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.bench.placement import unavailable
from edge_msd.errors import EdgeMSDError

NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int32": np.int32,
    "int64": np.int64,
    "int8": np.int8,
    "uint8": np.uint8,
}


class RuntimeMissing(EdgeMSDError):
    """The runtime's Python module (or the OS it needs) is not on this machine."""


class Session:
    """One loaded model. Subclasses set ``input_dtype`` and implement ``_run``."""

    input_dtype: Any = np.float32

    def prepare(self, x: np.ndarray) -> Any:
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def run(self, feed: Any) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    def placement(self, feed: Any, calls: int) -> dict[str, Any]:
        """Where the ops run (``edge_msd.bench.placement``), from ``calls`` runs of ``feed`` if the
        runtime profiles; runtimes that cannot tell say why."""
        return unavailable(f"{type(self).__name__} cannot report op placement")

    def close(self) -> None:
        """Free what the runtime holds (device buffers, streams); a no-op where Python's GC suffices."""


class Backend:
    name = ""
    formats: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # any one of these is the runtime
    install = ""

    @classmethod
    def module_name(cls) -> str | None:
        return next((m for m in cls.modules if has_module(m)), None)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can run here, else why not (in words a user can act on)."""
        if cls.module_name() is None:
            return f"{' / '.join(cls.modules)} not installed ({cls.install})"
        return None

    @classmethod
    def import_runtime(cls) -> Any:
        """Import the runtime's module that ``load`` uses (timed and measured alone in a cold start)."""
        return importlib.import_module(cls.module_name() or cls.modules[0])

    @classmethod
    def version(cls) -> str:
        mod = cls.module_name()
        if mod is None:
            return "not installed"
        return str(getattr(importlib.import_module(mod), "__version__", "unknown"))

    def load(
        self,
        model_entry: dict[str, Any],
        path: Path,
        threads: int | None,
        batch: int,
        options: dict[str, Any],
    ) -> Session:
        raise NotImplementedError


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def declared_dtype(model_entry: dict[str, Any], default: Any) -> Any:
    inputs = model_entry.get("inputs") or [{}]
    return NP_DTYPES.get(str(inputs[0].get("dtype", "")), default)


def batch_shape(shape: list[int], batch: int) -> tuple[int, ...]:
    return (batch, *[int(d) for d in shape[1:]])
