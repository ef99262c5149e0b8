"""The teacher protocol: image → normalised embedding, tokens → normalised embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: importing this module (and the CLI) must not load torch
    import torch
    from PIL import Image


@runtime_checkable
class Teacher(Protocol):
    """What the feature cache needs from a teacher; adapters wrap open_clip, ONNX and the demo."""

    id: str  # stable identifier recorded in feature-cache manifests (spec + weights sha256)
    embed_dim: int

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image → a (C, H, W) float tensor in the teacher's own normalisation."""

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Captions → the token tensor ``encode_text`` takes."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, D) L2-normalised float embeddings."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token tensor → (B, D) L2-normalised float embeddings."""
