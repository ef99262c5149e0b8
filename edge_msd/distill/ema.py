"""Exponential moving average of the student's weights (and BatchNorm statistics), the model that is
validated and saved when ``ema_decay`` > 0.

torch's ``AveragedModel`` does the bookkeeping; the decay warms up as in timm's ModelEmaV2,
``min(decay, (1 + n) / (10 + n))`` after n updates, so that the random initialisation is forgotten
within the first steps of a short run.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def warmed_decay(decay: float, n_averaged: int) -> float:
    """The decay of update number ``n_averaged`` + 1 (the first update copies the weights)."""
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def student_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An averaged copy of ``model`` whose ``update_parameters(model)`` moves it ``1 - decay`` of the way."""

    def ema_update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        d = warmed_decay(decay, int(n_averaged))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                # Constants such as the text tower's causal mask hold -inf, which lerp turns into NaN.
                a.copy_(torch.where(torch.isfinite(c), torch.lerp(a, c, 1 - d), c))
            else:  # BatchNorm's step counter
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
