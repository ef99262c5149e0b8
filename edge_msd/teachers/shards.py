"""Random-access rows of one modality of a feature cache, read from its .npy shards on demand.

The cache keeps its per-shard files (written atomically, resumable, repairable shard by shard) and
is read without copying it into memory and without one open file per shard: a gather sorts the
requested ids, reads each run of consecutive rows with one ``preadv`` straight into the output
buffer, and keeps at most ``max_open`` shard files open (least recently used closed first). Memory
and open files therefore do not grow with the number of rows; a gather costs O(batch log batch).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_msd.errors import ArtifactError

DTYPE = np.dtype("<f2")
MAX_OPEN = 32


class ShardRows:
    """Rows ``0..n-1`` stored as fp16 shards of ``shard_size`` rows (``records``: the manifest's
    shard records, in order, each with ``file``, ``rows`` and, in caches written since, ``bytes``)."""

    def __init__(self, root: Path, records: list[dict], shard_size: int, dim: int,
                 max_open: int = MAX_OPEN) -> None:
        self.root, self.records, self.shard_size, self.dim = root, records, shard_size, dim
        self.n = sum(int(r["rows"]) for r in records)
        self.max_open = max_open
        self._open: OrderedDict[int, BinaryIO] = OrderedDict()
        self._offsets: dict[int, int] = {}  # data offset of each shard whose header was checked

    def check_sizes(self) -> None:
        """Cheap integrity at open (no hashing): every shard exists and has the size its record says."""
        for rec in self.records:
            p = self.root / rec["file"]
            try:
                size = p.stat().st_size
            except OSError:
                raise ArtifactError(f"{p}: listed in the manifest but missing; re-run `edge-msd features` "
                                    "to repair the cache") from None
            if "bytes" in rec and size != rec["bytes"]:
                raise ArtifactError(f"{p}: {size} bytes, the manifest records {rec['bytes']} (truncated or "
                                    "replaced); re-run `edge-msd features` to repair the cache")

    def close(self) -> None:
        while self._open:
            self._open.popitem(last=False)[1].close()

    def __del__(self) -> None:
        self.close()

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """float32 rows ``idx`` (1-D int64, in range), in the order asked."""
        uniq, back = np.unique(idx, return_inverse=True)  # sorted: consecutive ids read together
        buf = np.empty((len(uniq), self.dim), DTYPE)
        shard, offset = np.divmod(uniq, self.shard_size)
        breaks = (np.diff(uniq) != 1) | (np.diff(shard) != 0)
        edges = np.flatnonzero(np.r_[True, breaks, True]) if len(uniq) else [0]  # run a: edges[a..a+1]
        row_bytes = self.dim * DTYPE.itemsize
        for a, b in itertools.pairwise(np.asarray(edges).tolist()):
            k = int(shard[a])
            f = self._file(k)
            view = memoryview(buf[a:b]).cast("B")
            got = os.preadv(f.fileno(), [view], self._offsets[k] + int(offset[a]) * row_bytes)
            if got != len(view):
                raise ArtifactError(f"{self.root / self.records[k]['file']}: ends early (read {got} of "
                                    f"{len(view)} bytes); re-run `edge-msd features` to repair the cache")
        return buf[back.reshape(-1)].astype(np.float32)

    def _file(self, k: int) -> BinaryIO:
        """Shard ``k``'s open file (its header checked against its record the first time)."""
        f = self._open.get(k)
        if f is not None:
            self._open.move_to_end(k)
            return f
        path = self.root / self.records[k]["file"]
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open in the LRU, closed on eviction
        except OSError as e:
            raise ArtifactError(f"{path}: cannot open shard ({e.strerror})") from None
        try:
            if k not in self._offsets:
                self._offsets[k] = self._check_header(path, f, int(self.records[k]["rows"]))
        except BaseException:
            f.close()
            raise
        self._open[k] = f
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return f

    def _check_header(self, path: Path, f: BinaryIO, rows: int) -> int:
        """The data offset of shard ``f``, once its header and size match what the cache records."""
        try:
            read = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise ArtifactError(f"{path}: not a .npy file ({e})") from None
        offset = f.tell()
        want = offset + rows * self.dim * DTYPE.itemsize
        if dtype != DTYPE or fortran or shape != (rows, self.dim) or os.fstat(f.fileno()).st_size != want:
            raise ArtifactError(f"{path}: {dtype} {shape} ({os.fstat(f.fileno()).st_size} bytes), expected "
                                f"float16 ({rows}, {self.dim}) ({want} bytes); re-run `edge-msd features`")
        return offset
