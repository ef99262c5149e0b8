"""Loss balancers: dynamic (DSMD), fixed, uncertainty (Kendall et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch

from edge_msd.distill.balancer import DynamicBalancer, FixedBalancer, UncertaintyBalancer, make_balancer
from edge_msd.errors import ArtifactError, ConfigError


def as_losses(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(float(v)) for k, v in values.items()}


def test_magnitudes_are_equalised_when_rates_are_equal():
    bal = DynamicBalancer(["a", "b", "c"], warmup_steps=0)
    for _ in range(5):  # constant losses: every rate is 1, only magnitudes differ
        total, w = bal(as_losses(a=10.0, b=0.1, c=1.0))
    mean = (10.0 + 0.1 + 1.0) / 3
    assert w["a"] * 10.0 == pytest.approx(mean) and w["b"] * 0.1 == pytest.approx(mean)
    assert w["c"] * 1.0 == pytest.approx(mean)
    assert total.item() == pytest.approx(3 * mean)


def test_a_loss_that_stops_falling_gains_weight():
    """Both losses fall 5% a step; from step 40 'b' stalls. Its share of the total grows.

    The rate is taken on RAW losses although their magnitudes differ 100x: with the public
    code's rate of equalised losses both shares would stay at exactly 1/2.
    """
    bal = DynamicBalancer(["a", "b"], temperature=0.1, warmup_steps=5)
    shares = []
    for t in range(80):
        a, b = 100 * 0.95**t, 0.95 ** min(t, 40)
        _, w = bal(as_losses(a=a, b=b))
        shares.append(w["b"] * b / (w["a"] * a + w["b"] * b))
    assert shares[0] == pytest.approx(1 / (100 + 1))  # warmup: plain sum
    assert shares[39] == pytest.approx(0.5, abs=1e-6)  # equal rates: equal shares
    assert shares[79] > 0.8  # the stalled loss gets the larger share
    assert all(later >= earlier - 1e-9 for earlier, later in zip(shares[40:], shares[41:], strict=False))


def test_weights_carry_no_gradient():
    bal = DynamicBalancer(["a", "b"], warmup_steps=0)
    bal(as_losses(a=2.0, b=1.0))
    a, b = torch.tensor(4.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    total, w = bal({"a": a, "b": b})
    total.backward()
    # d total / d L_i is the weight itself: the weights were computed from detached values.
    assert a.grad.item() == pytest.approx(w["a"]) and b.grad.item() == pytest.approx(w["b"])
    assert w["a"] != pytest.approx(w["b"])


def test_zero_nan_and_inf_losses_get_weight_zero_and_do_not_poison_the_state():
    bal = DynamicBalancer(["a", "b", "c", "d"], warmup_steps=0)
    for _ in range(3):
        bal(as_losses(a=1.0, b=2.0, c=3.0, d=4.0))
    ema_before = bal.ema.clone()
    total, w = bal(as_losses(a=0.0, b=float("nan"), c=float("inf"), d=4.0))
    assert w["a"] == w["b"] == w["c"] == 0.0
    assert 0 < w["d"] < math.inf
    assert math.isnan(total.item())  # a non-finite loss: the trainer skips and counts this step
    assert torch.isfinite(bal.ema).all()
    assert bal.ema[1] == ema_before[1] and bal.ema[2] == ema_before[2]  # NaN / inf never entered
    a = torch.tensor(0.0, requires_grad=True)
    total, w = bal({"a": a, "b": torch.tensor(2.0), "c": torch.tensor(3.0), "d": torch.tensor(4.0)})
    assert w["a"] == 0.0 and all(0 < w[k] < math.inf for k in "bcd")  # a zero loss: weight 0, no inf
    assert math.isfinite(total.item())
    total.backward()
    assert a.grad.item() == 0.0
    _, w = bal(as_losses(a=1.0, b=2.0, c=3.0, d=4.0))  # back to normal: all weighted again
    assert all(0 < v < math.inf for v in w.values())


def test_warmup_gives_equal_weights():
    bal = DynamicBalancer(["a", "b"], warmup_steps=3)
    for _ in range(3):
        _, w = bal(as_losses(a=10.0, b=0.1))
        assert w == {"a": 1.0, "b": 1.0}
    _, w = bal(as_losses(a=10.0, b=0.1))
    assert w["b"] > w["a"]


def test_state_dict_resume_reproduces_the_weights():
    steps = [as_losses(a=3 * 0.9**t + 0.1 * (t % 3), b=1 / (t + 1)) for t in range(20)]
    full = DynamicBalancer(["a", "b"], temperature=0.5, warmup_steps=2)
    part = DynamicBalancer(["a", "b"], temperature=0.5, warmup_steps=2)
    for s in steps[:8]:
        full(s)
        part(s)
    resumed = DynamicBalancer(["a", "b"], temperature=0.5, warmup_steps=2)
    resumed.load_state_dict(part.state_dict())
    for s in steps[8:]:
        assert resumed(s)[1] == full(s)[1]
    with pytest.raises(ArtifactError, match="same losses"):
        DynamicBalancer(["a", "c"]).load_state_dict(part.state_dict())


def test_fixed_balancer():
    bal = FixedBalancer({"a": 2.0, "b": 0.5})
    total, w = bal(as_losses(a=1.0, b=4.0))
    assert total.item() == pytest.approx(4.0) and w == {"a": 2.0, "b": 0.5}
    total, w = bal(as_losses(a=1.0, b=float("nan")))
    assert math.isnan(total.item()) and w == {"a": 2.0, "b": 0.0}
    equal = make_balancer("fixed", ["a", "b"])
    assert equal(as_losses(a=1.0, b=4.0))[1] == {"a": 1.0, "b": 1.0}
    partial = make_balancer("fixed", ["a", "b"], weights={"b": 3.0})
    assert partial(as_losses(a=1.0, b=1.0))[1] == {"a": 1.0, "b": 3.0}
    with pytest.raises(ConfigError, match="not enabled"):
        make_balancer("fixed", ["a"], weights={"z": 1.0})
    with pytest.raises(ConfigError):
        FixedBalancer({"a": -1.0})


def test_uncertainty_balancer_learns_log_variances():
    bal = UncertaintyBalancer(["a", "b"])
    assert [n for n, _ in bal.named_parameters()] == ["log_vars"]
    total, w = bal(as_losses(a=4.0, b=0.5))
    assert total.item() == pytest.approx(4.5) and w == {"a": 1.0, "b": 1.0}  # s = 0: plain sum
    opt = torch.optim.SGD(bal.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        bal(as_losses(a=4.0, b=0.5))[0].backward()
        opt.step()
    # exp(-s) L + s is smallest at s = log L: the weight becomes 1 / L.
    assert bal.log_vars.tolist() == pytest.approx([math.log(4.0), math.log(0.5)], abs=1e-3)
    total, w = bal(as_losses(a=4.0, b=float("nan")))
    assert w["a"] == pytest.approx(0.25, abs=1e-3) and w["b"] == 0.0 and math.isnan(total.item())


def test_make_balancer_names_and_options():
    assert isinstance(make_balancer("dynamic", ["a"], temperature=2.0), DynamicBalancer)
    assert isinstance(make_balancer("uncertainty", ["a"]), UncertaintyBalancer)
    with pytest.raises(ConfigError, match="known: dynamic, fixed, uncertainty"):
        make_balancer("gradnorm", ["a"])
    with pytest.raises(ConfigError, match="balancer 'dynamic'"):
        make_balancer("dynamic", ["a"], temprature=2.0)
    for bad in ({"temperature": 0.0}, {"warmup_steps": -1}, {"ema_decay": 1.0}):
        with pytest.raises(ConfigError):
            make_balancer("dynamic", ["a"], **bad)
    with pytest.raises(ConfigError, match="distinct"):
        make_balancer("dynamic", ["a", "a"])
    with pytest.raises(ValueError, match="expects losses"):
        make_balancer("dynamic", ["a", "b"])(as_losses(a=1.0))
