"""Feature cache at scale: per-batch gathers from the shards, bounded open files, record checks at
open, re-hash only on request, and the schedule's once-per-epoch permutation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_msd.data.base import ImageTextDataset
from edge_msd.distill.schedule import Schedule
from edge_msd.errors import ArtifactError
from edge_msd.teachers.cache import FeatureCache, write_feature_cache, write_feature_rows
from edge_msd.teachers.shards import MAX_OPEN

DIM = 6


class RowsData(ImageTextDataset):
    """n images, 3 captions each; images are never read (the cache is written from given rows)."""

    def __init__(self, n: int) -> None:
        super().__init__(spec="rows:test", split="train", image_keys=[f"k{i}" for i in range(n)],
                         captions=[f"caption {j}" for j in range(3 * n)],
                         caption_image_index=np.repeat(np.arange(n, dtype=np.int64), 3))

    def load_image(self, index: int) -> Image.Image:
        raise AssertionError("not read")


def _embeddings(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, DIM), np.float32), rng.standard_normal((3 * n, DIM), np.float32)


def _write(out: Path, n: int, shard_size: int) -> tuple[Path, np.ndarray, np.ndarray]:
    img, txt = _embeddings(n)
    write_feature_cache("t", RowsData(n), out, img, txt, shard_size=shard_size)
    return out, img, txt


def _full_copy(out: Path, kind: str) -> np.ndarray:
    """What the cache served before: every shard loaded and concatenated, as float32."""
    return np.concatenate([np.load(p) for p in sorted((out / kind).glob("*.npy"))]).astype(np.float32)


def test_gathers_equal_the_full_copy_in_any_order(tmp_path):
    out, img, _ = _write(tmp_path / "c", n=53, shard_size=4)
    cache = FeatureCache.open(out)
    full_img, full_txt = _full_copy(out, "image"), _full_copy(out, "text")
    np.testing.assert_array_equal(full_img, img.astype(np.float16).astype(np.float32))
    rng = np.random.default_rng(1)
    for size in (1, 7, 53, 200):  # duplicates, unsorted, across shard boundaries, all rows
        idx = rng.integers(0, 53, size)
        np.testing.assert_array_equal(cache.image(idx), full_img[idx])
        cidx = rng.integers(0, 159, size)
        np.testing.assert_array_equal(cache.text(cidx), full_txt[cidx])
    np.testing.assert_array_equal(cache.text(np.arange(159)), full_txt)  # consecutive runs
    assert cache.image([]).shape == (0, DIM)


def test_streamed_writer_equals_whole_array_writer(tmp_path):
    ref, img, txt = _write(tmp_path / "ref", n=21, shard_size=5)
    embs = {"image": img, "text": txt}
    calls = []

    def rows(kind: str, a: int, b: int) -> np.ndarray:
        calls.append(b - a)
        return embs[kind][a:b]

    out = write_feature_rows("t", RowsData(21), tmp_path / "s", DIM, rows, shard_size=5)
    assert max(calls) == 5  # one shard at a time
    for kind in ("image", "text"):
        for p in sorted((ref / kind).glob("*.npy")):
            assert (out / kind / p.name).read_bytes() == p.read_bytes()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd (Linux)")
def test_open_files_do_not_grow_with_shard_count(tmp_path):
    def fds_after_gathers(n: int) -> int:
        out, _, _ = _write(tmp_path / f"c{n}", n=n, shard_size=2)  # n/2 image and 3n/2 text shards
        before = len(os.listdir("/proc/self/fd"))
        cache = FeatureCache.open(out)
        rng = np.random.default_rng(0)
        for _ in range(5):
            cache.image(rng.permutation(n))
            cache.text(rng.permutation(3 * n))
        grown = len(os.listdir("/proc/self/fd")) - before
        del cache
        return grown

    small, large = fds_after_gathers(20), fds_after_gathers(400)  # 40 vs 800 shards
    assert large <= 2 * MAX_OPEN + 2  # two modalities' LRUs and the caption index map
    assert large - small <= MAX_OPEN


def test_schedule_draws_each_epoch_once_and_resumes_exactly():
    n, batch, seed = 50, 8, 3
    valid, cap_img = np.ones(n, bool), np.repeat(np.arange(n), 2)
    run = Schedule(valid, cap_img, batch, 2, seed)
    steps = [run.step(s) for s in range(3 * run.steps_per_epoch)]
    order = run._order
    run.step(2 * run.steps_per_epoch + 1)
    assert run._order is order  # not redrawn within an epoch
    # The order of epoch e is the one a run drew before this change (old checkpoints resume exactly).
    for e in range(3):
        perm = np.random.default_rng([seed, e]).permutation(np.arange(n))
        got = np.concatenate([steps[e * run.steps_per_epoch + p][0] for p in range(run.steps_per_epoch)])
        np.testing.assert_array_equal(got, perm[: run.steps_per_epoch * batch])
    # A resumed run (a fresh schedule that starts mid-epoch) sees the same batches.
    resumed = Schedule(valid, cap_img, batch, 2, seed)
    for s in range(run.steps_per_epoch + 2, len(steps)):
        for a, b in zip(resumed.step(s), steps[s], strict=True):
            np.testing.assert_array_equal(a, b)


def _rewrite_manifest(out: Path, edit) -> None:
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))


def test_open_checks_records_without_hashing(tmp_path, monkeypatch):
    out, _, _ = _write(tmp_path / "c", n=12, shard_size=4)
    monkeypatch.setattr("edge_msd.artifacts.sha256_file", lambda p: pytest.fail(f"hashed {p}"))
    FeatureCache.open(out)  # no file is hashed

    shard = out / "image" / "00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])  # truncated
    with pytest.raises(ArtifactError, match=r"image/00001.npy: \d+ bytes, the manifest records"):
        FeatureCache.open(out)
    shard.unlink()
    with pytest.raises(ArtifactError, match="00001.npy: listed in the manifest but missing"):
        FeatureCache.open(out)
    shard.write_bytes(data)
    # A shard record that disagrees with the manifest's file hashes (e.g. a replaced record).
    _rewrite_manifest(out, lambda m: m["shards"]["text"][2].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match="text/00002.npy has sha256 0000"):
        FeatureCache.open(out)


def test_replaced_shard_of_other_shape_refused_at_first_read(tmp_path):
    out, _, _ = _write(tmp_path / "c", n=12, shard_size=4)
    shard = out / "text" / "00003.npy"
    np.save(shard, np.zeros((2, 12), np.float16))  # same byte count, other shape
    _rewrite_manifest(out, lambda m: m["shards"]["text"][3].pop("bytes"))  # as a cache from before
    cache = FeatureCache.open(out)
    cache.text([0, 1])  # other shards read fine
    with pytest.raises(ArtifactError, match=r"text/00003.npy: float16 \(2, 12\).*expected float16 \(4, 6\)"):
        cache.text([13])


def test_verify_rehashes_and_finds_a_flipped_byte(tmp_path):
    out, _, _ = _write(tmp_path / "c", n=12, shard_size=4)
    shard = out / "image" / "00002.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    FeatureCache.open(out)  # same size and header: only a re-hash can tell
    with pytest.raises(ArtifactError, match=r"image/00002.npy: sha256 .* differs"):
        FeatureCache.open(out, verify=True)


def test_distill_verify_cache_is_a_knob_not_a_setting():
    from edge_msd.distill.checkpoint import run_identity
    from edge_msd.distill.config import DistillConfig

    assert DistillConfig().verify_cache is False
    assert "verify_cache" not in run_identity(DistillConfig(verify_cache=True))  # a resume may add it
