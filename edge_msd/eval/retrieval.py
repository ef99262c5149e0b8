"""Image↔text retrieval recall with several captions per image (clip_benchmark conventions).

image→text: a query image is a hit at k if ANY of its captions is among the k nearest texts.
text→image: a query caption is a hit at k if ITS image is among the k nearest images.
Imports only numpy: this module ships inside the on-device benchmark.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _rank_of_first_hit(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """For each row, how many candidates score strictly higher than its best positive."""
    best_pos = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)
    return (scores > best_pos).sum(axis=1)


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image_index: np.ndarray,
    ks: tuple[int, ...] = KS,
    chunk: int = 1024,
) -> dict:
    """Recall@k both ways, in percent, plus R-sum.

    ``caption_image_index[j]`` is the row of ``image_emb`` that caption ``j`` describes.
    Returns ``{"i2t": {"R@1": ..}, "t2i": {..}, "rsum": .., "mean_R@1": .., "n_images", "n_texts"}``.
    """
    img = _normalise(image_emb)
    txt = _normalise(text_emb)
    cap_img = np.asarray(caption_image_index, dtype=np.int64)
    if cap_img.shape != (len(txt),):
        raise ValueError(f"caption_image_index has shape {cap_img.shape}, expected ({len(txt)},)")
    if len(txt) and (cap_img.min() < 0 or cap_img.max() >= len(img)):
        raise ValueError("caption_image_index points outside the image rows")
    i2t_rank = np.empty(len(img), dtype=np.int64)
    for s in range(0, len(img), chunk):
        scores = img[s : s + chunk] @ txt.T
        positives = cap_img[None, :] == np.arange(s, s + len(scores))[:, None]
        i2t_rank[s : s + chunk] = _rank_of_first_hit(scores, positives)
    t2i_rank = np.empty(len(txt), dtype=np.int64)
    for s in range(0, len(txt), chunk):
        scores = txt[s : s + chunk] @ img.T
        positives = np.zeros_like(scores, dtype=bool)
        positives[np.arange(len(scores)), cap_img[s : s + chunk]] = True
        t2i_rank[s : s + chunk] = _rank_of_first_hit(scores, positives)
    out: dict = {"i2t": {}, "t2i": {}}
    for k in ks:
        out["i2t"][f"R@{k}"] = float(100.0 * (i2t_rank < k).mean()) if len(img) else 0.0
        out["t2i"][f"R@{k}"] = float(100.0 * (t2i_rank < k).mean()) if len(txt) else 0.0
    out["rsum"] = float(sum(out["i2t"].values()) + sum(out["t2i"].values()))
    out["mean_R@1"] = (out["i2t"].get("R@1", 0.0) + out["t2i"].get("R@1", 0.0)) / 2
    out["n_images"] = int(len(img))
    out["n_texts"] = int(len(txt))
    return out


def subset_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, caption_image_index: np.ndarray, image_mask: np.ndarray
) -> dict:
    """``retrieval_metrics`` among the images where ``image_mask`` is True and their captions only."""
    mask = np.asarray(image_mask, dtype=bool)
    cap_img = np.asarray(caption_image_index, dtype=np.int64)
    rows = np.flatnonzero(mask)
    remap = np.full(len(mask), -1)
    remap[rows] = np.arange(len(rows))
    caps = np.flatnonzero(mask[cap_img])
    return retrieval_metrics(np.asarray(image_emb)[rows], np.asarray(text_emb)[caps], remap[cap_img[caps]])


def first_images(caption_image_index: np.ndarray, n_available: int, n: int) -> tuple[int, np.ndarray]:
    """The first ``n`` of ``n_available`` images (``n`` <= 0: all): how many, and the indices of all
    their captions (in caption order)."""
    n = n_available if n <= 0 else min(n, n_available)
    return n, np.flatnonzero(np.asarray(caption_image_index) < n)


def zero_shot_accuracy(image_emb: np.ndarray, class_text_emb: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (percent) of classifying each image by its nearest class-prompt embedding."""
    pred = (_normalise(image_emb) @ _normalise(class_text_emb).T).argmax(axis=1)
    return float(100.0 * (pred == np.asarray(labels)).mean())
