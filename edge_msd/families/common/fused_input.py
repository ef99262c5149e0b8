"""The image tower behind a uint8 NHWC input with the host's normalise folded in (``image_input =
"uint8_nhwc"``).

The bundle's host formula is ``(x * scale - mean) / std`` on uint8 RGB, then NCHW
(edge_msd.contract.reading.preprocess_images). ``FusedImageInput`` computes it inside the model as one
affine per channel, ``x * a + b`` with ``a = scale / std`` and ``b = -mean / std``, after a cast and
before the permute, so an exporter writes Cast → Mul → Add → Transpose in front of the first conv and
the app hands camera frames over as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edge_msd.students.towers import Preprocess

SCALE = 1.0 / 255.0  # the uint8 → [0, 1] scale of Preprocess.to_manifest


def affine(prep: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (a, b) with ``x * a + b == (x * scale - mean) / std``, as float32."""
    std = np.asarray(prep.std, np.float64)
    a = SCALE / std
    b = -np.asarray(prep.mean, np.float64) / std
    return a.astype(np.float32), b.astype(np.float32)


class FusedImageInput(nn.Module):
    """uint8 (N, H, W, 3) RGB → ``tower``'s embedding; the cast, affine and NCHW permute are in the graph."""

    def __init__(self, tower: nn.Module, prep: Preprocess):
        super().__init__()
        self.tower = tower
        a, b = affine(prep)
        self.register_buffer("a", torch.from_numpy(a).view(1, 3, 1, 1))
        self.register_buffer("b", torch.from_numpy(b).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # permute the uint8 frame first: a quarter of the bytes of a float transpose
        x = image.permute(0, 3, 1, 2).to(torch.float32) * self.a + self.b
        return self.tower(x)


def uint8_example(batch: int, size: tuple[int, int]) -> np.ndarray:
    """A deterministic uint8 (N, H, W, 3) example batch covering 0..255."""
    h, w = size
    return np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
