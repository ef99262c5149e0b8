"""Images for the student: decoded once to uint8, normalised and augmented in torch, batch by batch.

The student's own preprocess decides the size (``split_preprocess``); images a feature cache marked
bad are never decoded (``ImageStore``). Also the progress bar the trainer's long loops share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from edge_msd.errors import ConfigError

console = Console(stderr=True)


def split_preprocess(preprocess: Callable) -> tuple[Callable, Tensor, Tensor]:
    """(PIL → uint8 HWC array, mean, std) from an open_clip/torchvision Compose preprocess.

    Decoding stops before ToTensor/Normalize so images can be stored as uint8 and normalised in
    torch, batch by batch, after augmentation; what the student sees equals ``preprocess(image)``.
    """
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise ConfigError(
            "the student preprocess must be a torchvision Compose ending in ToTensor, Normalize"
        )
    pil_steps = [t for t in steps if "ToTensor" not in type(t).__name__ and type(t).__name__ != "Normalize"]
    norm = [t for t in steps if type(t).__name__ == "Normalize"]
    mean = torch.tensor(norm[0].mean if norm else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
    std = torch.tensor(norm[0].std if norm else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)

    return PilToUint8(pil_steps), mean, std


class PilToUint8:
    """The PIL steps of a preprocess, then a uint8 HWC RGB array; a class (not a closure) so that
    DataLoader workers started by spawn (macOS's default, Linux's from Python 3.14) can receive it."""

    def __init__(self, pil_steps: list[Callable]):
        self.pil_steps = pil_steps

    def __call__(self, image: Any) -> np.ndarray:
        for t in self.pil_steps:
            image = t(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _as_list(items: list) -> list:
    return items  # the batch's arrays as they are; a module-level function, picklable for spawn


class _DecodeSet(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, indices: np.ndarray, to_uint8: Callable):
        self.dataset, self.indices, self.to_uint8 = dataset, indices, to_uint8

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.to_uint8(self.dataset.load_image(int(self.indices[i])))


class ImageStore:
    """uint8 (N, 3, H, W) images by index: the usable ones decoded up front, or decoded on demand.

    Images the feature cache marked bad (``valid`` False) are never decoded: they may be corrupt.
    """

    def __init__(
        self,
        dataset: Any,
        valid: np.ndarray,
        to_uint8: Callable,
        size: int,
        predecode_mb: int,
        num_workers: int,
        desc: str,
    ):
        self.dataset, self.to_uint8 = dataset, to_uint8
        usable = np.flatnonzero(valid)
        self.row = np.full(len(valid), -1, dtype=np.int64)  # image index -> row of ``array``
        self.row[usable] = np.arange(len(usable))
        self.array: Tensor | None = None
        if len(usable) * 3 * size * size <= predecode_mb * 2**20:
            self.array = decode_images(dataset, usable, to_uint8, num_workers, desc)

    def get(self, indices: np.ndarray) -> Tensor:
        bad = np.asarray(indices)[self.row[indices] < 0]
        if len(bad):
            raise ValueError(f"images {bad[:5].tolist()} were marked bad by the feature cache")
        if self.array is not None:
            return self.array[torch.as_tensor(self.row[indices])]
        return torch.stack([_hwc_to_chw(self.to_uint8(self.dataset.load_image(int(i)))) for i in indices])


def _hwc_to_chw(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def decode_images(
    dataset: Any, indices: np.ndarray, to_uint8: Callable, num_workers: int = 0, desc: str = "decoding images"
) -> Tensor:
    """Decode ``indices`` into one uint8 (N, 3, H, W) tensor (DataLoader workers when asked)."""
    loader = torch.utils.data.DataLoader(
        _DecodeSet(dataset, indices, to_uint8),
        batch_size=256,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    parts: list[Tensor] = []
    with progress_bar(disable=len(indices) < 2000) as bar:
        task = bar.add_task(desc, total=len(indices), info="")
        for batch in loader:
            parts.append(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous())
            bar.advance(task, len(batch))
    return torch.cat(parts) if parts else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def augment_params(n: int, gen: torch.Generator, min_scale: float = 0.85) -> Tensor:
    """(n, 2, 3) affine crops: random zoom-in (scale in [min_scale, 1]), the crop inside the image.

    No flips and no colour jitter: captions name left/right and colours.
    """
    s = min_scale + (1 - min_scale) * torch.rand(n, generator=gen)
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - s)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = s, s, t
    return theta


def augment(images: Tensor, theta: Tensor) -> Tensor:
    """Apply ``augment_params`` crops to float (B, 3, H, W) images, bilinear."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def progress_bar(disable: bool = False) -> Progress:
    return (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=disable,
            transient=False,
        )
        if not disable
        else Progress(disable=True)
    )
