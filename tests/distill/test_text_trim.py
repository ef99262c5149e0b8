"""The student's text tower on captions trimmed to the batch's longest equals the full-length one."""

from __future__ import annotations

import torch

from edge_msd.distill.text import encode_text
from edge_msd.students import create_student


def _tokens(lengths: list[int], context: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):  # start-of-text, words, end-of-text (the highest id), then padding
        out[i, 0] = 49406
        out[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        out[i, n - 1] = 49407
    return out


def test_trimmed_text_tower_matches_values_and_gradients():
    torch.manual_seed(0)
    model = create_student("edge-xs").train().double()  # float64: equal up to rounding, not shapes' blocking
    tokens = _tokens([5, 12, 9, 3])
    full = model.encode_text(tokens)
    full.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trimmed = encode_text(model, tokens)
    trimmed.square().sum().backward()
    torch.testing.assert_close(trimmed, full, rtol=1e-9, atol=1e-12)
    params = dict(model.named_parameters())
    for name, g in grads.items():
        torch.testing.assert_close(params[name].grad, g, rtol=1e-7, atol=1e-10)


def test_full_length_and_other_towers_run_as_they_are():
    model = create_student("edge-xs").eval()
    tokens = _tokens([32, 4])  # one caption fills the context: nothing to trim
    torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), rtol=0, atol=0)
    model.text_pool_type = "last"  # pooling that reads a padding position: never trimmed
    short = _tokens([4, 6])
    torch.testing.assert_close(encode_text(model, short), model.encode_text(short), rtol=0, atol=0)
