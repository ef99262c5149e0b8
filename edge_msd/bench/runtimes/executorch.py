"""ExecuTorch: a .pte program through ``executorch.runtime`` (the XNNPACK delegate is built in).

ExecuTorch's Python runtime takes and returns torch tensors, so on a device it needs the
``executorch`` wheel and the torch it pulls in (pip install executorch); this module converts numpy
arrays at the boundary and imports both only when a program is loaded.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.bench.runtimes.base import Backend, Session, batch_shape, declared_dtype
from edge_msd.errors import ConfigError


class ExecuTorchSession(Session):
    def __init__(self, method: Any, torch: Any, dtype: Any, threads: int | None):
        self.method = method
        self.torch = torch
        self.dtype = dtype
        self.threads = threads

    def prepare(self, x: np.ndarray) -> Any:
        return [self.torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype))]

    def run(self, feed: Any) -> np.ndarray:
        return self.method.execute(feed)[0].numpy()

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads or "default"}


class ExecuTorchBackend(Backend):
    name = "executorch"
    formats = ("pte",)
    modules = ("executorch",)
    install = "pip install executorch"

    @classmethod
    def version(cls) -> str:
        try:
            return version("executorch")
        except PackageNotFoundError:
            return "not installed"

    @classmethod
    def import_runtime(cls) -> Any:
        return importlib.import_module("executorch.runtime")

    def load(self, model_entry: dict[str, Any], path: Path, threads: int | None, batch: int,
             options: dict[str, Any]) -> Session:
        runtime = self.import_runtime()
        torch = importlib.import_module("torch")  # loaded by executorch.runtime already: its tensor type
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(int(threads))  # XNNPACK's thread pool, shared by the process
        program = runtime.Runtime.get().load_program(str(path))
        planned = tuple(program.metadata("forward").input_tensor_meta(0).sizes())
        wanted = batch_shape(list(planned), batch)
        if planned != wanted:
            raise ConfigError(f"{path.name}: the program is planned for input {list(planned)}; batch {batch} "
                              "needs a bundle exported at that batch size")
        dtype = declared_dtype(model_entry, np.float32)
        return ExecuTorchSession(program.load_method("forward"), torch, dtype, threads)
