"""The few collectives the distillation losses need; each is a no-op outside ``torch.distributed``.

Only detached tensors go through them (teacher embeddings, image ids, loss values): no gradient
crosses ranks here (the trainer all-reduces the student's gradients itself).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_across_ranks(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, in rank order; the first dim may differ per rank.

    Every rank gets the same result, so queues fed with it stay identical on all ranks.
    """
    if not is_distributed():
        return t
    world = dist.get_world_size()
    t = t.detach().contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    # all_gather needs equal shapes: pad to the largest rank's rows, trim after.
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


@torch.no_grad()
def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` is left as it is)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm for data-parallel training: on CUDA, SyncBatchNorm (statistics of the global batch);
    elsewhere SyncBatchNorm cannot run, so BatchNorm normalises with each rank's rows and
    :func:`average_batchnorm_stats` keeps the running statistics equal on all ranks."""
    if is_distributed() and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def average_batchnorm_stats(model: torch.nn.Module) -> None:
    """Average BatchNorm running means and variances over ranks (no-op on one rank or under SyncBN,
    whose statistics are already global)."""
    if not is_distributed():
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm):
            for t in (m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(all_reduce_mean(t))
