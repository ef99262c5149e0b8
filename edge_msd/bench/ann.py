"""Approximate search through faiss (HNSW over inner product): an optional storage of the gallery index.

faiss-cpu ships wheels for x86-64 and aarch64 Linux (docs/index.md), so the same index file serves the
host and a Jetson or an Arm board. The graph is kept as faiss's own serialised bytes inside the index's
npz (no pickle); it is read back once per array and cached beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_msd.errors import ConfigError

APPROXIMATE = ("hnsw",)
HNSW_M = 32  # neighbours per node: faiss's usual choice for 256–768-d embeddings
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128  # candidates per query: the recall/speed knob, recorded with the index


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ConfigError("storage hnsw needs faiss-cpu (pip install 'edge-msd[index]'; wheels exist for "
                          "x86-64 and aarch64 Linux)") from e
    return faiss


def encode_hnsw(vectors: np.ndarray) -> dict[str, np.ndarray]:
    """An HNSW graph of unit ``vectors`` (N, D) by inner product, as faiss's serialised bytes."""
    faiss = _faiss()
    graph = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    graph.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return {"faiss": faiss.serialize_index(graph), "ef_search": np.array(HNSW_EF_SEARCH, dtype=np.int64)}


def _graph(arrays: dict[str, Any]) -> Any:
    if "_graph" not in arrays:  # deserialised once: reading the graph costs more than a query
        graph = _faiss().deserialize_index(np.ascontiguousarray(arrays["faiss"], dtype=np.uint8))
        graph.hnsw.efSearch = int(arrays.get("ef_search", HNSW_EF_SEARCH))
        arrays["_graph"] = graph
    return arrays["_graph"]


def search_hnsw(arrays: dict[str, Any], q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` (scores, row ids) of float32 queries (Q, D), best first."""
    graph = _graph(arrays)
    scores, ids = graph.search(q, min(k, graph.ntotal))
    return scores, ids.astype(np.int64)


def dim_of(arrays: dict[str, Any]) -> int:
    return int(_graph(arrays).d)


def hnsw_bytes(arrays: dict[str, Any]) -> int:
    return int(np.asarray(arrays["faiss"]).nbytes)
