"""The numerics that the host (export parity, the families' runners) and the device (bench) must
compute alike: int8 quantization of a model's inputs and outputs, running a static-batch model over
any number of rows, and the cosine of embedding rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: Any = np.int8) -> np.ndarray:
    """``q = clip(round(x / scale) + zero_point)`` to the range of the integer ``dtype``."""
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32: the inverse of ``quantize`` up to rounding."""
    return (np.asarray(q).astype(np.float32) - zero_point) * np.float32(scale)


def run_batched(fn: Runner, x: np.ndarray, batch: int) -> np.ndarray:
    """Run a static-batch model over any number of rows: the last chunk is padded by repeating its last
    row, and the padded rows' outputs are cut. ``batch <= 0``: the model takes every row at once."""
    if batch <= 0:
        return fn(x)
    outs = []
    for s in range(0, len(x), batch):
        chunk = x[s : s + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(fn(chunk)[:n])
    return np.concatenate(outs)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (zero rows count as norm 1e-12)."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def cosine_summary(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Min and mean of ``row_cosine(a, b)`` and the row count, as reports keep them."""
    cos = row_cosine(a, b)
    return {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "n": int(len(cos))}
