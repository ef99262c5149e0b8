"""The one interface every target family implements (``Family``), and what it is given.

A family declares as data what a profile may ask of it, in its ``FamilyDecl``
(edge_msd/families/declarations.py, torch-free): ``options`` (the typed class of a profile's
``[options]`` table), ``float_precisions``, ``recipe``, ``dynamic_batch`` and ``runtimes`` (the
device-side runners, edge_msd/bench/runtimes/<name>.py, of its files); the profile loader
(edge_msd.targets) checks every profile against them, and the family reads them from there. A family
owns one file format end to end: ``write`` converts one float tower to a file; ``describe`` reads a
written file back into its manifest entry (docs/bundle.md, ``models``), so a float export and an int8
file made by its ``quantizer`` (``ship``ped into the bundle) get the same entry and the same checks;
``check_graph`` records what the device's delegate will not take; ``runner`` gives a numpy function for
the parity check where the target's runtime exists on this machine, else the reason it does not.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from edge_msd.contract.format import TOWERS, model_file
from edge_msd.contract.numerics import Runner
from edge_msd.contract.reading import IN_MODEL
from edge_msd.errors import ConfigError
from edge_msd.families.common.fused_input import FusedImageInput, uint8_example
from edge_msd.families.common.quantizer import Quantizer, quiet
from edge_msd.families.declarations import FamilyDecl, FamilyOptions, Recipe
from edge_msd.students.towers import Student

if TYPE_CHECKING:
    from edge_msd.targets import TargetProfile

INPUT_NAMES = {"image": "image", "text": "tokens"}
OUTPUT_NAME = "embedding"


@dataclass
class ExportRequest:
    """What to export: the float student, its target and a float precision (int8 is quantized first)."""

    student: Student
    profile: TargetProfile
    precision: str


class Family(ABC):
    declaration: FamilyDecl  # what its profiles may ask of it (edge_msd/families/declarations.py)
    format: str  # onnx | tflite | mlpackage | pte
    ext: str
    quantizer: type[Quantizer] | None = None  # the toolchain that applies ``recipe``
    fused_input = False  # whether ``write`` takes the uint8 NHWC image input (``export_tower``)

    # the declared facts, read from ``declaration`` (their one home)
    @property
    def name(self) -> str:  # the profile's `exporter` value, and this family's module name
        return self.declaration.name

    @property
    def options(self) -> type[FamilyOptions]:
        return self.declaration.options

    @property
    def float_precisions(self) -> tuple[str, ...]:  # what ``write`` converts to; int8 comes from ``recipe``
        return self.declaration.float_precisions

    @property
    def runtimes(self) -> tuple[str, ...]:
        return self.declaration.runtimes

    @property
    def dynamic_batch(self) -> bool:
        return self.declaration.dynamic_batch

    @property
    def recipe(self) -> Recipe | None:  # the default int8 recipe; None: no int8 for this family
        return self.declaration.recipe

    def check(self, req: ExportRequest) -> None:
        """Refuse what this exporter cannot write (named field or precision) before any conversion; the
        profile itself was checked against this family when it was loaded."""
        if req.precision not in self.float_precisions:
            raise ConfigError(f"target {req.profile.name}: {self.name} float export is "
                              f"{' or '.join(self.float_precisions)}, not {req.precision}")
        if fused_input(req) and not self.fused_input:
            raise ConfigError(f"target {req.profile.name}: {self.name} does not export the uint8_nhwc image "
                              'input yet; set [options] image_input = "float_nchw"')

    @abstractmethod
    def write(self, req: ExportRequest, tower: str, path: Path) -> dict[str, Any] | None:
        """Convert one float tower of ``req.student`` into ``path``; optionally return what only the
        conversion knows (added to the tower's manifest entry)."""

    @abstractmethod
    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        """The manifest entry of the model file ``folder/rel``, read from the file itself."""

    def export(self, req: ExportRequest, out_dir: Path) -> dict[str, dict]:
        """Write models/image.<ext> and models/text.<ext> under ``out_dir``; return their entries."""
        self.check(req)
        entries = {}
        for tower in TOWERS:
            rel = model_file(tower, self.ext)
            (out_dir / "models").mkdir(parents=True, exist_ok=True)
            with quiet():  # converters and runtimes print progress and C++ logs
                found = self.write(req, tower, out_dir / rel) or {}
                entry = self.describe(out_dir, rel, tower, req.precision, req.profile)
            if tower == "image" and fused_input(req):  # the file says uint8 (N, H, W, 3), not what it means
                entry["inputs"][0] |= {"layout": "NHWC", IN_MODEL: True}
            entries[tower] = {**entry, **found}
        return entries

    def ship(self, src: Path, dest: Path, tower: str, student: Student, profile: TargetProfile) -> None:
        """Copy a model file (or .mlpackage folder) made by this family's quantizer into the bundle."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copyfile(src, dest)

    def check_graph(self, profile: TargetProfile, models: dict[str, dict], folder: Path, warn: Any) -> dict:
        """What the device's delegate will not take, per tower (``warn(line)`` for each finding); ``{}``
        where nothing is known without the device (ONNX Runtime's execution providers)."""
        return {}

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        """A function (inputs → embeddings) running the exported file here, or why that is impossible."""
        return f"no runtime for {self.format} on this machine"


def io_entry(name: str, shape: list[int], dtype: str, layout: str | None = None) -> dict:
    out = {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}
    if layout:
        out["layout"] = layout
    return out


def example_inputs(student: Student, batch: int) -> dict[str, np.ndarray]:
    """Deterministic example batches: images N(0,1), token rows [sot, words, eot, 0...] as int32."""
    h, w = student.preprocess.size
    rng = np.random.default_rng(0)
    tokens = np.asarray(student.tokenizer(["a photo of a cat"] * batch), dtype=np.int32)
    return {"image": rng.standard_normal((batch, 3, h, w)).astype(np.float32), "text": tokens}


def tower_module(student: Student, tower: str):
    return student.image if tower == "image" else student.text


def fused_input(req: ExportRequest) -> bool:
    """Whether the profile asks for the image tower to take uint8 NHWC frames and normalise itself."""
    return req.profile.options.image_input == "uint8_nhwc"


def export_tower(req: ExportRequest, tower: str, batch: int) -> tuple[nn.Module, np.ndarray]:
    """The module a float export converts for ``tower`` and its example batch: the image tower behind
    ``FusedImageInput`` (uint8 NHWC example) where the profile asks for it, else the tower itself."""
    if tower == "image" and fused_input(req):
        module = FusedImageInput(req.student.image, req.student.preprocess).eval()
        return module, uint8_example(batch, req.student.preprocess.size)
    return tower_module(req.student, tower), example_inputs(req.student, batch)[tower]
