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
    copied: set[int] = set()  # data pointers of the averaged tensors that are copied, not lerped

    def ema_update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        d = warmed_decay(decay, int(n_averaged))
        lerp = [i for i, a in enumerate(averaged) if a.data_ptr() not in copied]
        # One foreach call: the values of a per-tensor lerp, without a step's worth of Python per tensor.
        if lerp:  # torch groups the tensors by dtype: the int64 counters come alone
            torch._foreach_lerp_([averaged[i] for i in lerp], [current[i] for i in lerp], 1 - d)
        for a, c in zip(averaged, current, strict=True):
            if a.data_ptr() in copied:
                a.copy_(c)

    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
    # BatchNorm's step counter is copied, and so are constants that hold non-finite values (the text
    # tower's causal mask holds -inf, which lerp would turn into NaN).
    for t in (*ema.module.parameters(), *ema.module.buffers()):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            copied.add(t.data_ptr())
    return ema
