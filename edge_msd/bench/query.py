"""End-to-end query latency: what one app query costs, stage by stage, one query at a time.

Image query: encoded file → decode + resize (raw.decode_image) → normalise (the model's input contract)
→ image tower at batch 1 → top-k search over a gallery. Text query: caption → tokenize → text tower at
batch 1 → search. Every stage is timed per query with ``perf_counter_ns`` around it, over the same queries
(the eval set's raw files and captions, cycled to ``QUERIES``), after one untimed query. The towers'
batch-1 sessions are the ones bench timed; the gallery is the eval set's image embeddings bench
computed, plus ``--gallery`` sizes of random unit vectors for the search stage alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edge_msd.bench import index
from edge_msd.bench.raw import bundle_tokenizer, decode_image, raw_reason, tokenize
from edge_msd.bench.runtimes import Session
from edge_msd.bench.timing import Deadline, Stop, latency_stats
from edge_msd.contract.format import EVALSET
from edge_msd.contract.raw import TEXTS, unpack_files
from edge_msd.contract.reading import Bundle, image_model_input, input_contract
from edge_msd.errors import ConfigError

QUERIES = 64  # timed queries per direction (the eval set's items, cycled)
K = 10
IMAGE_STAGES = ("decode", "normalise", "model", "search")
TEXT_STAGES = ("tokenize", "model", "search")
COLD_TOKENIZE = "tokenize_cold"  # word cache emptied before each query; the vocabulary stays loaded


def time_pipeline(stages: Sequence[tuple[str, Callable[[Any], Any]]], items: Sequence[Any],
                  deadline: Deadline) -> dict[str, list[int]]:
    """ns per stage (and ``total``) of each item passed through ``stages`` in turn, one item at a time,
    after one untimed item."""
    clock = time.perf_counter_ns
    out: dict[str, list[int]] = {name: [] for name, _ in stages} | {"total": []}
    for i in range(len(items) + 1):
        if deadline.passed():
            raise Stop
        value = items[max(0, i - 1)]
        start = a = clock()
        times = []
        for _, step in stages:
            value = step(value)
            b = clock()
            times.append(b - a)
            a = b
        if i:  # the first pass warms caches and is not kept
            for (name, _), t in zip(stages, times, strict=True):
                out[name].append(t)
            out["total"].append(a - start)
    return out


def brief(samples_ns: Sequence[int]) -> dict[str, Any]:
    """n, p50 and p90 (ms) of per-query times."""
    stats = latency_stats(samples_ns)
    return {k: stats.get(k) for k in ("n", "p50", "p90")}


def searcher(arrays: dict[str, np.ndarray], storage: str) -> Callable[[np.ndarray], Any]:
    """The search stage: top-``K`` of one query embedding over an encoded gallery."""
    return lambda q: index.search(arrays, storage, q, K)


def summarise(samples: dict[str, list[int]], model_alone_ms: float | None) -> dict[str, Any]:
    """p50/p90 per stage, the model's share of the total p50 and the totals against the model alone
    (bench's batch-1 p50 of the tower)."""
    out: dict[str, Any] = {"stages": {name: brief(s) for name, s in samples.items()}}
    total, model = out["stages"]["total"]["p50"], out["stages"]["model"]["p50"]
    out["model_share"] = model / total if total else None
    out["model_alone_ms"] = model_alone_ms
    if model_alone_ms:
        out["total_over_model"] = total / model_alone_ms
    return out


def _cycle(items: Sequence[Any], n: int = QUERIES) -> list[Any]:
    return [items[i % len(items)] for i in range(n)]


def _model(session: Session) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.asarray(session.run(session.prepare(x)), dtype=np.float32).reshape(1, -1)


def image_query(bundle: Bundle, data: dict, session: Session, search: Callable, deadline: Deadline,
                model_alone_ms: float | None) -> tuple[dict[str, Any], np.ndarray]:
    """The image direction's summary, and the query embeddings (for the gallery rows)."""
    pre = bundle.manifest.get("preprocessing") or {}
    contract = input_contract(bundle, "image")
    files = _cycle(unpack_files(data, str(bundle.root / EVALSET)))
    embs: list[np.ndarray] = []

    def search_kept(emb: np.ndarray) -> Any:  # keeps the query embeddings for the gallery rows
        embs.append(emb)
        return search(emb)

    stages = [("decode", lambda f: decode_image(f, pre)),
              ("normalise", lambda frame: image_model_input(frame[None], pre, contract)),
              ("model", _model(session)), ("search", search_kept)]
    samples = time_pipeline(stages, files, deadline)
    out = summarise(samples, model_alone_ms)
    # from a uint8 frame at model size: what an app holding camera frames pays
    frame = [a + b for a, b in zip(samples["normalise"], samples["model"], strict=True)]
    out["frame_to_embedding"] = brief(frame)
    if model_alone_ms:
        out["frame_over_model"] = out["frame_to_embedding"]["p50"] / model_alone_ms
    return out, np.concatenate(embs[1:])


def text_query(bundle: Bundle, data: dict, session: Session, search: Callable, deadline: Deadline,
               model_alone_ms: float | None) -> dict[str, Any]:
    """The text direction: warm tokenization (every caption tokenized once before timing, so the word
    cache holds their words) in the pipeline, cold tokenization (cache emptied per query) beside it."""
    tokenizer = bundle_tokenizer(bundle)
    captions = _cycle([str(t) for t in data[TEXTS]])
    stages = [("tokenize", lambda c: tokenize(tokenizer, [c])), ("model", _model(session)),
              ("search", search)]
    for c in captions:  # warm: every word of the queries seen once
        tokenize(tokenizer, [c])
    samples = time_pipeline(stages, captions, deadline)

    def cold(c: str) -> np.ndarray:
        tokenizer.forget()
        return tokenize(tokenizer, [c])

    cold_ns = time_pipeline([("cold", cold)], captions, deadline)["cold"]
    out = summarise(samples, model_alone_ms)
    out["stages"][COLD_TOKENIZE] = brief(cold_ns)
    embed = [a + b for a, b in zip(samples["tokenize"], samples["model"], strict=True)]
    out["caption_to_embedding"] = brief(embed)
    if model_alone_ms:
        out["caption_over_model"] = out["caption_to_embedding"]["p50"] / model_alone_ms
    return out


def gallery_rows(gallery: np.ndarray, sizes: Sequence[int], storage: str, queries: np.ndarray,
                 deadline: Deadline) -> list[dict[str, Any]]:
    """Search time per query (the real query embeddings, one at a time) over the eval gallery and over
    random unit galleries of ``sizes`` rows."""
    out = []
    for source, n in [("eval", len(gallery)), *(("random", int(n)) for n in sizes)]:
        vectors = gallery if source == "eval" else index.random_unit(n, gallery.shape[1])
        search = searcher(index.encode(vectors, storage), storage)
        del vectors
        samples = time_pipeline([("search", search)], list(queries), deadline)["search"]
        out.append({"n": n, "source": source, "storage": storage, "k": K, "search_ms": brief(samples)})
    return out


def check_storage(storage: str) -> None:
    """``--gallery-storage`` names one of the exact storages (index.STORAGES)."""
    if storage not in index.STORAGES:
        raise ConfigError(f"--gallery-storage {storage!r}: expected {' | '.join(index.STORAGES)}")


def skip_reason(sets: dict[str, dict | None], embs: dict[str, dict], recall: bool) -> str | None:
    """Why no end-to-end query is timed here (None: it is)."""
    if not recall:
        return "--no-recall: no eval set loaded, so no query inputs and no gallery"
    reason = raw_reason(sets.get("eval"))
    if reason:
        return f"eval set has no raw inputs: {reason}" + (" (older bundle)" if "bundle" in reason else "")
    if "eval" not in embs.get("image", {}):
        return "no eval-set image embeddings for the gallery (image tower not benched)"
    return None


def query_report(bundle: Bundle, sets: dict[str, dict | None], embs: dict[str, dict],
                 sessions: dict[str, Session], model_alone: dict[str, float | None], recall: bool,
                 gallery: Sequence[int], storage: str, deadline: Deadline) -> dict[str, Any]:
    """The report's ``query`` entry: per direction its stages (or why skipped), and the gallery rows."""
    reason = skip_reason(sets, embs, recall)
    if reason:
        return {"skipped": reason}
    data, vectors = sets["eval"], embs["image"]["eval"]
    search = searcher(index.encode(vectors, storage), storage)
    out: dict[str, Any] = {"k": K, "storage": storage, "gallery_n": len(vectors)}
    queries = None
    for tower in ("image", "text"):
        session, alone = sessions.get(tower), model_alone.get(tower)
        if session is None:
            out[tower] = {"skipped": f"no batch-1 {tower} session (--batch without 1, or tower not benched)"}
        elif tower == "image":
            out[tower], queries = image_query(bundle, data, session, search, deadline, alone)
        else:
            try:
                out[tower] = text_query(bundle, data, session, search, deadline, alone)
            except (OSError, ValueError, KeyError) as e:
                out[tower] = {"skipped": f"bundle tokenizer unusable: {e}"}
    if queries is None:
        queries = index.random_unit(QUERIES, vectors.shape[1], seed=1)
    out["gallery"] = gallery_rows(vectors, gallery, storage, queries, deadline)
    return out
