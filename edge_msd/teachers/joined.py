"""One contiguous file per modality: how a finished feature cache is read at any size.

The cache is written shard by shard (``image/00000.npy`` …: atomic, resumable, repairable one shard
at a time); once every shard is done, ``join`` copies the shards in order into ``image.npy`` /
``text.npy`` (temp + rename), records the sha256 of the file and of each shard's rows in
``done/image.json``, then removes the shard files. A reader maps the one file per modality: two open
files whatever the size, no copy in memory, and a gather is one sorted fancy index (O(batch)).

A run killed at any point resumes: before the rename the shards are intact; after it a shard whose
file is gone counts as done while its rows in the joined file still have their recorded sha256, and a
later ``join`` takes each shard's rows from its file when there is one, else from the joined file.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path

import numpy as np

from edge_msd.artifacts import atomic_write_json, sha256_file
from edge_msd.errors import ArtifactError

DTYPE = np.dtype("<f2")


def joined_name(kind: str) -> str:
    return f"{kind}.npy"


def joined_record(out: Path, kind: str) -> Path:
    return out / "done" / f"{kind}.json"


def _read_record(out: Path, kind: str) -> dict | None:
    path = joined_record(out, kind)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def open_rows(path: Path, rows: int, dim: int, size: int | None = None, *,
              at_random: bool = False) -> np.ndarray:
    """``path`` mapped read-only, once its size is ``size`` and its header says float16 (rows, dim).
    ``at_random``: the kernel reads only the pages asked for (no readahead), as batches are random."""
    def damaged(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: {what}; the cache records float16 ({rows}, {dim}), {size} bytes "
                             "(truncated or replaced?); re-run `edge-msd features` to repair the cache")

    try:
        have = path.stat().st_size
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; re-run `edge-msd features` to repair the cache") from None
    if size is not None and have != size:
        raise damaged(f"{have} bytes")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise damaged(f"not a readable .npy file ({e})") from None
        data = rows * dim * DTYPE.itemsize
        if dtype != DTYPE or fortran or shape != (rows, dim) or have != f.tell() + data:
            raise damaged(f"{dtype} {shape}, {have} bytes")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if at_random and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, DTYPE, buffer=mapped, offset=have - data)


def _digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest()


def region_done(out: Path, kind: str, k: int) -> bool:
    """Whether shard ``k``'s rows are in the joined file with the sha256 recorded when it was joined."""
    rec = _read_record(out, kind)
    if rec is None or k >= len(rec.get("rows_sha256", [])):
        return False
    try:
        mm = open_rows(out / rec["file"], rec["rows"], rec["dim"], rec["bytes"])
    except ArtifactError:
        return False
    return _digest(mm[rec["starts"][k] : rec["starts"][k + 1]]) == rec["rows_sha256"][k]


def _previous(out: Path, kind: str, dim: int) -> np.ndarray | None:
    """The joined file of an earlier ``join`` (shards whose files are gone are read from it), if intact."""
    rec = _read_record(out, kind)
    try:
        return open_rows(out / rec["file"], rec["rows"], dim, rec["bytes"]) if rec else None
    except (ArtifactError, KeyError, TypeError):
        return None


def join(out: Path, kind: str, shards: list[dict], dim: int) -> dict:
    """Copy the shards (their records, in order) into one file; record it; remove the shard files."""
    n = sum(int(s["rows"]) for s in shards)
    final, tmp = out / joined_name(kind), out / f".{joined_name(kind)}.tmp"
    prev = _previous(out, kind, dim)
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=(n, dim))
    digests, starts = [], [0]
    for s in shards:
        a, b = starts[-1], starts[-1] + int(s["rows"])
        src = out / s["file"]
        if src.is_file():
            dst[a:b] = open_rows(src, b - a, dim)
        elif prev is not None:  # joined before; this shard's file already removed
            dst[a:b] = prev[a:b]
        else:
            raise ArtifactError(f"{src}: missing and not in {final}; re-run `edge-msd features`")
        digests.append(_digest(dst[a:b]))
        starts.append(b)
    dst.flush()
    del dst, prev
    record = {"file": joined_name(kind), "rows": n, "dim": dim, "bytes": tmp.stat().st_size,
              "sha256": sha256_file(tmp), "starts": starts, "rows_sha256": digests}
    tmp.replace(final)
    atomic_write_json(joined_record(out, kind), record)
    for s in shards:  # only now: until the record is written, the shard files are what resumes
        (out / s["file"]).unlink(missing_ok=True)
    return record


def gather(mm: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float32 rows ``idx`` of ``mm`` in the order asked, read in file order (one sorted index)."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx), mm.shape[1]), np.float32)
    out[order] = mm[idx[order]]
    return out
