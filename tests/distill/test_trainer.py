"""The distillation trainer on a tiny dataset and a tiny cache: runs, resumes exactly, refuses bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_helpers import TinyTeacher

from edge_msd.config import build_config
from edge_msd.data import open_dataset
from edge_msd.distill import trainer as trainer_mod
from edge_msd.distill.checkpoint import LAST_KEYS, load_checkpoint
from edge_msd.distill.config import KNOWN_LOSSES, DistillConfig
from edge_msd.distill.ema import student_ema, warmed_decay
from edge_msd.distill.images import ImageStore
from edge_msd.distill.losses import LOSS_NAMES
from edge_msd.distill.run import evaluate_model, write_eval
from edge_msd.distill.schedule import Schedule
from edge_msd.distill.trainer import train
from edge_msd.errors import ArtifactError, BadSampleError, ConfigError
from edge_msd.students import create_student, load_open_clip_student
from edge_msd.teachers.cache import build_feature_cache

DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"


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


@pytest.mark.slow
def test_tiny_run_writes_student_metrics_plot_eval(features, tmp_path):
    cfg = tiny_cfg(features, tmp_path / "run", embed_dim=16, test_split="test")  # 16 != 32: adaptor
    res = train(cfg, progress=False)
    assert res.steps == 6 and res.skipped_steps == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "losses" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert set(steps[0]["losses"]) == {"contrastive", "hard_negative", "affinity"}
    assert set(steps[0]["weights"]) == set(steps[0]["losses"]) and steps[0]["samples_per_s"] > 0
    assert [r["step"] for r in records if "val" in r] == [3, 6]
    assert (tmp_path / "run" / "losses.png").stat().st_size > 1000
    loaded = load_open_clip_student(tmp_path / "run" / "student")
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


# edge-s: BatchNorm statistics resume too; ema_decay: the weight average resumes too
@pytest.mark.slow
@pytest.mark.parametrize("preset,ema_decay", [("edge-xs", 0.0), ("edge-s", 0.0), ("edge-s", 0.9)])
def test_resume_ends_with_same_weights(features, tmp_path, preset, ema_decay):
    full = train(tiny_cfg(features, tmp_path / "a", preset=preset, ema_decay=ema_decay), progress=False)

    class Killed(Exception):
        pass

    def kill_at_3(step, model):
        if step == 3:
            raise Killed  # after the step-2 checkpoint, mid-epoch: step 3 is lost and redone

    with pytest.raises(Killed):
        train(tiny_cfg(features, tmp_path / "b", preset=preset, ema_decay=ema_decay), on_step=kill_at_3,
              progress=False)
    resumed = train(tiny_cfg(features, tmp_path / "b", preset=preset, ema_decay=ema_decay, resume=True),
                    progress=False)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True) for r in "ab")
    assert last_a["ema"].keys() == last_b["ema"].keys() and bool(last_a["ema"]) == (ema_decay > 0)
    assert all(torch.equal(last_a["ema"][k], last_b["ema"][k]) for k in last_a["ema"])
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in ma]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"} for x in mb]


def test_ema_weights_follow_the_warmed_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = student_ema(model, decay=0.25)
    history = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step + 1))
        model(torch.randn(5, 3))  # moves BatchNorm's running statistics
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update_parameters(model)
    # update 1 copies; update n + 1 keeps min(0.25, (1 + n) / (10 + n)) of the average
    assert [warmed_decay(0.25, n) for n in (1, 2, 3)] == [2 / 11, 0.25, 0.25]
    for name in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
        expected = history[0][name]
        for n, state in enumerate(history[1:], start=1):
            d = warmed_decay(0.25, n)
            expected = d * expected + (1 - d) * state[name]
        assert torch.allclose(ema.module.state_dict()[name], expected, atol=1e-6), name
    assert not torch.allclose(ema.module[0].weight, model[0].weight)


def test_ema_model_embeds_like_a_model_loaded_with_its_weights():
    """Buffers outside the state dict (the text tower's -inf causal mask) must stay intact."""
    model = create_student("edge-xs", embed_dim=16)
    ema = student_ema(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        ema.update_parameters(model)
    loaded = create_student("edge-xs", embed_dim=16)
    loaded.load_state_dict(ema.module.state_dict())
    tokens = torch.randint(1, 1000, (4, 32))
    ema.module.eval(), loaded.eval()
    with torch.no_grad():
        out, expected = ema.module.encode_text(tokens), loaded.encode_text(tokens)
    assert torch.isfinite(out).all() and torch.allclose(out, expected)


@pytest.mark.slow
def test_ema_run_saves_the_averaged_weights(features, tmp_path):
    res = train(tiny_cfg(features, tmp_path / "e", ema_decay=0.9, val_split=None), progress=False)
    last = torch.load(tmp_path / "e" / "checkpoints" / "last.pt", weights_only=True)
    saved = load_open_clip_student(tmp_path / "e" / "student").model.state_dict()
    ema_weights = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(saved[k], ema_weights[k]) for k in saved)
    assert any(not torch.equal(saved[k], last["model"][k]) for k in saved)  # not the raw weights
    assert res.model.state_dict().keys() == saved.keys()


def test_existing_run_needs_resume_or_force(features, tmp_path):
    train(tiny_cfg(features, tmp_path / "r", steps=2, val_split=None), progress=False)
    with pytest.raises(ArtifactError, match="--resume"):
        train(tiny_cfg(features, tmp_path / "r", steps=2, val_split=None), progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        train(
            tiny_cfg(features, tmp_path / "r", steps=2, val_split=None, lr=0.5, resume=True), progress=False
        )


@pytest.mark.slow
def test_force_rerun_that_fails_before_training_keeps_the_old_run(features, tmp_path):
    """--force clears the old run only once the new one can train: a rerun whose data or student
    cannot be opened leaves the old checkpoints, metrics and config as they were."""
    out = tmp_path / "r"
    train(tiny_cfg(features, out, steps=2, eval_every=2), progress=False)
    names = ("metrics.jsonl", "config.json", "config.toml", "checkpoints/last.pt", "checkpoints/best.pt")

    def contents() -> dict[str, bytes | None]:
        return {n: (out / n).read_bytes() if (out / n).is_file() else None for n in names}

    kept = contents()
    foreign = tmp_path / "feat"
    foreign.mkdir()
    (foreign / "train").symlink_to(features / "train")
    build_feature_cache(TinyTeacher(seed=1), open_dataset(DATA, "val"), foreign / "val", progress=False)
    with pytest.raises(ArtifactError, match="teacher"):  # the val cache fails when it is opened
        train(tiny_cfg(foreign, out, steps=3, force=True), progress=False)
    with pytest.raises(ConfigError, match="known: edge-xs"):
        train(tiny_cfg(features, out, steps=3, preset="edge-q", force=True), progress=False)
    assert contents() == kept
    assert load_checkpoint(out / "checkpoints" / "last.pt", LAST_KEYS)["state"]["step"] == 2
    assert load_checkpoint(out / "checkpoints" / "best.pt", ("model", "val"))["step"] == 2

    train(tiny_cfg(features, out, steps=3, eval_every=3, force=True), progress=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "losses" in r] == [1, 2, 3]  # the old run's records are gone
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    assert load_checkpoint(out / "checkpoints" / "best.pt", ("model", "val"))["step"] == 3


@pytest.mark.slow
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
    assert [r["skipped"] for r in records if "losses" in r] == [False, True, False, False]


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
    with pytest.raises(ConfigError, match="field 'ema_decay': expected 0 .* got 1.0"):
        tiny_cfg(features, tmp_path / "p", ema_decay=1.0)


def test_schedule_covers_each_image_once_per_epoch_and_depends_on_step_only():
    cap_img = np.repeat(np.arange(10), 2)
    s = Schedule(np.ones(10, bool), cap_img, batch=3, captions_per_image=2, seed=0)
    seen = np.concatenate([s.step(i)[0] for i in range(s.steps_per_epoch)])
    assert len(set(seen.tolist())) == 9  # 3 steps of 3, no repeats; the remainder is dropped
    imgs, caps, cap_ids = s.step(4)
    assert np.array_equal(cap_img[caps], cap_ids) and np.array_equal(np.repeat(imgs, 2), cap_ids)
    again = Schedule(np.ones(10, bool), cap_img, batch=3, captions_per_image=2, seed=0).step(4)
    assert all(np.array_equal(x, y) for x, y in zip((imgs, caps, cap_ids), again, strict=True))


def test_training_batches_are_normalised_as_validation_normalises(features, tmp_path):
    """The in-place normalisation of a training batch equals, bit for bit, the out-of-place one that
    validation and eval apply to the same uint8 images."""
    cfg = tiny_cfg(features, tmp_path / "n", augment=False)
    run = trainer_mod.prepare_run(cfg, tmp_path / "n", torch.device("cpu"))
    _, mean, std = run.data.preprocess
    imgs = run.batches.schedule.step(3)[0]
    expected = (run.data.train.images.get(imgs).float() / 255 - mean) / std
    assert torch.equal(run.batches(3)[0], expected)


def test_distill_config_replace_validates(features, tmp_path):
    cfg = tiny_cfg(features, tmp_path)
    with pytest.raises(ConfigError, match="divisible"):
        replace(cfg, accum_steps=3).validate()


def _ddp_worker(rank: int, features: str, out: str, port: int) -> None:
    import os

    import edge_msd.teachers

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    edge_msd.teachers.load_teacher = lambda spec, device="cpu": TinyTeacher()
    train(tiny_cfg(Path(features), Path(out), teacher="tiny", steps=3, eval_every=3), progress=False)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(features, tmp_path):
    """DDP on 2 gloo processes equals 1 process (LayerNorm student); each rank builds part of a cache."""
    import socket

    import torch.multiprocessing as mp

    one = train(tiny_cfg(features, tmp_path / "one", steps=3, eval_every=3), progress=False)
    two_features = tmp_path / "features"
    two_features.mkdir()
    (two_features / "train").symlink_to(features / "train")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(two_features), str(tmp_path / "two"), port), nprocs=2, join=True)
    val_cache = json.loads((two_features / "val" / "manifest.json").read_text())
    assert val_cache["build"]["world_size"] == 2
    assert _shard_bytes(two_features / "val") == _shard_bytes(features / "val")
    two = load_open_clip_student(tmp_path / "two" / "student").model.state_dict()
    for k, v in one.model.state_dict().items():
        assert torch.allclose(v, two[k], atol=1e-5, rtol=1e-4), k


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    files = sorted([*cache.glob("*.npy"), *cache.glob("*/*.npy")])  # the joined rows and the index
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in files}


@pytest.mark.slow
def test_building_a_missing_cache_does_not_change_the_run(features, tmp_path, monkeypatch):
    import edge_msd.teachers

    monkeypatch.setattr(edge_msd.teachers, "load_teacher", lambda spec, device="cpu": TinyTeacher())
    partial = tmp_path / "features"
    partial.mkdir()
    (partial / "train").symlink_to(features / "train")  # val and test are built inside the second run
    runs = {}
    for name, root in (("prebuilt", features), ("built", partial)):
        cfg = tiny_cfg(root, tmp_path / name, teacher="tiny", steps=3, test_split="test")
        runs[name] = train(cfg, progress=False)
        write_eval(cfg, runs[name])
    assert (partial / "val" / "manifest.json").is_file() and (partial / "test" / "manifest.json").is_file()
    a, b = runs["prebuilt"].model.state_dict(), runs["built"].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [(tmp_path / n / "student" / "open_clip_model.safetensors").read_bytes() for n in runs]
    assert weights[0] == weights[1]
    evals = [json.loads((tmp_path / n / "eval.json").read_text()) for n in runs]
    assert evals[0]["student"] == evals[1]["student"]


def _write_png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def bad_csv(tmp_path_factory) -> tuple[str, Path]:
    """A CSV dataset whose train split has a corrupt image and a missing file, and whose test split
    has a corrupt image; its feature caches built with skip_bad (as `features --skip-bad` does)."""
    root = tmp_path_factory.mktemp("csv")
    rows = ["filepath,title,split"]
    sizes = {"train": 20, "val": 8, "test": 8}
    for split, n in sizes.items():
        for i in range(n):
            name = f"{split}{i:02d}.png"
            _write_png(root / name, len(rows))
            rows += [f"{name},a photo number {i} of {split},{split}", f"{name},picture {i} {split},{split}"]
    (root / "train03.png").write_bytes((root / "train03.png").read_bytes()[:40])  # truncated
    (root / "test05.png").write_bytes(b"not a png at all")
    rows.append("train99.png,an image that is not there,train")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    spec = f"csv:{root / 'pairs.csv'}"
    features = root / "features"
    for split in sizes:
        dataset = open_dataset(spec, split, skip_bad=True)
        build_feature_cache(TinyTeacher(), dataset, features / split, skip_bad=True, progress=False)
    return spec, features


@pytest.mark.slow
def test_distill_from_a_skip_bad_cache_leaves_bad_images_out(bad_csv, tmp_path):
    spec, features = bad_csv
    with pytest.raises(BadSampleError):  # what the trainer would hit if it read every image again
        open_dataset(spec, "train", skip_bad=True).load_image(3)
    cfg = tiny_cfg(features, tmp_path / "run", data=spec, steps=4, eval_every=2, test_split="test",
                   predecode_mb=0)  # decode per batch: a bad image would be read if it were scheduled
    res = train(cfg, progress=False)
    assert res.steps == 4 and res.skipped_steps == 0
    counts = {"train": {"bad_images": 1, "dropped_when_read": 1},
              "val": {"bad_images": 0, "dropped_when_read": 0}}
    assert res.skipped_data == counts
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "skipped_data": counts}
    report = write_eval(cfg, res)
    assert report["skipped_data"]["test"] == {"bad_images": 1, "dropped_when_read": 0}
    assert report["student"]["n_images"] == report["teacher"]["n_images"] == 7  # 8 test images, 1 bad


def test_skip_bad_cache_excludes_bad_images_from_the_image_store(bad_csv):
    spec, features = bad_csv
    from edge_msd.teachers.cache import FeatureCache

    cache = FeatureCache.open(features / "train")
    dataset = open_dataset(spec, "train", skip_bad=True)
    store = ImageStore(dataset, cache.valid_images, lambda im: np.asarray(im), 24, 64, 0, "")
    assert store.array is not None and len(store.array) == dataset.n_images - 1
    with pytest.raises(ValueError, match=r"\[3\] were marked bad"):
        store.get(np.array([2, 3]))


@pytest.fixture()
def stopped_run(features, tmp_path) -> tuple[DistillConfig, Path]:
    """A finished 2-step run and the config that resumes it (which loads its checkpoint first)."""
    train(tiny_cfg(features, tmp_path / "r", steps=2, val_split=None), progress=False)
    resume = tiny_cfg(features, tmp_path / "r", steps=2, val_split=None, resume=True)
    return resume, tmp_path / "r" / "checkpoints" / "last.pt"


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "random", "pickle payload", "wrong keys", "other file"])
def test_damaged_or_hostile_checkpoint_is_a_one_line_error(stopped_run, damage, monkeypatch, tmp_path):
    import pickle

    cfg, last = stopped_run
    monkeypatch.chdir(tmp_path)
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "random":
        last.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "pickle payload":
        last.write_bytes(pickle.dumps({"model": _Payload()}, protocol=2))  # torch.load's own protocol
    elif damage == "wrong keys":
        ck = torch.load(last, weights_only=True)
        ck["model"].pop(next(iter(ck["model"])))
        ck["model"]["extra.weight"] = torch.zeros(2)
        torch.save(ck, last)
    else:
        torch.save({"weights": torch.zeros(3)}, last)
    with pytest.raises(ArtifactError) as e:
        train(cfg, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{last}: ") and "--force" in message
    expected = {"truncated": "damaged: PytorchStreamReader", "random": "damaged: Unsupported operand",
                "pickle payload": "refused, it could run code (Trying to load unsupported GLOBAL ",
                "wrong keys": "does not fit this run's model (missing ", "other file": "no model, adaptor"}
    assert expected[damage] in message
    assert not (tmp_path / "PWNED").exists()
