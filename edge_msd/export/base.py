"""The one interface every exporter implements, and what it is given.

An exporter turns the student's two towers into files under ``out_dir/models`` and returns one
manifest entry per tower (docs/bundle.md, ``models``). ``runner`` gives a numpy function for the
parity check where the target's runtime exists on this machine, else the reason it does not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_msd.config import TargetProfile
from edge_msd.export.towers import Student

Runner = Callable[[np.ndarray], np.ndarray]
TOWERS = ("image", "text")
INPUT_NAMES = {"image": "image", "text": "tokens"}
OUTPUT_NAME = "embedding"


@dataclass
class Calibration:
    """Real inputs for post-training quantization: float NCHW images and int32 token rows."""

    images: np.ndarray
    tokens: np.ndarray
    info: dict = field(default_factory=dict)  # which data, split, count, fingerprint (into the manifest)


@dataclass
class ExportRequest:
    """What to export: the student (float or already fake-quantized by QAT), precision, calibration."""

    student: Student
    profile: TargetProfile
    precision: str
    calibration: Calibration | None = None
    quantized: bool = False  # True when student.model already holds QAT fake-quant modules


class Exporter(ABC):
    kind: str  # the profile's `exporter` value
    format: str  # onnx | tflite | mlpackage
    ext: str

    @abstractmethod
    def export(self, req: ExportRequest, out_dir: Path) -> dict[str, dict]:
        """Write models/image.<ext> and models/text.<ext> under ``out_dir``; return their entries."""

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        """A function (inputs → embeddings) running the exported file here, or why that is impossible."""
        return f"no runtime for {self.format} on this machine"

    @staticmethod
    def batch_dim(profile: TargetProfile) -> int:
        return -1 if profile.dynamic_batch else profile.batch_sizes[0]


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


def run_batched(fn: Runner, x: np.ndarray, batch: int) -> np.ndarray:
    """Run a static-batch model over any number of rows (the last chunk padded by repetition)."""
    if batch <= 0:
        return fn(x)
    outs = []
    for s in range(0, len(x), batch):
        chunk = x[s : s + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(fn(chunk)[:n])
    return np.concatenate(outs)
