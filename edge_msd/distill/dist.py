"""Data-parallel training under ``torchrun``; every helper is a no-op in a single process.

The student's gradients are averaged by ``torch.nn.parallel.DistributedDataParallel``. The losses
need the global batch, so each rank gathers the others' embeddings (:func:`gather_with_local_grad`:
its own rows keep their gradient) and computes the whole loss, then backprops ``loss * world``:
DDP's mean over ranks of those gradients equals the gradient one process computes on the global
batch. Only detached tensors cross ranks outside DDP (teacher rows, image ids, loss values).
Joining the process group, the rank's device, barrier and broadcast are ``edge_msd.torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from edge_msd.distill.text import encode_text
from edge_msd.torchrun import is_distributed, rank_world


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


def gather_with_local_grad(local: Tensor) -> Tensor:
    """All ranks' rows in rank order; this rank's rows are ``local`` itself, so they keep their gradient."""
    if not is_distributed():
        return local
    rank, _ = rank_world()
    full = gather_across_ranks(local)
    n = local.shape[0]
    return torch.cat([full[: rank * n], local, full[(rank + 1) * n :]])


def local_slice(global_n: int) -> slice:
    """This rank's rows of a global batch of ``global_n`` rows."""
    rank, world = rank_world()
    per = global_n // world
    return slice(rank * per, (rank + 1) * per)


@torch.no_grad()
def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` is left as it is)."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm for data-parallel training: on CUDA, SyncBatchNorm (statistics of the global batch);
    elsewhere SyncBatchNorm cannot run, so BatchNorm normalises with each rank's rows and
    :func:`average_batchnorm_stats` keeps the running statistics equal on all ranks."""
    if is_distributed() and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> None:
    """Average BatchNorm running means and variances over ranks (no-op on one rank or under SyncBN,
    whose statistics are already global)."""
    if not is_distributed():
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            for t in (m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(all_reduce_mean(t))


class StudentStep(nn.Module):
    """Both student towers and the adaptor in one forward, so that DDP's gradient hooks see them all."""

    def __init__(self, model: nn.Module, adaptor: nn.Module) -> None:
        super().__init__()
        self.model, self.adaptor = model, adaptor

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.adaptor(self.model.encode_image(images)), self.adaptor(encode_text(self.model, tokens))


def data_parallel(step: StudentStep, device: torch.device) -> nn.Module:
    """``step`` wrapped in DistributedDataParallel under torchrun (``step`` itself in one process).

    DDP copies rank 0's weights and buffers to every rank here. Buffers are not synced again at every
    forward: SyncBatchNorm keeps them equal on CUDA, :func:`average_batchnorm_stats` on the CPU. The
    towers never read ``logit_scale``, hence ``find_unused_parameters``.
    """
    if not is_distributed():
        return step
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        step, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=True
    )
