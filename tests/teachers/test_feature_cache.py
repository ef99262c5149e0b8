"""Feature cache: layout, fp16 storage, resume after a crash, refusal of foreign caches, bad samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edge_msd.artifacts import sha256_file
from edge_msd.cli import main
from edge_msd.data.base import ImageTextDataset
from edge_msd.errors import ArtifactError, BadSampleError, ConfigError
from edge_msd.teachers.base import Teacher
from edge_msd.teachers.cache import FeatureCache, build_feature_cache
from edge_msd.torchrun import rank_device


class TinyTeacher(torch.nn.Module):
    """A random two-tower model implementing the Teacher protocol; counts its calls."""

    embed_dim = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.id = f"tiny-teacher-{seed}"
        self.img = torch.nn.Linear(3 * 8 * 8, self.embed_dim)
        self.txt = torch.nn.EmbeddingBag(256, self.embed_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.calls = {"image": 0, "text": 0}

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0)
        return x.permute(2, 0, 1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = [list(t.encode("utf-8")[:16].ljust(16, b"\0")) for t in texts]
        return torch.tensor(ids, dtype=torch.int64)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls["image"] += 1
        return torch.nn.functional.normalize(self.img(images.flatten(1)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls["text"] += 1
        return torch.nn.functional.normalize(self.txt(tokens), dim=-1)


class CrashingTeacher(TinyTeacher):
    """Dies on its n-th image batch, like a killed run."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.calls["image"] + 1 == self.crash_at:
            raise RuntimeError("injected failure")
        return super().encode_image(images)


class TinyData(ImageTextDataset):
    """n images of seeded noise, two captions each; images in ``bad`` raise BadSampleError."""

    def __init__(self, n: int = 37, bad: tuple[int, ...] = (), tag: str = "a") -> None:
        super().__init__(
            spec=f"tiny:{tag}", split="train", image_keys=[f"img{i:03d}.png" for i in range(n)],
            captions=[f"{tag} caption {j} of image {j // 2}" for j in range(2 * n)],
            caption_image_index=np.repeat(np.arange(n, dtype=np.int64), 2),
        )
        self.bad = set(bad)

    def load_image(self, index: int) -> Image.Image:
        if index in self.bad:
            raise BadSampleError(f"{self.image_keys[index]}: truncated PNG", image_index=index)
        rng = np.random.default_rng(index)
        return Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))


def _build(teacher: Teacher, data: ImageTextDataset, out: Path, **kw) -> Path:
    kw = {"batch_size": 4, "shard_size": 8, "progress": False, **kw}
    return build_feature_cache(teacher, data, out, **kw)


def _shard_hashes(out: Path) -> dict[str, str]:
    files = sorted([*out.glob("*.npy"), *out.glob("*/*.npy")])  # joined files, shards left, the index
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in files}


def test_shapes_keys_and_fp16_storage(tmp_path):
    teacher, data = TinyTeacher(), TinyData()
    out = _build(teacher, data, tmp_path / "c")
    cache = FeatureCache.open(out, teacher_id=teacher.id, dataset_fingerprint=data.fingerprint())
    assert (cache.n_images, cache.n_captions, cache.dim) == (37, 74, 8)
    assert cache.image_keys == data.image_keys and cache.valid_images.all()
    assert cache.caption_image_index.dtype == np.int64
    np.testing.assert_array_equal(cache.caption_image_index, data.caption_image_index)
    # 37 images in shards of 8 -> 5 shards, the last one holding 5 rows, joined into one fp16 file.
    m = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in m["shards"]["image"]] == [8, 8, 8, 8, 5] and len(m["shards"]["text"]) == 10
    joined = np.load(out / "image.npy")
    assert joined.dtype == np.float16 and joined.shape == (37, 8)
    assert not list((out / "image").glob("*.npy"))  # the shard files go once joined
    # Rows are keyed by sample id, whatever the order asked for, and match the teacher to fp16.
    idx = np.array([36, 0, 17, 17, 9])
    with torch.no_grad():
        want_img = teacher.encode_image(torch.stack([teacher.preprocess(data.load_image(i)) for i in idx]))
        want_txt = teacher.encode_text(teacher.tokenize([data.captions[j] for j in idx]))
    got = cache.image(idx)
    assert got.dtype == np.float32 and got.shape == (5, 8)
    np.testing.assert_allclose(got, want_img.numpy(), atol=1e-3)
    np.testing.assert_allclose(cache.text(idx), want_txt.numpy(), atol=1e-3)
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "edge-msd-features" and m["dtype"] == "float16"
    assert m["dataset"]["fingerprint"] == data.fingerprint() and m["teacher_id"] == teacher.id
    assert m["joined"]["image"]["sha256"] == sha256_file(out / "image.npy") == m["files"]["image.npy"]
    with pytest.raises(IndexError, match="out of range"):
        cache.text([74])


def test_resume_after_crash_equals_uninterrupted_and_skips_finished(tmp_path):
    data = TinyData()
    ref = _build(TinyTeacher(), data, tmp_path / "ref")

    out = tmp_path / "run"
    # 2 batches per shard: dying on the 7th batch leaves 3 image shards done, no text shards.
    with pytest.raises(RuntimeError, match="injected failure"):
        _build(CrashingTeacher(crash_at=7), data, out)
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / "done").glob("*.json"))
    assert done == ["image-00000.json", "image-00001.json", "image-00002.json"]
    with pytest.raises(ArtifactError, match="incomplete"):
        FeatureCache.open(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "image").glob("*.npy")}
    records = {p: p.stat().st_mtime_ns for p in (out / "done").glob("*.json")}

    teacher = TinyTeacher()
    _build(teacher, data, out)
    # Only the 2 unfinished image shards (rows 24..36: 2 + 2 batches) and the 10 text shards
    # (9 of 8 captions = 2 batches each, then 2 captions = 1 batch) were computed.
    assert teacher.calls == {"image": 4, "text": 19}
    assert len(mtimes) == 3 and all(not p.exists() for p in mtimes)  # joined, then removed
    assert all(p.stat().st_mtime_ns == t for p, t in records.items())  # finished shards not rewritten
    assert _shard_hashes(out) == _shard_hashes(ref)
    a, b = FeatureCache.open(ref), FeatureCache.open(out)
    assert np.array_equal(a.image(np.arange(37)), b.image(np.arange(37)))
    assert np.array_equal(a.text(np.arange(74)), b.text(np.arange(74)))

    # A finished cache re-run is a no-op.
    again = TinyTeacher()
    _build(again, data, out)
    assert again.calls == {"image": 0, "text": 0}


def test_foreign_cache_refused_unless_force(tmp_path):
    data = TinyData()
    out = _build(TinyTeacher(0), data, tmp_path / "c")
    with pytest.raises(ArtifactError, match=r"by teacher tiny-teacher-0, expected tiny-teacher-1.*--force"):
        _build(TinyTeacher(1), data, out)
    with pytest.raises(ArtifactError, match="another dataset: tiny:a split train"):
        _build(TinyTeacher(0), TinyData(tag="b"), out)
    with pytest.raises(ArtifactError, match="shard_size 8, expected 16"):
        _build(TinyTeacher(0), data, out, shard_size=16)
    with pytest.raises(ArtifactError, match="made by teacher tiny-teacher-0, expected tiny-teacher-1"):
        FeatureCache.open(out, teacher_id="tiny-teacher-1")
    with pytest.raises(ArtifactError, match="another dataset"):
        FeatureCache.open(out, dataset_fingerprint=TinyData(tag="b").fingerprint())
    # A partial cache of another teacher is refused too; --force recomputes from scratch.
    part = tmp_path / "part"
    with pytest.raises(RuntimeError):
        _build(CrashingTeacher(crash_at=3), data, part)
    with pytest.raises(ArtifactError, match="expected tiny-teacher-1"):
        _build(TinyTeacher(1), data, part)
    (part / "run.json").write_text("{truncated")
    with pytest.raises(ArtifactError, match=r"run.json: not valid JSON.*--force"):
        _build(TinyTeacher(1), data, part)
    _build(TinyTeacher(1), data, part, force=True)
    assert FeatureCache.open(part).teacher_id == "tiny-teacher-1"
    # A folder that is not a cache is never overwritten, even with force.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a feature cache"):
        _build(TinyTeacher(), data, other, force=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_bad_images_skipped_and_counted_or_fatal(tmp_path):
    data = TinyData(bad=(3, 20))
    with pytest.raises(BadSampleError, match=r"img003.png: truncated PNG.*--skip-bad") as e:
        _build(TinyTeacher(), data, tmp_path / "strict")
    assert e.value.image_index == 3
    # Worker processes report a bad image as data, so the main process decides (and names it).
    cache = FeatureCache.open(_build(TinyTeacher(), data, tmp_path / "lenient", skip_bad=True, num_workers=2))
    assert np.flatnonzero(~cache.valid_images).tolist() == [3, 20]
    assert not cache.image([3, 20]).any()
    good = cache.image([2, 4, 21])
    np.testing.assert_allclose(np.linalg.norm(good, axis=1), 1.0, atol=2e-3)
    skipped = cache.manifest["skipped_images"]
    assert [(s["image_index"], s["key"]) for s in skipped] == [(3, "img003.png"), (20, "img020.png")]
    assert "truncated PNG" in skipped[0]["reason"]


def test_tampered_shard_detected_and_repaired(tmp_path):
    data = TinyData()
    out = _build(TinyTeacher(), data, tmp_path / "c")
    ref = _shard_hashes(out)
    joined = out / "text.npy"
    raw = bytearray(joined.read_bytes())
    raw[np.load(joined, mmap_mode="r").offset + (4 * 8 + 3) * 8 * 2 + 5] ^= 0xFF  # in shard 4's rows
    joined.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"text.npy: sha256 .* differs"):
        FeatureCache.open(out, verify=True)
    # A re-run recomputes exactly the damaged shard (1 shard = 2 text batches).
    teacher = TinyTeacher()
    _build(teacher, data, out)
    assert teacher.calls == {"image": 0, "text": 2}
    assert _shard_hashes(out) == ref
    FeatureCache.open(out)


def test_cli_features_saves_config(tmp_path, monkeypatch):
    data = TinyData(n=10)
    seen = {}

    def open_dataset(spec, split, skip_bad=False):
        seen["data"] = (spec, split, skip_bad)
        return data

    monkeypatch.setattr("edge_msd.teachers.load_teacher", lambda spec, device: TinyTeacher(), raising=False)
    monkeypatch.setattr("edge_msd.data.open_dataset", open_dataset, raising=False)
    out = tmp_path / "feat"
    cfg = tmp_path / "f.toml"
    cfg.write_text('[features]\nbatch_size = 3\nshard_size = 4\nsplit = "val"\n')
    r = CliRunner().invoke(main, ["features", "--config", str(cfg), "--out", str(out), "--skip-bad"])
    assert r.exit_code == 0, r.output
    assert seen["data"] == ("demo-scenes", "val", True)
    assert "batch_size = 3" in (out / "val" / "config.toml").read_text()  # --out is the root of <split>/
    m = json.loads((out / "val" / "manifest.json").read_text())
    assert m["config"]["shard_size"] == 4 and m["build"]["batch_size"] == 3
    assert len(m["shards"]["image"]) == 3
    r = CliRunner().invoke(main, ["features", "--out", str(out), "--shard-size", "0"])
    assert r.exit_code == 2 and "field 'shard_size'" in r.output
    # The split folder given where the root is expected: the layout is named, nothing is written.
    r = CliRunner().invoke(main, ["features", "--out", str(out / "val"), "--split", "train"])
    assert r.exit_code == 2 and f"--out {out}" in r.output and "<root>/train/manifest.json" in r.output
    assert not (out / "val" / "train").exists()


_DIST_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_feature_cache import CrashingTeacher, TinyData, TinyTeacher
from edge_msd.teachers.cache import build_feature_cache
crash = os.environ["RANK"] == os.environ.get("CRASH_RANK")
teacher = CrashingTeacher(crash_at=3) if crash else TinyTeacher()
build_feature_cache(teacher, TinyData(), {out!r}, batch_size=4, shard_size=8, progress=False)
"""


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path):
    data = TinyData()
    ref = _build(TinyTeacher(), data, tmp_path / "ref")
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "dist")))
    torchrun = Path(sys.executable).with_name("torchrun")

    def launch(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script)], capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)

    # Rank 1 dies after its first image shard (shards 1, 3, ... are rank 1's); torchrun stops the job.
    r = launch(CRASH_RANK="1")
    assert r.returncode != 0 and "injected failure" in r.stderr
    assert (tmp_path / "dist" / "done" / "image-00001.json").is_file()
    assert not (tmp_path / "dist" / "manifest.json").exists()
    r = launch()
    assert r.returncode == 0, r.stderr[-3000:]
    assert _shard_hashes(tmp_path / "dist") == _shard_hashes(ref)
    m = FeatureCache.open(tmp_path / "dist").manifest
    assert m["build"]["world_size"] == 2


def test_rank_device_under_torchrun(monkeypatch):

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="cuda:0 under torchrun, where rank 1 uses cuda:1"):
        rank_device("cuda:0")  # every rank on one GPU: refused
    if torch.cuda.device_count() >= 2:
        assert rank_device("cuda") == "cuda:1" and torch.cuda.current_device() == 1
