"""Running a teacher over data: preprocessed images or captions in, float32 embeddings out.

The feature cache (sharded, per rank), the demo teacher's fit and ``edge-msd eval`` all embed through
these, so that every consumer sees a teacher's vectors computed the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from edge_msd.data.base import ImageTextDataset
from edge_msd.teachers.base import Teacher


def teacher_device(teacher: Teacher) -> torch.device:
    """Where the teacher computes: its ``device`` attribute, else its parameters', else the CPU."""
    dev = getattr(teacher, "device", None)
    if dev is not None:
        return torch.device(dev)
    if isinstance(teacher, torch.nn.Module):
        for p in teacher.parameters():
            return p.device
    return torch.device("cpu")


@torch.inference_mode()
def embed_images(teacher: Teacher, images: Sequence[torch.Tensor]) -> np.ndarray:
    """One batch of preprocessed (C, H, W) images → (N, D) float32 embeddings."""
    x = torch.stack(list(images)).to(teacher_device(teacher))
    return teacher.encode_image(x).float().cpu().numpy()


@torch.inference_mode()
def embed_texts(teacher: Teacher, texts: Sequence[str], batch_size: int,
                on_batch: Callable[[int], Any] | None = None) -> np.ndarray:
    """``texts`` → (N, D) float32 embeddings, ``batch_size`` at a time; ``on_batch(n)`` after each batch
    (a progress bar's advance)."""
    device, out = teacher_device(teacher), []
    for s in range(0, len(texts), batch_size):
        batch = list(texts[s : s + batch_size])
        out.append(teacher.encode_text(teacher.tokenize(batch).to(device)).float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(out) if out else np.zeros((0, int(teacher.embed_dim)), np.float32)


def embed_dataset(teacher: Teacher, dataset: ImageTextDataset,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every image (in order; an unreadable one raises its DataError) and every caption."""
    n, images = dataset.n_images, []
    for s in range(0, n, batch_size):
        batch = [teacher.preprocess(dataset.load_image(i)) for i in range(s, min(s + batch_size, n))]
        images.append(embed_images(teacher, batch))
    return np.concatenate(images), embed_texts(teacher, list(dataset.captions), batch_size)
