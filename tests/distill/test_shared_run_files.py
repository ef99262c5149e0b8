"""Several ranks, one run folder: rank 0 alone writes the shared files, and a resume with another number
of visible GPUs restores the generators it has instead of failing."""

from __future__ import annotations

import torch

from edge_msd.distill import checkpoint, run
from edge_msd.distill.config import DistillConfig


def test_resume_with_fewer_visible_gpus_restores_the_generators_it_has(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((int(s[0]), i)))
    state = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([k], dtype=torch.uint8) for k in range(4)]}
    checkpoint.set_rng_state(state)  # saved on 4 GPUs, resumed on 2
    assert restored == [(0, 0), (1, 1)]


def test_only_rank_0_writes_eval_json(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(run, "train", lambda cfg: "trained")
    monkeypatch.setattr(run, "write_eval", lambda cfg, result: written.append(result) or {"ok": 1})
    cfg = DistillConfig(out=str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert run.run_distill(cfg) == {} and written == []
    monkeypatch.setenv("RANK", "0")
    assert run.run_distill(cfg) == {"ok": 1} and written == ["trained"]
