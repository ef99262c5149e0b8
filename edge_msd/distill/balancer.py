"""Loss balancers: turn the dict of losses into one total, and say which weights they used.

Every balancer is an ``nn.Module`` whose ``forward(losses)`` returns ``(total, weights)``; its state
(statistics, learnt parameters) is in ``state_dict`` so that a resumed run continues exactly.
A loss that is NaN or inf gets weight 0 and never enters any statistics, and the total of that
step is NaN: the trainer skips and counts the step instead of silently training without the loss.
The weights stay finite either way, so they can be logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from edge_msd.distill.dist import all_reduce_mean
from edge_msd.errors import ArtifactError, ConfigError


class _Balancer(nn.Module):
    """Loss names, their checks, and the names stored in the state for a safe resume."""

    def __init__(self, loss_names: list[str]):
        super().__init__()
        if not loss_names or len(set(loss_names)) != len(loss_names):
            raise ConfigError(f"a balancer needs distinct loss names, got {loss_names!r}")
        self.loss_names = list(loss_names)

    def _values(self, losses: dict[str, Tensor]) -> list[Tensor]:
        if set(losses) != set(self.loss_names):
            raise ValueError(f"balancer expects losses {self.loss_names}, got {sorted(losses)}")
        return [losses[n] for n in self.loss_names]

    @staticmethod
    def _sum_finite(values: list[Tensor], terms: list[Tensor]) -> Tensor:
        """Sum of the terms; NaN (no graph) when any loss is not finite: the step must be skipped."""
        if not all(bool(torch.isfinite(v.detach())) for v in values):
            return torch.full((), float("nan"), device=values[0].device)
        return torch.stack(terms).sum()

    @staticmethod
    def _zero_nonfinite(values: list[Tensor], weights: list[float]) -> list[float]:
        return [w if bool(torch.isfinite(v.detach())) else 0.0 for v, w in zip(values, weights, strict=True)]

    def get_extra_state(self) -> dict[str, Any]:
        return {"loss_names": self.loss_names}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["loss_names"]) != self.loss_names:
            raise ArtifactError(f"balancer state is for losses {state['loss_names']}, this run has "
                                f"{self.loss_names}: resume with the same losses enabled")


class DynamicBalancer(_Balancer):
    """DSMD dynamic self-adaptive weights: magnitude equalisation × rate of change.

    w_i = (mean_j L_j / L_i) · n · softmax_i(r / temperature), with r_i = L_i / EMA_i the ratio of
    the RAW loss to its exponential average over earlier steps: a loss that stops falling (r → 1)
    gains weight over one that keeps falling (r < 1). (The public code takes the rate of the
    equalised losses, which are all equal, so its rate term is constant.) Weights come from
    detached values: no gradient flows through them. During ``warmup_steps`` all weights are 1
    while the averages fill. A loss of 0, NaN or inf gets weight 0; only finite losses update the
    averages. Under ``torch.distributed`` the loss values are averaged over ranks first, so all
    ranks use the same weights and keep the same state.
    """

    ema: Tensor
    seen: Tensor
    step: Tensor

    def __init__(self, loss_names: list[str], temperature: float = 1.0, warmup_steps: int = 10,
                 ema_decay: float = 0.9):
        super().__init__(loss_names)
        if not 0 < temperature < float("inf"):
            raise ConfigError(f"balancer temperature must be positive, got {temperature}")
        if warmup_steps < 0:
            raise ConfigError(f"balancer warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 <= ema_decay < 1:
            raise ConfigError(f"balancer ema_decay must be in [0, 1), got {ema_decay}")
        self.temperature, self.warmup_steps, self.ema_decay = temperature, warmup_steps, ema_decay
        n = len(loss_names)
        self.register_buffer("ema", torch.zeros(n, dtype=torch.float64))  # EMA of each raw loss
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))  # has the EMA a value yet
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def _weights(self, raw: Tensor) -> Tensor:
        finite = torch.isfinite(raw)
        usable = finite & (raw > 0)
        n = int(usable.sum())
        weights = torch.zeros_like(raw)
        if int(self.step) < self.warmup_steps:
            weights[usable] = 1.0
        elif n:
            loss = raw[usable]
            magnitude = loss.mean() / loss
            ema = self.ema[usable]
            has_rate = self.seen[usable] & (ema > 0)
            ratio = torch.where(has_rate, loss / torch.where(has_rate, ema, 1.0), 1.0)
            rate = n * torch.softmax(ratio / self.temperature, dim=0)
            weights[usable] = magnitude * rate
        # Only finite values enter the averages; a loss seen for the first time starts its EMA.
        d = self.ema_decay
        updated = torch.where(self.seen, d * self.ema + (1 - d) * raw, raw)
        self.ema.copy_(torch.where(finite, updated, self.ema))
        self.seen |= finite
        self.step += 1
        return weights

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = self._values(losses)
        raw = torch.stack([v.detach().to(torch.float64) for v in values])
        raw = all_reduce_mean(raw).to(self.ema.device)
        weights = self._weights(raw).tolist()
        total = self._sum_finite(values, [w * v for v, w in zip(values, weights, strict=True)])
        return total, dict(zip(self.loss_names, weights, strict=True))


class FixedBalancer(_Balancer):
    """Hand-set constant weights (``make_balancer('fixed', names)`` gives equal weights of 1)."""

    weights: Tensor

    def __init__(self, weights: dict[str, float]):
        super().__init__(list(weights))
        bad = {k: w for k, w in weights.items() if not 0 <= w < float("inf")}
        if bad:
            raise ConfigError(f"fixed loss weights must be finite and >= 0, got {bad}")
        self.register_buffer("weights", torch.tensor([float(weights[n]) for n in self.loss_names]))

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = self._values(losses)
        used = self._zero_nonfinite(values, self.weights.tolist())
        total = self._sum_finite(values, [w * v for v, w in zip(values, used, strict=True)])
        return total, dict(zip(self.loss_names, used, strict=True))


class UncertaintyBalancer(_Balancer):
    """Kendall et al. 2018 homoscedastic-uncertainty weighting: Σ exp(−s_i) L_i + s_i.

    ``log_vars`` (s_i) are learnt: the trainer must add this module's parameters to its optimizer.
    """

    def __init__(self, loss_names: list[str]):
        super().__init__(loss_names)
        self.log_vars = nn.Parameter(torch.zeros(len(loss_names)))

    def forward(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = self._values(losses)
        terms = [torch.exp(-s) * v + s for v, s in zip(values, self.log_vars, strict=True)]
        weights = self._zero_nonfinite(values, torch.exp(-self.log_vars.detach()).tolist())
        return self._sum_finite(values, terms), dict(zip(self.loss_names, weights, strict=True))


BALANCERS = {"dynamic": DynamicBalancer, "fixed": FixedBalancer, "uncertainty": UncertaintyBalancer}


def make_balancer(name: str, loss_names: list[str], **kw: Any) -> nn.Module:
    """Build a balancer by name; ``fixed`` takes ``weights=`` (missing names get 1.0)."""
    if name not in BALANCERS:
        raise ConfigError(f"unknown balancer {name!r}; known: {', '.join(BALANCERS)}")
    try:
        if name == "fixed":
            weights = dict(kw.pop("weights", None) or {})
            unknown = sorted(set(weights) - set(loss_names))
            if unknown:
                raise ConfigError(f"fixed weights name losses that are not enabled: {', '.join(unknown)}; "
                                  f"enabled: {', '.join(loss_names)}")
            if kw:
                raise TypeError(f"unexpected options {sorted(kw)}")
            return FixedBalancer({n: float(weights.get(n, 1.0)) for n in loss_names})
        return BALANCERS[name](loss_names, **kw)
    except TypeError as e:
        raise ConfigError(f"balancer {name!r}: {e}") from e
