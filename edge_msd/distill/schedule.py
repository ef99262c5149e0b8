"""Which data each step sees and at which learning rate: functions of (seed, step) alone."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from edge_msd.distill.config import DistillConfig
from edge_msd.distill.dist import local_slice
from edge_msd.distill.images import augment, augment_params
from edge_msd.distill.splits import SplitData
from edge_msd.errors import ConfigError


class Schedule:
    """Which images and captions each step uses: a function of (seed, step) alone."""

    def __init__(
        self,
        valid_images: np.ndarray,
        caption_image_index: np.ndarray,
        batch: int,
        captions_per_image: int,
        seed: int,
    ):
        self.images = np.flatnonzero(valid_images)
        if len(self.images) < batch:
            raise ConfigError(
                f"batch_size {batch} is larger than the {len(self.images)} usable training images"
            )
        order = np.argsort(caption_image_index, kind="stable")
        counts = np.bincount(caption_image_index, minlength=len(valid_images))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.caps_sorted, self.cap_start, self.cap_count = order, starts, counts
        no_caption = self.images[counts[self.images] == 0]
        if len(no_caption):
            self.images = self.images[counts[self.images] > 0]
        self.batch, self.k, self.seed = batch, captions_per_image, seed
        self.steps_per_epoch = len(self.images) // batch
        self._epoch, self._order = -1, self.images

    def _perm(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s image order, drawn once per epoch (8 bytes per image) from (seed, epoch)
        alone, so a resumed run draws the same one."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.images)
        return self._order

    def step(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image ids (B,), caption ids (B*k,), caption image ids (B*k,)) of global step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        imgs = self._perm(epoch)[pos * self.batch : (pos + 1) * self.batch]
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        picks = (rng.random((len(imgs), self.k)) * self.cap_count[imgs][:, None]).astype(np.int64)
        caps = self.caps_sorted[self.cap_start[imgs][:, None] + picks].reshape(-1)
        return imgs, caps, np.repeat(imgs, self.k)


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings, logit scale (1-D or positional tensors)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or "embedding" in name or name.startswith("logit_")
            (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Batches:
    """The training split's micro-batches on ``device``: ``batches(gstep)`` gives this rank's rows of
    global micro-batch ``gstep`` (normalised images, tokens) and the whole global batch's teacher image
    rows, teacher caption rows, image ids and caption image ids (for the losses and the queue)."""

    def __init__(
        self, cfg: DistillConfig, data: SplitData, micro: int, mean: Tensor, std: Tensor, device: torch.device
    ):
        cache = data.cache
        self.schedule = Schedule(
            cache.valid_images, cache.caption_image_index, micro, cfg.captions_per_image, cfg.seed
        )
        self.data, self.micro, self.device = data, micro, device
        self.augment, self.seed, self.k = cfg.augment, cfg.seed, cfg.captions_per_image
        self.mean, self.std = mean.to(device), std.to(device)
        self.rows = local_slice(micro)

    def __call__(self, gstep: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        imgs, caps, cap_img = self.schedule.step(gstep)
        rows, dev = self.rows, self.device
        # uint8 travels; then in place: one float batch per step, not one per operation.
        x = self.data.images.get(imgs[rows]).to(dev, non_blocking=True).float().div_(255)
        if self.augment:
            # Drawn for the global batch, this rank's rows used: the same crops at any world size.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + gstep)
            x = augment(x, augment_params(self.micro, gen)[rows].to(dev))
        x = x.sub_(self.mean).div_(self.std)
        tokens = self.data.tokens[caps[rows.start * self.k : rows.stop * self.k]]
        cache = self.data.cache  # the global batch's teacher rows, read for this batch only
        return (
            x,
            tokens.to(dev, non_blocking=True),
            torch.from_numpy(cache.image(imgs)).to(dev),
            torch.from_numpy(cache.text(caps)).to(dev),
            torch.from_numpy(imgs).to(dev),
            torch.from_numpy(cap_img).to(dev),
        )
