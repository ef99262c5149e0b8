"""The int8 side of a target family: its ``Quantizer``, the toolchain behind its recipe (the ``Recipe``
data is declared with the family, edge_msd/families/declarations.py).

Each tower (image, text) is quantized on its own: ``quantizer.quantize(tower, batches, qat=...)`` gives
a fake-quant torch module (trainable for QAT), ``quantizer.write(prepared, example, path)`` the target
file, ``quantizer.run(path, x)`` runs that file with the target's runtime where one exists on this
machine. ``on_qat_step`` is the trainer hook that freezes ranges and BatchNorm statistics at the
recipe's milestones. A target profile tunes its family's recipe in an ``[options.quant]`` table
(fields of ``Recipe``). The quantized artifact (``QUANTIZED_KIND``) is what ``edge_msd.quant`` writes
and ``edge_msd.export`` ships.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_msd.errors import ConfigError, QuantError
from edge_msd.families.declarations import Recipe
from edge_msd.quiet import third_party_output_hidden

QUANTIZED_KIND = "edge-msd-quantized"  # manifest kind of a quantized artifact (quant writes, export reads)


class Quantizer:
    """One toolchain: fake-quantize a tower, write the target file, run it where a runtime exists."""

    suffix = ""
    runtime: str | None = None  # the runtime ``run`` uses; None: only the fake-quant torch model runs here

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @classmethod
    def check_recipe(cls, recipe: Recipe, where: str) -> None:
        """Refuse recipe options this toolchain cannot apply (``where`` names the profile)."""

    def quantize(self, tower: nn.Module, batches: list[torch.Tensor], *, qat: bool = False,
                 keep_float: Iterable[str] = (), n_steps: int | None = None) -> nn.Module:
        """A fake-quant copy of ``tower`` calibrated on ``batches``; trainable when ``qat`` (for
        ``n_steps`` steps)."""
        raise NotImplementedError

    def quantize_dynamic(self, tower: nn.Module, batches: list[torch.Tensor]) -> nn.Module | None:
        """A dynamic-range (int8 weights, float activations) copy, the fallback ``allow_fallback`` permits
        when full-int8 conversion fails; None where the toolchain has no such mode."""
        return None

    def simulate(self, prepared: nn.Module) -> nn.Module:
        """A module computing what the deployed int8 model computes (the fake-quant model itself)."""
        return prepared

    def layers(self, prepared: nn.Module) -> list[str]:
        """Names of the quantized layers (module paths in the tower)."""
        raise NotImplementedError

    def set_layer(self, prepared: nn.Module, name: str, enabled: bool) -> None:
        """Switch one layer's quantization on or off (the sensitivity scan's leave-one-out)."""
        raise ConfigError(
            f"recipe {self.recipe.name!r}: sensitivity_scan needs per-layer switching, which the "
            f"{self.recipe.exporter} toolchain ({self.recipe.backend}) does not offer"
        )

    def on_qat_step(self, prepared: nn.Module, step: int, n_steps: int) -> None:
        """Trainer hook: freeze ranges, then BatchNorm statistics, at the recipe's milestones."""
        if step == milestone(n_steps, self.recipe.qat_observer_freeze):
            self.freeze_observers(prepared)
        if step == milestone(n_steps, self.recipe.qat_bn_freeze):
            self.freeze_bn(prepared)

    def freeze_observers(self, prepared: nn.Module) -> None:
        raise NotImplementedError

    def freeze_bn(self, prepared: nn.Module) -> None:
        raise NotImplementedError

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        """Write the deployable file; returns its manifest entry (format, precision, io)."""
        raise NotImplementedError

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        raise QuantError(f"no {self.recipe.exporter} runtime on this machine to run {path}")


def milestone(n_steps: int, fraction: float) -> int:
    """The QAT step at which a ``fraction`` of ``n_steps`` is done (at least 1)."""
    return max(1, int(n_steps * fraction))


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


# the converters' progress chatter and C++ logs, hidden (shown under -v, or written out when they fail)
quiet = third_party_output_hidden


def cosine_to(reference: torch.Tensor, out: torch.Tensor) -> float:
    """Mean row cosine between two embedding batches."""
    return float(nn.functional.cosine_similarity(out.float(), reference.float(), dim=-1).mean())


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Run the calibration batches through ``model`` (its observers record the ranges)."""
    with torch.no_grad():
        for b in batches:
            model(b)


def io_entries(example: torch.Tensor, out_dim: int, batch: int | str) -> dict[str, Any]:
    """I/O entries: float32 images or int32 tokens in, a float32 embedding per row out."""
    shape_in = [batch if isinstance(batch, int) else -1, *example.shape[1:]]
    dtype_in = "float32" if example.is_floating_point() else "int32"
    return {
        "inputs": [{"shape": shape_in, "dtype": dtype_in}],
        "outputs": [{"shape": [shape_in[0], out_dim], "dtype": "float32"}],
    }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def freeze_bn_modules(model: nn.Module) -> None:
    """BatchNorm layers keep their running statistics from here on (eval mode survives model.train())."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, _m=m: _m  # type: ignore[method-assign]


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def file_size(path: Path) -> int:
    """Bytes of a model file, or of all files in a model folder (.mlpackage)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)
