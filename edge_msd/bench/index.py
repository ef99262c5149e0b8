"""Gallery embeddings in compact storages and exact top-k search over them (numpy only: ships to the device).

Storages, per row: ``fp32``; ``fp16``; ``int8`` (symmetric per-row scale, codes · scale ≈ vector);
``binary`` (sign bits, ``np.packbits``). ``search`` scores queries by inner product (the embeddings are
unit vectors, so cosine): int8 as an int32 dot of quantized query and codes times both scales, binary by
Hamming distance (popcount of XOR) with an optional fp32 re-rank of the best candidates.
``search_timings`` times it over N random unit vectors, for bench's tables. The approximate storage
``hnsw`` (faiss, optional) is in ``ann``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from edge_msd.bench import ann
from edge_msd.errors import ConfigError

STORAGES = ("fp32", "fp16", "int8", "binary")  # exact search in numpy: the default storages
KNOWN = STORAGES + ann.APPROXIMATE
QUERY_CHUNK = 1 << 24  # scores computed at once (queries × rows): bounds the memory of one search step
# an int8·int8 dot over D dims is exact in float32 while D · 127² < 2²⁴ (BLAS instead of numpy's int loop)
EXACT_FP32_DIM = (1 << 24) // (127 * 127)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # numpy < 2.0 fallback


def encode(vectors: np.ndarray, storage: str) -> dict[str, np.ndarray]:
    """The arrays one storage keeps for fp32 ``vectors`` (N, D)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if storage == "fp32":
        return {"vectors": v}
    if storage == "fp16":
        return {"vectors": v.astype(np.float16)}
    if storage == "int8":
        codes, scales = quantize_int8(v)
        return {"codes": codes, "scales": scales}
    if storage == "binary":
        return {"bits": np.packbits(v > 0, axis=1), "dim": np.array(v.shape[1], dtype=np.int64)}
    if storage == "hnsw":
        return ann.encode_hnsw(v)
    raise ConfigError(f"storage {storage!r}: expected one of {', '.join(KNOWN)}")


def quantize_int8(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: codes in [-127, 127] and a float32 scale per row (max |x| / 127)."""
    amax = np.abs(v).max(axis=1)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(v / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def decode(arrays: dict[str, np.ndarray], storage: str) -> np.ndarray:
    """fp32 vectors back from a storage (binary: ±1 per dimension, scaled to unit length)."""
    if storage in ("fp32", "fp16"):
        return arrays["vectors"].astype(np.float32)
    if storage == "int8":
        return arrays["codes"].astype(np.float32) * arrays["scales"][:, None]
    if storage == "binary":
        dim = int(arrays["dim"])
        signs = np.unpackbits(arrays["bits"], axis=1, count=dim).astype(np.float32) * 2 - 1
        return signs / np.sqrt(dim, dtype=np.float32)
    raise ConfigError(f"storage {storage!r}: expected one of {', '.join(STORAGES)}")


def dim_of(arrays: dict[str, Any]) -> int:
    if "faiss" in arrays:
        return ann.dim_of(arrays)
    return arrays["vectors"].shape[1] if "vectors" in arrays else \
        int(arrays["dim"]) if "dim" in arrays else arrays["codes"].shape[1]


def rows(arrays: dict[str, np.ndarray]) -> int:
    return len(next(a for k, a in arrays.items() if k != "dim"))


def check_queries(queries: Any, dim: int) -> np.ndarray:
    """Queries as (Q, dim) float32; anything else is one line naming the expected contract."""
    expected = f"queries must be a float32 numpy array of shape (Q, {dim}) or ({dim},)"
    if not isinstance(queries, np.ndarray):
        raise ConfigError(f"{expected}, got {type(queries).__name__}")
    if queries.dtype != np.float32 or queries.ndim not in (1, 2) or queries.shape[-1] != dim:
        raise ConfigError(f"{expected}, got {queries.dtype} {queries.shape}")
    return np.ascontiguousarray(queries.reshape(-1, dim))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row of ``scores`` (higher is better), best first; ties by lower id."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(picked, order, axis=1), ids


def _merge(best: tuple[np.ndarray, np.ndarray] | None, scores: np.ndarray, offset: int, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of the running best and one chunk of rows (ids offset by the chunk's start)."""
    s, i = top_k(scores, k)
    if best is None:
        return s, i + offset
    s, i = np.concatenate([best[0], s], axis=1), np.concatenate([best[1], i + offset], axis=1)
    keep = np.lexsort((i, -s), axis=1)[:, :k]
    return np.take_along_axis(s, keep, axis=1), np.take_along_axis(i, keep, axis=1)


def _chunks(n: int, q: int) -> Iterable[slice]:
    step = max(1, QUERY_CHUNK // max(1, q))
    return (slice(a, min(a + step, n)) for a in range(0, n, step))


def _int_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int32 a @ b.T of int8 matrices; through float32 BLAS where that is exact (D ≤ EXACT_FP32_DIM)."""
    if a.shape[1] <= EXACT_FP32_DIM:
        return (a.astype(np.float32) @ b.astype(np.float32).T).astype(np.int32)
    return a.astype(np.int32) @ b.astype(np.int32).T


def _hamming(query_bits: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """(Q, N) Hamming distances of packed sign bits; 64-bit words where the row length allows."""
    if bits.shape[1] % 8 == 0:
        query_bits, bits = query_bits.view(np.uint64), bits.view(np.uint64)
    out = np.empty((len(query_bits), len(bits)), dtype=np.int32)
    for j, q in enumerate(query_bits):
        x = np.bitwise_xor(bits, q)
        counts = np.bitwise_count(x) if hasattr(np, "bitwise_count") else _POPCOUNT[x.view(np.uint8)]
        out[j] = counts.sum(axis=1, dtype=np.int32)
    return out


def _scores(arrays: dict[str, np.ndarray], storage: str, q: np.ndarray, rows_: slice) -> np.ndarray:
    """Scores (Q, rows) of one chunk of the gallery; higher is better."""
    if storage in ("fp32", "fp16"):
        return q @ np.asarray(arrays["vectors"][rows_], dtype=np.float32).T  # no copy for fp32
    if storage == "int8":
        q_codes, q_scales = quantize_int8(q)
        dot = _int_dot(q_codes, arrays["codes"][rows_])
        return dot * q_scales[:, None] * arrays["scales"][rows_][None, :]
    if storage == "binary":
        dim = int(arrays["dim"])
        ham = _hamming(np.packbits(q > 0, axis=1), arrays["bits"][rows_])
        return (dim - 2 * ham).astype(np.float32) / dim  # the cosine of the ±1 sign vectors
    raise ConfigError(f"storage {storage!r}: expected one of {', '.join(STORAGES)}")


def search(arrays: dict[str, np.ndarray], storage: str, queries: np.ndarray, k: int = 10,
           rerank: int = 0, exact: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, row ids), best first, of float32 ``queries`` (Q, D) over one storage.

    ``rerank`` > 0: the best ``max(rerank, k)`` candidates of the storage are re-scored with the fp32
    vectors ``exact`` (N, D) and the k best of those returned."""
    q = check_queries(queries, dim_of(arrays))
    if k < 1:
        raise ConfigError(f"k must be ≥ 1, got {k}")
    if storage == "hnsw":
        return ann.search_hnsw(arrays, q, k)
    depth = max(k, rerank) if rerank else k
    best = None
    for part in _chunks(rows(arrays), len(q)):
        best = _merge(best, _scores(arrays, storage, q, part), part.start, depth)
    if not rerank:
        return best
    if exact is None:
        raise ConfigError("rerank needs the fp32 vectors of the gallery (build the index with fp32 storage)")
    cand = best[1]
    rescored = np.einsum("qd,qcd->qc", q, exact[cand])
    s, order = top_k(rescored, k)
    return s, np.take_along_axis(cand, order, axis=1)


def recall_at(ids: np.ndarray, reference: np.ndarray, k: int) -> float:
    """R@k as faiss counts it (1-recall@k): the fraction of queries whose exact nearest neighbour
    (``reference[:, 0]``) is among ``ids``' first k."""
    return float(np.mean([ref in row[:k] for row, ref in zip(ids, reference[:, 0], strict=True)]))


def overlap_at(ids: np.ndarray, reference: np.ndarray, k: int) -> float:
    """The stricter k@k: mean fraction of the exact top-k that ``ids``' top-k holds."""
    hits = [len(set(a[:k]) & set(b[:k])) for a, b in zip(ids, reference, strict=True)]
    return float(np.mean(hits) / min(k, reference.shape[1]))


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` random unit vectors (float32), generated in blocks so 1M rows need no float64 copy."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 1 << 16):
        block = rng.standard_normal((min(1 << 16, n - a), dim), dtype=np.float32)
        out[a:a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def storage_bytes(arrays: dict[str, Any]) -> int:
    if "faiss" in arrays:
        return ann.hnsw_bytes(arrays)
    return int(sum(a.nbytes for a in arrays.values()))


def search_timings(dim: int, sizes: Iterable[int] = (10_000, 100_000, 1_000_000),
                   storages: Iterable[str] = STORAGES, k: int = 10, queries: int = 8, rerank: int = 0,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Search time per query over N random unit vectors of ``dim``, per storage and N.

    One row per (N, storage): ``{"n", "storage", "k", "rerank", "ms_per_query", "bytes"}``; queries are
    searched one at a time (an app's query), after one untimed search."""
    q = random_unit(queries, dim, seed + 1)
    out = []
    for n in sizes:
        gallery = random_unit(int(n), dim, seed)
        for storage in storages:
            arrays = encode(gallery, storage)
            exact = gallery if rerank and storage == "binary" else None
            depth = rerank if exact is not None else 0
            search(arrays, storage, q[:1], k, depth, exact)
            t0 = time.perf_counter()
            for row in q:
                search(arrays, storage, row, k, depth, exact)
            ms = (time.perf_counter() - t0) * 1e3 / len(q)
            out.append({"n": int(n), "storage": storage, "k": k, "rerank": depth,
                        "ms_per_query": round(ms, 4), "bytes": storage_bytes(arrays)})
        del gallery
    return out
