"""FIFO dictionary of earlier teacher embeddings: the negatives of contrastive distillation.

Images and captions are queued separately (a batch holds B images but C captions), each row with
the id of the image it belongs to, so that the loss can keep every copy of the query's own image
out of the negatives. Everything lives in buffers: ``state_dict`` resumes the queue exactly.
Under ``torch.distributed`` the trainer enqueues tensors gathered from all ranks
(``edge_msd.distill.dist.gather_across_ranks``), so every rank holds the same queue.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edge_msd.errors import ConfigError

EMPTY = -1  # image id of a slot that was never filled


class TeacherQueue(nn.Module):
    """Two ring buffers (teacher images, teacher captions) of ``size`` rows of dim ``dim``."""

    image: Tensor
    text: Tensor
    image_ids: Tensor
    text_ids: Tensor
    image_ptr: Tensor
    text_ptr: Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("image_ids", torch.full((size,), EMPTY, dtype=torch.int64))
        self.register_buffer("text_ids", torch.full((size,), EMPTY, dtype=torch.int64))
        # Next slot to write; images and captions advance independently.
        self.register_buffer("image_ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("text_ptr", torch.zeros((), dtype=torch.int64))

    def check_batch(self, n: int) -> None:
        """Raise ConfigError if a batch of ``n`` rows would overwrite itself in the queue."""
        if n > self.size:
            raise ConfigError(
                f"queue size {self.size} cannot take a batch of {n}; use a queue at least as large "
                "as the (global) batch, images and captions alike"
            )

    def _check(self, emb: Tensor, ids: Tensor) -> None:
        n = emb.shape[0]
        if emb.ndim != 2 or emb.shape[1] != self.dim or ids.shape != (n,):
            raise ValueError(f"expected ({n}, {self.dim}) embeddings and ({n},) ids, "
                             f"got {tuple(emb.shape)} and {tuple(ids.shape)}")
        self.check_batch(n)
        if bool((ids < 0).any()):
            raise ValueError(f"image ids must be >= 0 ({EMPTY} marks an empty queue slot)")

    def _write(self, emb: Tensor, ids: Tensor, rows: Tensor, row_ids: Tensor, ptr: Tensor) -> None:
        n = emb.shape[0]
        slots = (ptr + torch.arange(n, device=ptr.device)) % self.size  # wraps around
        rows[slots] = emb.detach().to(rows.dtype)
        row_ids[slots] = ids.to(row_ids.dtype)
        ptr.copy_((ptr + n) % self.size)

    @torch.no_grad()
    def enqueue(self, t_img: Tensor, t_txt: Tensor, img_ids: Tensor, txt_img_ids: Tensor) -> None:
        """Queue teacher image rows with their image ids and caption rows with the id they describe.

        Call it AFTER the loss of the batch: the queue must never hold the current batch's positives.
        Both halves are checked before anything is written, so a bad call leaves the queue as it was.
        """
        self._check(t_img, img_ids)
        self._check(t_txt, txt_img_ids)
        self._write(t_img, img_ids, self.image, self.image_ids, self.image_ptr)
        self._write(t_txt, txt_img_ids, self.text, self.text_ids, self.text_ptr)

    def keys(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(image_keys, image_key_ids, text_keys, text_key_ids) of the filled slots."""
        img_full = self.image_ids != EMPTY
        txt_full = self.text_ids != EMPTY
        return self.image[img_full], self.image_ids[img_full], self.text[txt_full], self.text_ids[txt_full]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
