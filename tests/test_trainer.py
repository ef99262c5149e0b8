"""The distillation trainer on a tiny dataset and a tiny cache: runs, resumes exactly, refuses bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_msd.config import build_config
from edge_msd.data import open_dataset
from edge_msd.distill import trainer as trainer_mod
from edge_msd.distill.config import KNOWN_LOSSES, DistillConfig
from edge_msd.distill.losses import LOSS_NAMES
from edge_msd.distill.run import evaluate_model, write_eval
from edge_msd.distill.trainer import Schedule, train
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.students import load_student
from edge_msd.teachers.cache import build_feature_cache

DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"


class TinyTeacher:
    """A stand-in teacher: fixed random projections of pixels and of hashed words (fast, deterministic)."""

    embed_dim = 32

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.id = f"tiny-teacher-{seed}"
        self.w_img = torch.randn(3 * 8 * 8, self.embed_dim, generator=g)
        self.w_txt = torch.randn(512, self.embed_dim, generator=g)

    def preprocess(self, image):
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255)
        return x.permute(2, 0, 1)

    def tokenize(self, texts):
        out = torch.zeros(len(texts), 512)
        for i, t in enumerate(texts):
            for w in t.lower().replace(";", " ").replace(",", " ").split():
                out[i, sum(map(ord, w)) * 31 % 512] += 1
        return out

    def encode_image(self, images):
        return F.normalize(images.flatten(1) @ self.w_img, dim=-1)

    def encode_text(self, tokens):
        return F.normalize(tokens @ self.w_txt, dim=-1)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features")
    teacher = TinyTeacher()
    for split in ("train", "val", "test"):
        build_feature_cache(teacher, open_dataset(DATA, split), root / split, progress=False)
    return root


def tiny_cfg(features: Path, out: Path, **kw) -> DistillConfig:
    base = dict(
        teacher=None,
        data=DATA,
        features=str(features),
        out=str(out),
        preset="edge-xs",
        test_split=None,
        steps=6,
        batch_size=8,
        queue_size=32,
        warmup_steps=2,
        eval_every=3,
        ckpt_every=2,
        lr=1e-3,
        augment=True,  # off by default; on here so that resume equality covers its RNG
    )
    base.update(kw)
    return build_config(DistillConfig, base)


def test_loss_names_in_step():
    assert tuple(KNOWN_LOSSES) == tuple(LOSS_NAMES)


def test_tiny_run_writes_student_metrics_plot_eval(features, tmp_path):
    cfg = tiny_cfg(features, tmp_path / "run", embed_dim=16, test_split="test")  # 16 != 32: adaptor
    res = train(cfg, progress=False)
    assert res.steps == 6 and res.skipped_steps == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "losses" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert set(steps[0]["losses"]) == {"contrastive", "feature", "similarity", "hard_negative"}
    assert set(steps[0]["weights"]) == set(steps[0]["losses"]) and steps[0]["samples_per_s"] > 0
    assert [r["step"] for r in records if "val" in r] == [3, 6]
    assert (tmp_path / "run" / "losses.png").stat().st_size > 1000
    loaded = load_student(tmp_path / "run" / "student")
    assert loaded.model.text_projection.shape[1] == 16  # the adaptor is training-only
    assert res.best_val_rsum is not None and res.val["rsum"] == res.best_val_rsum

    report = write_eval(cfg, res)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report)) and saved["split"] == "test"
    for side in ("teacher", "student"):
        assert set(saved[side]["i2t"]) == set(saved[side]["t2i"]) == {"R@1", "R@5", "R@10"}
        assert saved[side]["n_images"] == 16 and "unseen_pairs_mean_R@1" in saved[side]
    assert saved["student"]["params"] == sum(p.numel() for p in loaded.model.parameters())
    assert saved["teacher"]["params"] is None  # the stand-in teacher was not loaded (no --teacher)

    metrics = evaluate_model(str(tmp_path / "run" / "student"), DATA, "test")
    assert metrics["kind"] == "student (edge-xs)"
    assert metrics["i2t"]["R@1"] == pytest.approx(saved["student"]["i2t"]["R@1"])


@pytest.mark.parametrize("preset", ["edge-xs", "edge-s"])  # edge-s: BatchNorm statistics resume too
def test_resume_ends_with_same_weights(features, tmp_path, preset):
    full = train(tiny_cfg(features, tmp_path / "a", preset=preset), progress=False)

    class Killed(Exception):
        pass

    def kill_at_3(step, model):
        if step == 3:
            raise Killed  # after the step-2 checkpoint, mid-epoch: step 3 is lost and redone

    with pytest.raises(Killed):
        train(tiny_cfg(features, tmp_path / "b", preset=preset), on_step=kill_at_3, progress=False)
    resumed = train(tiny_cfg(features, tmp_path / "b", preset=preset, resume=True), progress=False)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in ma]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in mb]


def test_existing_run_needs_resume_or_force(features, tmp_path):
    train(tiny_cfg(features, tmp_path / "r", steps=2, val_split=None), progress=False)
    with pytest.raises(ArtifactError, match="--resume"):
        train(tiny_cfg(features, tmp_path / "r", steps=2, val_split=None), progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        train(
            tiny_cfg(features, tmp_path / "r", steps=2, val_split=None, lr=0.5, resume=True), progress=False
        )


def test_nan_step_skipped_and_counted(features, tmp_path, monkeypatch):
    real = trainer_mod.distill_losses
    calls = {"n": 0}

    def flaky(*args, **kw):
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            return {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(trainer_mod, "distill_losses", flaky)
    res = train(tiny_cfg(features, tmp_path / "n", steps=4, val_split=None), progress=False)
    assert res.steps == 4 and res.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    records = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, False, False]


def test_too_many_nan_steps_is_a_clear_error(features, tmp_path, monkeypatch):
    real = trainer_mod.distill_losses
    monkeypatch.setattr(
        trainer_mod, "distill_losses", lambda *a, **k: {n: v * float("nan") for n, v in real(*a, **k).items()}
    )
    with pytest.raises(trainer_mod.NonFiniteLossError, match="3 steps in a row"):
        train(tiny_cfg(features, tmp_path / "m", max_bad_steps=3, val_split=None), progress=False)


def test_foreign_cache_refused(features, tmp_path):
    other = tmp_path / "feat"
    other.mkdir()
    (other / "train").symlink_to(features / "train")
    build_feature_cache(TinyTeacher(seed=1), open_dataset(DATA, "val"), other / "val", progress=False)
    with pytest.raises(ArtifactError, match="teacher"):
        train(tiny_cfg(other, tmp_path / "o"), progress=False)
    wrong_data = tmp_path / "feat2"
    (wrong_data / "val").mkdir(parents=True)
    (wrong_data / "train").symlink_to(features / "val")  # val embeddings where train should be
    with pytest.raises(ArtifactError, match="another dataset"):
        train(tiny_cfg(wrong_data, tmp_path / "o2", val_split=None), progress=False)


def test_bad_config_errors(features, tmp_path):
    with pytest.raises(ConfigError, match="known: edge-xs, edge-s, edge-m"):
        train(tiny_cfg(features, tmp_path / "p", preset="edge-q"), progress=False)
    with pytest.raises(ConfigError, match="unknown loss.*known: contrastive"):
        tiny_cfg(features, tmp_path / "p", losses=["contrastive", "focal"])
    with pytest.raises(ConfigError, match="queue_size 4 cannot take a batch of 8"):
        train(tiny_cfg(features, tmp_path / "p", queue_size=4), progress=False)


def test_schedule_covers_each_image_once_per_epoch_and_depends_on_step_only():
    cap_img = np.repeat(np.arange(10), 2)
    s = Schedule(np.ones(10, bool), cap_img, batch=3, captions_per_image=2, seed=0)
    seen = np.concatenate([s.step(i)[0] for i in range(s.steps_per_epoch)])
    assert len(set(seen.tolist())) == 9  # 3 steps of 3, no repeats; the remainder is dropped
    imgs, caps, cap_ids = s.step(4)
    assert np.array_equal(cap_img[caps], cap_ids) and np.array_equal(np.repeat(imgs, 2), cap_ids)
    again = Schedule(np.ones(10, bool), cap_img, batch=3, captions_per_image=2, seed=0).step(4)
    assert all(np.array_equal(x, y) for x, y in zip((imgs, caps, cap_ids), again, strict=True))


def test_distill_config_replace_validates(features, tmp_path):
    cfg = tiny_cfg(features, tmp_path)
    with pytest.raises(ConfigError, match="divisible"):
        replace(cfg, accum_steps=3).validate()


def _ddp_worker(rank: int, features: str, out: str, port: int) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(tiny_cfg(Path(features), Path(out), steps=3, val_split=None), progress=False)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(features, tmp_path):
    import socket

    import torch.multiprocessing as mp

    one = train(tiny_cfg(features, tmp_path / "one", steps=3, val_split=None), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(features), str(tmp_path / "two"), port), nprocs=2, join=True)
    two = load_student(tmp_path / "two" / "student").model.state_dict()
    for k, v in one.model.state_dict().items():
        assert torch.allclose(v, two[k], atol=1e-5, rtol=1e-4), k
