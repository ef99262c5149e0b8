"""The teacher feature cache: the teacher's image and text embeddings of one dataset split, on disk.

The student learns only from these embeddings, so the teacher runs once per dataset. Layout::

    out/
      run.json                   identity of the run (teacher, dataset fingerprint, counts, shard size)
      index/image_keys.json      image key per image index
      index/caption_image_index.npy
      image/00000.npy ...        fp16 (rows, D): shard k holds images k*S .. k*S+S-1 (while building)
      text/00000.npy ...         fp16 (rows, D): shard k holds captions k*S .. k*S+S-1 (while building)
      image.npy, text.npy        fp16 (n, D): the shards joined once all are done (see joined.py)
      done/image-00000.json ...  one record per finished shard: its sha256 and skipped images
      done/image.json ...        the join record: sha256 and size of image.npy, sha256 of each shard's rows
      config.toml                resolved config (when given)
      manifest.json              written last, once every shard is done: the cache is complete

Rows are keyed by sample id (image index, caption index), never by batch position, so a trainer
can shuffle freely. Every shard is written atomically and then recorded as done, so a killed run
resumes where it stopped and a finished shard is never recomputed; batches never cross a shard
boundary, so a shard's bytes do not depend on which run (or rank) computed it. Under ``torchrun``
shards are dealt out round-robin by rank and rank 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from edge_msd.artifacts import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    read_manifest,
    sha256_bytes,
    sha256_file,
    verify_files,
    write_manifest,
)
from edge_msd.config import save_config
from edge_msd.data.base import ImageTextDataset
from edge_msd.errors import ArtifactError, BadSampleError, ConfigError, DataError, EdgeMSDError
from edge_msd.teachers.base import Teacher
from edge_msd.teachers.encode import embed_images, embed_texts, teacher_device
from edge_msd.teachers.features_config import FeaturesConfig
from edge_msd.teachers.joined import gather, join, open_rows, region_done
from edge_msd.torchrun import barrier, broadcast_from_rank0, process_group, rank_device, rank_world

KIND = "edge-msd-features"
FORMAT = 1
RUN = "run.json"
MODALITIES = ("image", "text")
_console = Console(stderr=True)


# ---- CLI entry ------------------------------------------------------------------------------


def features_from_config(cfg: FeaturesConfig) -> Path:
    """What ``edge-msd features`` runs: open the teacher and the dataset, then build the cache."""
    from edge_msd.data import open_dataset
    from edge_msd.teachers import load_teacher

    teacher = load_teacher(cfg.teacher, device=rank_device(cfg.resolved_device()))
    dataset = open_dataset(cfg.data, cfg.split, skip_bad=cfg.skip_bad)
    return build_feature_cache(
        teacher, dataset, cfg.out_dir(), batch_size=cfg.batch_size, shard_size=cfg.shard_size,
        skip_bad=cfg.skip_bad, num_workers=cfg.num_workers, force=cfg.force, config=cfg,
    )


# ---- building --------------------------------------------------------------------------------


def _shard_name(kind: str, k: int) -> str:
    return f"{kind}/{k:05d}.npy"


def _done_path(out: Path, kind: str, k: int) -> Path:
    return out / "done" / f"{kind}-{k:05d}.json"


def _identity(teacher_id: str, dim: int, dataset: ImageTextDataset, shard_size: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "teacher_id": teacher_id,
        "dim": int(dim),
        "dataset": {
            "spec": dataset.spec,
            "split": dataset.split,
            "fingerprint": dataset.fingerprint(),
            "n_images": dataset.n_images,
            "n_captions": dataset.n_captions,
        },
        "shard_size": shard_size,
    }


def _foreign(out: Path, have: dict, teacher_id: str | None, dataset: dict | None) -> str | None:
    """Why the cache in ``out`` (manifest or run record ``have``) is not of this teacher/data, or None."""
    if teacher_id is not None and have.get("teacher_id") != teacher_id:
        return f"feature cache {out} was made by teacher {have.get('teacher_id')}, expected {teacher_id}"
    hd = have.get("dataset", {})
    if dataset is not None and hd.get("fingerprint") != dataset["fingerprint"]:
        expected = f"{dataset['spec']} split {dataset['split']} " if "spec" in dataset else ""
        return (f"feature cache {out} was made from another dataset: {hd.get('spec')} split "
                f"{hd.get('split')} (fingerprint {str(hd.get('fingerprint'))[:12]}…), expected "
                f"{expected}(fingerprint {dataset['fingerprint'][:12]}…)")
    return None


def _mismatch(out: Path, have: dict, want: dict) -> str | None:
    """Why the cache in ``out`` cannot be resumed or reused for the run ``want``, or None."""
    why = _foreign(out, have, want["teacher_id"], want["dataset"])
    if why:
        return why
    for key in ("shard_size", "dim", "format"):
        if have.get(key) != want[key]:
            return f"feature cache {out} was made with {key} {have.get(key)}, expected {want[key]}"
    return None


def _prepare_dir(out: Path, ident: dict, dataset: ImageTextDataset, force: bool) -> bool:
    """Rank 0: check what is in ``out`` and set it up. True when a matching cache is already complete."""
    is_cache = (out / RUN).is_file() or (out / MANIFEST).is_file()
    if out.exists() and not is_cache and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not a feature cache (no {RUN}); refusing to write into it")
    if is_cache:
        source = out / MANIFEST if (out / MANIFEST).is_file() else out / RUN
        try:
            have = json.loads(source.read_text(encoding="utf-8"))
            why = _mismatch(out, have, ident)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            have, why = {}, f"{source}: not valid JSON ({e})"
        if why and not force:
            raise ArtifactError(f"{why}; pass --force to recompute it")
        if why or force:
            shutil.rmtree(out)
        elif (out / MANIFEST).is_file() and "joined" not in have:  # shards not yet joined: finish it
            (out / MANIFEST).unlink()
        elif (out / MANIFEST).is_file():
            try:
                verify_files(out, have)
                return True
            except ArtifactError as e:  # a damaged finished cache: recompute what is damaged
                _console.print(f"[yellow]{e}; recomputing the damaged shards[/yellow]")
                (out / MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp"):  # leftovers of a killed atomic write
        stale.unlink()
    buf = io.BytesIO()
    np.save(buf, np.asarray(dataset.caption_image_index, dtype=np.int64))
    atomic_write_bytes(out / "index" / "caption_image_index.npy", buf.getvalue())
    atomic_write_json(out / "index" / "image_keys.json", list(dataset.image_keys))
    atomic_write_json(out / RUN, ident)
    return False


def _is_done(out: Path, kind: str, k: int) -> bool:
    """A shard is done when its record exists and the shard file still has the recorded sha256, or,
    once joined and its file removed, its rows in the joined file still have theirs."""
    rec_path = _done_path(out, kind, k)
    if not rec_path.is_file():
        return False
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        shard = out / rec["file"]
        if shard.is_file() and sha256_file(shard) == rec["sha256"]:
            return True
        if not shard.is_file() and region_done(out, kind, k):
            return True
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        pass
    _console.print(f"[yellow]{kind} shard {k}: missing or not as {rec_path} says; recomputing it[/yellow]")
    return False


def _write_shard(out: Path, kind: str, k: int, start: int, rows: np.ndarray, skipped: list[dict]) -> None:
    buf = io.BytesIO()
    np.save(buf, rows)
    data = buf.getvalue()
    name = _shard_name(kind, k)
    atomic_write_bytes(out / name, data)
    record = {"file": name, "sha256": sha256_bytes(data), "start": start, "rows": len(rows),
              "skipped": skipped}
    atomic_write_json(_done_path(out, kind, k), record)


def _check_embeddings(emb: np.ndarray, n: int, dim: int, teacher_id: str, what: str) -> None:
    if emb.shape != (n, dim):
        raise ArtifactError(f"teacher {teacher_id} returned {what} embeddings of shape {emb.shape}, "
                            f"expected ({n}, {dim}) (its embed_dim)")
    if not np.isfinite(emb).all() or np.abs(emb).max(initial=0.0) > 65504:  # fp16 range
        raise ArtifactError(f"teacher {teacher_id} returned non-finite or out-of-fp16-range {what} "
                            "embeddings")


class _ImageLoader(torch.utils.data.Dataset):
    """Decode + preprocess one image; a bad image comes back as its error text (so workers never die)."""

    def __init__(self, dataset: ImageTextDataset, teacher: Teacher) -> None:
        self.dataset, self.teacher = dataset, teacher

    def __len__(self) -> int:
        return self.dataset.n_images

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image: Image.Image = self.dataset.load_image(i)
        except DataError as e:
            return i, None, str(e)
        return i, self.teacher.preprocess(image), None


def _collate(items: list) -> list:
    return items


def _batches(start: int, stop: int, batch_size: int) -> Iterator[list[int]]:
    for a in range(start, stop, batch_size):
        yield list(range(a, min(a + batch_size, stop)))


def _rows_in(shards: list[int], shard_size: int, n: int) -> int:
    return sum(min((k + 1) * shard_size, n) - k * shard_size for k in shards)


class _ShardBatches:
    """Batch sampler: the batches of the given shards, never crossing a shard boundary (made lazily,
    so that a billion-image plan costs no memory)."""

    def __init__(self, shards: list[int], shard_size: int, n: int, batch_size: int) -> None:
        self.shards, self.shard_size, self.n, self.batch_size = shards, shard_size, n, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.shards:
            yield from _batches(k * self.shard_size, min((k + 1) * self.shard_size, self.n), self.batch_size)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -- it/s" if speed is None else f"{speed:7.1f} it/s", style="progress.data.speed")


def build_feature_cache(
    teacher: Teacher,
    dataset: ImageTextDataset,
    out_dir: Path,
    *,
    batch_size: int = 256,
    shard_size: int = 4096,
    skip_bad: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    force: bool = False,
    config: Any = None,
) -> Path:
    """Run ``teacher`` over ``dataset`` and store its embeddings in ``out_dir``; returns ``out_dir``.

    Resumes a partial cache of the same teacher and data and does nothing for a complete one; a
    cache of another teacher or data is refused unless ``force``. With ``skip_bad`` an image whose
    ``load_image`` raises DataError gets a zero row, ``valid_images`` False and its reason in the
    manifest; otherwise the error stops the run. ``config`` (a dataclass or dict) is recorded in
    the manifest, and a dataclass is also saved as ``config.toml`` beside it.
    """
    if batch_size < 1 or shard_size < 1:
        raise ConfigError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    out = Path(out_dir)
    ident = _identity(teacher.id, teacher.embed_dim, dataset, shard_size)
    with process_group(teacher_device(teacher)):
        rank, world = rank_world()
        status: tuple[bool, EdgeMSDError | None] = (False, None)
        if rank == 0:
            try:
                status = (_prepare_dir(out, ident, dataset, force), None)
            except EdgeMSDError as e:
                status = (False, e)
        # also the barrier: nobody starts before the dir is set up
        finished, error = broadcast_from_rank0(status)
        if error is not None:
            raise error
        if finished:
            return out

        n_shards = {"image": math.ceil(dataset.n_images / shard_size),
                    "text": math.ceil(dataset.n_captions / shard_size)}
        units = [(kind, k) for kind in MODALITIES for k in range(n_shards[kind])]
        todo = [(kind, k) for kind, k in units[rank::world] if not _is_done(out, kind, k)]
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=_console, disable=not (progress and rank == 0)) as bar, \
                torch.inference_mode():
            _embed_images(teacher, dataset, out, [k for kind, k in todo if kind == "image"], shard_size,
                          batch_size, skip_bad, num_workers, bar)
            _embed_texts(teacher, dataset, out, [k for kind, k in todo if kind == "text"], shard_size,
                         batch_size, bar)
        barrier()
        if rank == 0:
            _finish(out, ident, n_shards, dataset, config, dict(
                batch_size=batch_size, shard_size=shard_size, skip_bad=skip_bad, num_workers=num_workers,
                world_size=world))
        barrier()
        return out


def write_feature_cache(
    teacher_id: str,
    dataset: ImageTextDataset,
    out_dir: Path,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    *,
    batch_size: int = 256,
    shard_size: int = 4096,
    force: bool = False,
    config: Any = None,
) -> Path:
    """Store embeddings the teacher ``teacher_id`` already computed (row i: image i / caption i) as the
    cache ``build_feature_cache`` writes for it: same layout, identity and manifest (``batch_size``:
    the batch they were computed in). For a caller that has them anyway, such as the demo teacher's
    fit, so that the teacher need not run over the split again. Like ``build_feature_cache``, a
    matching complete cache is kept and one of another teacher or data is refused unless ``force``.
    """
    dim = int(image_emb.shape[1]) if image_emb.ndim == 2 else -1
    embs = {"image": image_emb, "text": text_emb}
    for kind, n in (("image", dataset.n_images), ("text", dataset.n_captions)):
        if embs[kind].shape != (n, dim):
            raise ArtifactError(f"teacher {teacher_id} returned {kind} embeddings of shape "
                                f"{embs[kind].shape}, expected ({n}, {dim}) (its embed_dim)")
    return write_feature_rows(teacher_id, dataset, out_dir, dim, lambda kind, a, b: embs[kind][a:b],
                              batch_size=batch_size, shard_size=shard_size, force=force, config=config)


def write_feature_rows(
    teacher_id: str,
    dataset: ImageTextDataset,
    out_dir: Path,
    dim: int,
    rows: Callable[[str, int, int], np.ndarray],
    *,
    batch_size: int = 256,
    shard_size: int = 4096,
    force: bool = False,
    config: Any = None,
) -> Path:
    """``write_feature_cache`` for embeddings produced a shard at a time: ``rows(kind, start, stop)``
    gives rows ``start..stop-1`` of ``kind`` ("image" or "text"), so no whole array is ever held."""
    out = Path(out_dir)
    ident = _identity(teacher_id, dim, dataset, shard_size)
    if _prepare_dir(out, ident, dataset, force):
        return out
    n_shards = {}
    for kind, n in (("image", dataset.n_images), ("text", dataset.n_captions)):
        n_shards[kind] = math.ceil(n / shard_size)
        for k in range(n_shards[kind]):
            if _is_done(out, kind, k):  # a resumed write: finished shards are kept
                continue
            start, stop = k * shard_size, min((k + 1) * shard_size, n)
            emb = np.asarray(rows(kind, start, stop))
            _check_embeddings(emb, stop - start, dim, teacher_id, kind)
            _write_shard(out, kind, k, start, emb.astype(np.float16), [])
    _finish(out, ident, n_shards, dataset, config, dict(
        batch_size=batch_size, shard_size=shard_size, skip_bad=False, num_workers=0, world_size=1))
    return out


def _task_name(what: str) -> str:
    rank, world = rank_world()
    return f"{what} (rank {rank}/{world})" if world > 1 else what


def _embed_images(teacher: Teacher, dataset: ImageTextDataset, out: Path, shards: list[int], shard_size: int,
                  batch_size: int, skip_bad: bool, num_workers: int, bar: Progress) -> None:
    dim = int(teacher.embed_dim)
    task = bar.add_task(_task_name("images"), total=_rows_in(shards, shard_size, dataset.n_images))
    batches = _ShardBatches(shards, shard_size, dataset.n_images, batch_size)
    loader = torch.utils.data.DataLoader(_ImageLoader(dataset, teacher), batch_sampler=batches,
                                         collate_fn=_collate, num_workers=num_workers)
    rows: np.ndarray | None = None
    skipped: list[dict] = []
    for items in loader:
        batch = [i for i, _, _ in items]
        k = batch[0] // shard_size
        start = k * shard_size
        if rows is None:
            rows = np.zeros((min(shard_size, dataset.n_images - start), dim), np.float16)
        good = [(i, x) for i, x, _ in items if x is not None]
        for i, _, reason in items:
            if reason is None:
                continue
            if not skip_bad:
                raise BadSampleError(f"{reason} (image {i} of {dataset.spec} split {dataset.split}; "
                                     "pass --skip-bad to skip such images)", image_index=i)
            skipped.append({"image_index": i, "key": dataset.image_keys[i], "reason": reason})
        if good:
            emb = embed_images(teacher, [t for _, t in good])
            _check_embeddings(emb, len(good), dim, teacher.id, "image")
            rows[[i - start for i, _ in good]] = emb.astype(np.float16)
        bar.advance(task, len(batch))
        if batch[-1] == start + len(rows) - 1:  # last batch of this shard
            _write_shard(out, "image", k, start, rows, skipped)
            rows, skipped = None, []


def _embed_texts(teacher: Teacher, dataset: ImageTextDataset, out: Path, shards: list[int], shard_size: int,
                 batch_size: int, bar: Progress) -> None:
    task = bar.add_task(_task_name("captions"), total=_rows_in(shards, shard_size, dataset.n_captions))
    for k in shards:
        start, stop = k * shard_size, min((k + 1) * shard_size, dataset.n_captions)
        emb = embed_texts(teacher, dataset.captions[start:stop], batch_size,
                          on_batch=lambda n: bar.advance(task, n))
        _check_embeddings(emb, stop - start, int(teacher.embed_dim), teacher.id, "text")
        _write_shard(out, "text", k, start, emb.astype(np.float16), [])


def _finish(out: Path, ident: dict, n_shards: dict[str, int], dataset: ImageTextDataset, config: Any,
            build: dict) -> None:
    """Rank 0, after every rank is done: gather the shard records, join the shards into one file per
    modality and write the manifest."""
    shards: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    for kind in MODALITIES:
        shards[kind] = []
        for k in range(n_shards[kind]):
            rec_path = _done_path(out, kind, k)
            if not rec_path.is_file():
                raise ArtifactError(f"{rec_path}: shard {kind} {k} was not finished by any rank")
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
            skipped += rec.pop("skipped")
            shards[kind].append(rec)
    joined = {}
    for kind in MODALITIES:  # the per-shard row hashes stay in done/<kind>.json: a small manifest opens fast
        rec = join(out, kind, shards[kind], int(ident["dim"]))
        joined[kind] = {k: rec[k] for k in ("file", "rows", "dim", "bytes", "sha256")}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        save_config(config, out / "config.toml")
        config = dataclasses.asdict(config)
    write_manifest(
        out, KIND, config=config, **ident, dtype="float16", build=build, shards=shards, joined=joined,
        skipped_images=sorted(skipped, key=lambda s: s["image_index"]),
        dataset_skipped=list(dataset.skipped),  # dropped by the dataset reader under --skip-bad
    )


# ---- reading ---------------------------------------------------------------------------------


def built_skipping_bad(path: str | os.PathLike) -> bool:
    """Whether the complete cache at ``path`` was built with ``skip_bad``: its dataset must then be
    opened with ``skip_bad`` too, to get the rows the cache holds."""
    return bool((read_manifest(path, KIND).get("build") or {}).get("skip_bad"))


class FeatureCache:
    """A complete feature cache: ``image(indices)`` / ``text(indices)`` → float32 rows, read per call from
    one memory-mapped file per modality: nothing is copied into memory, two files are open."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path, self.manifest = path, manifest
        if "joined" not in manifest:
            raise ArtifactError(f"feature cache {path} keeps its rows in shard files (written before caches "
                                "were joined into one file per modality); re-run `edge-msd features` with "
                                "the same settings to join it (nothing is recomputed)")
        self._rows: dict[str, np.ndarray] = {}
        for kind, n in (("image", self.n_images), ("text", self.n_captions)):
            rec = manifest["joined"][kind]
            if manifest.get("files", {}).get(rec["file"]) != rec["sha256"]:  # the records must agree
                raise ArtifactError(f"{path / MANIFEST}: {rec['file']} has sha256 {str(rec['sha256'])[:16]}… "
                                    "in its join record, another in the file list")
            self._rows[kind] = open_rows(path / rec["file"], n, self.dim, rec["bytes"], at_random=True)
        # Memory-mapped: a consumer that needs all of it reads it, opening the cache does not.
        index = path / "index" / "caption_image_index.npy"
        self._caption_image_index = np.load(index, mmap_mode="r", allow_pickle=False)
        if self._caption_image_index.shape != (self.n_captions,):
            raise ArtifactError(f"{index}: shape {self._caption_image_index.shape}, expected "
                                f"({self.n_captions},)")

    @classmethod
    def open(cls, path: str | os.PathLike, *, teacher_id: str | None = None,
             dataset_fingerprint: str | None = None, verify: bool = False) -> FeatureCache:
        """Open the cache at ``path``; refuse one of another teacher/data or one whose row files do not
        match their records (missing, other size or header, join record against the file list); no
        file is hashed, so opening costs the same at any size. ``verify`` also re-hashes
        every file (reads the whole cache: only on request); a re-run of ``edge-msd features`` does
        that too and repairs what is damaged."""
        path = Path(path)
        if not (path / MANIFEST).is_file() and (path / RUN).is_file():
            n_done = len(list((path / "done").glob("*.json"))) if (path / "done").is_dir() else 0
            raise ArtifactError(f"feature cache {path} is incomplete ({n_done} shards done); "
                                "re-run `edge-msd features` to finish it")
        manifest = read_manifest(path, KIND)
        why = _foreign(path, manifest, teacher_id,
                       None if dataset_fingerprint is None else {"fingerprint": dataset_fingerprint})
        if why:
            raise ArtifactError(why)
        if verify:
            verify_files(path, manifest)
        return cls(path, manifest)

    @property
    def n_images(self) -> int:
        return int(self.manifest["dataset"]["n_images"])

    @property
    def n_captions(self) -> int:
        return int(self.manifest["dataset"]["n_captions"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def teacher_id(self) -> str:
        return self.manifest["teacher_id"]

    @property
    def dataset_fingerprint(self) -> str:
        return self.manifest["dataset"]["fingerprint"]

    @property
    def caption_image_index(self) -> np.ndarray:
        return self._caption_image_index

    @functools.cached_property
    def valid_images(self) -> np.ndarray:
        """False for images skipped as unreadable (their rows are zeros)."""
        valid = np.ones(self.n_images, dtype=bool)
        valid[[s["image_index"] for s in self.manifest["skipped_images"]]] = False
        return valid

    @functools.cached_property
    def image_keys(self) -> list[str]:
        """Read on first use: a list of every key is large, and training needs none."""
        return json.loads((self.path / "index" / "image_keys.json").read_text(encoding="utf-8"))

    def image(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._gather("image", indices, self.n_images)

    def text(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._gather("text", indices, self.n_captions)

    def _gather(self, kind: str, indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.ndim != 1:
            raise IndexError(f"{kind} indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
            raise IndexError(f"{kind} index out of range 0..{n - 1}: {bad}")
        return gather(self._rows[kind], idx)
