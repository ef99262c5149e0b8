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
from edge_msd.teachers import joined
from edge_msd.teachers.cache import FeatureCache, write_feature_cache, write_feature_rows

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


def test_gathers_equal_the_full_copy_in_any_order(tmp_path):
    out, img, txt = _write(tmp_path / "c", n=53, shard_size=4)
    cache = FeatureCache.open(out)
    # What the schedule used to hold: the whole cache as float32.
    full_img, full_txt = (e.astype(np.float16).astype(np.float32) for e in (img, txt))
    rng = np.random.default_rng(1)
    for size in (1, 7, 53, 200):  # duplicates, unsorted, across shard boundaries, all rows
        idx = rng.integers(0, 53, size)
        np.testing.assert_array_equal(cache.image(idx), full_img[idx])
        cidx = rng.integers(0, 159, size)
        np.testing.assert_array_equal(cache.text(cidx), full_txt[cidx])
    np.testing.assert_array_equal(cache.text(np.arange(159)), full_txt)
    assert cache.image([]).shape == (0, DIM)


class _Rows:
    """``rows(kind, a, b)`` for the streamed writer; counts the rows asked for, fails on call ``fail_at``."""

    def __init__(self, n: int, fail_at: int = -1) -> None:
        img, txt = _embeddings(n)
        self.embs, self.asked, self.fail_at, self.calls = {"image": img, "text": txt}, 0, fail_at, 0

    def __call__(self, kind: str, a: int, b: int) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        self.asked += b - a
        return self.embs[kind][a:b]


def test_streamed_writer_equals_whole_array_writer_and_resumes(tmp_path):
    ref, _, _ = _write(tmp_path / "ref", n=21, shard_size=5)
    with pytest.raises(RuntimeError, match="injected"):
        write_feature_rows("t", RowsData(21), tmp_path / "s", DIM, _Rows(21, fail_at=4), shard_size=5)
    rows = _Rows(21)
    out = write_feature_rows("t", RowsData(21), tmp_path / "s", DIM, rows, shard_size=5)
    assert rows.asked == 21 - 15 + 63  # the 3 finished image shards are kept
    for name in ("image.npy", "text.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def _resume_equals(out: Path, ref: Path) -> None:
    """A re-run finishes ``out`` without recomputing a row, as the uninterrupted run ``ref`` made it."""
    rows = _Rows(21)
    write_feature_rows("t", RowsData(21), out, DIM, rows, shard_size=5)
    assert rows.asked == 0  # every shard is done: in its file or in the joined file
    assert not list(out.glob("*/0*.npy")) and not list(out.glob(".*.tmp"))
    for name in ("image.npy", "text.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    FeatureCache.open(out, verify=True)


def test_join_killed_while_copying_leaves_no_joined_file(tmp_path, monkeypatch):
    ref, _, _ = _write(tmp_path / "ref", n=21, shard_size=5)
    out, real, calls = tmp_path / "c", joined._digest, []

    def dying_digest(rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(rows)

    monkeypatch.setattr(joined, "_digest", dying_digest)
    with pytest.raises(RuntimeError, match="killed"):
        write_feature_rows("t", RowsData(21), out, DIM, _Rows(21), shard_size=5)
    monkeypatch.undo()
    assert not (out / "image.npy").exists() and (out / ".image.npy.tmp").exists()
    assert len(list((out / "image").glob("*.npy"))) == 5  # the shards are intact
    _resume_equals(out, ref)


def test_join_killed_while_removing_shards_resumes_without_recomputing(tmp_path, monkeypatch):
    ref, _, _ = _write(tmp_path / "ref", n=21, shard_size=5)
    out, real_unlink, removed = tmp_path / "c", Path.unlink, []

    def dying_unlink(self, missing_ok=False):
        if self.parent.name == "text" and self.suffix == ".npy":
            removed.append(self.name)
            if len(removed) == 2:
                raise RuntimeError("killed")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(RuntimeError, match="killed"):
        write_feature_rows("t", RowsData(21), out, DIM, _Rows(21), shard_size=5)
    monkeypatch.undo()
    # Joined and recorded, one of the 13 text shard files removed, no manifest yet.
    assert (out / "text.npy").is_file() and (out / "done" / "text.json").is_file()
    assert not (out / "manifest.json").exists() and len(list((out / "text").glob("*.npy"))) == 12
    _resume_equals(out, ref)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd (Linux)")
def test_open_files_do_not_grow_with_shard_count(tmp_path):
    def fds_after_gathers(n: int) -> int:
        out, _, _ = _write(tmp_path / f"c{n}", n=n, shard_size=2)  # n/2 image and 3n/2 text shards
        before = len(os.listdir("/proc/self/fd"))
        cache = FeatureCache.open(out)
        rng = np.random.default_rng(0)
        for _ in range(3):
            cache.image(rng.permutation(n))
            cache.text(rng.permutation(3 * n))
        grown = len(os.listdir("/proc/self/fd")) - before
        del cache
        return grown

    assert fds_after_gathers(20) == fds_after_gathers(400) <= 3  # 40 vs 800 shards: 2 rows, 1 index


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

    joined = out / "image.npy"
    data = joined.read_bytes()
    joined.write_bytes(data[:-5])  # truncated
    with pytest.raises(ArtifactError, match=r"image.npy: .*the cache records float16 \(12, 6\)"):
        FeatureCache.open(out)
    joined.unlink()
    with pytest.raises(ArtifactError, match="image.npy: missing"):
        FeatureCache.open(out)
    joined.write_bytes(data)
    np.save(out / "text.npy", np.zeros((6, 36), np.float16))  # replaced: same byte count, other shape
    with pytest.raises(ArtifactError, match=r"text.npy: float16 \(6, 36\).*records float16 \(36, 6\)"):
        FeatureCache.open(out)
    # A join record that disagrees with the manifest's file hashes (e.g. a replaced record).
    _rewrite_manifest(out, lambda m: m["joined"]["image"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match="image.npy has sha256 0000"):
        FeatureCache.open(out)


def test_verify_rehashes_and_finds_a_flipped_byte(tmp_path):
    out, _, _ = _write(tmp_path / "c", n=12, shard_size=4)
    joined = out / "image.npy"
    raw = bytearray(joined.read_bytes())
    raw[-1] ^= 0x01
    joined.write_bytes(bytes(raw))
    FeatureCache.open(out)  # same size and header: only a re-hash can tell
    with pytest.raises(ArtifactError, match=r"image.npy: sha256 .* differs"):
        FeatureCache.open(out, verify=True)


def test_distill_verify_cache_is_a_knob_not_a_setting():
    from edge_msd.distill.checkpoint import run_identity
    from edge_msd.distill.config import DistillConfig

    assert DistillConfig().verify_cache is False
    assert "verify_cache" not in run_identity(DistillConfig(verify_cache=True))  # a resume may add it
