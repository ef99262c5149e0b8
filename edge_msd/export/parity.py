"""Parity of an exported model with the PyTorch student on the fixed probe set.

Per tower: cosine similarity of each exported embedding with the student's (min, mean), and the
change in mean Recall@1 (image↔text, percentage points) when that tower's exported embeddings
replace the student's; ``joint`` swaps both towers. A tower passes when min_cos >= the profile's
threshold for the precision and Recall@1 drops by at most max_delta_r1.
"""

from __future__ import annotations

import numpy as np

from edge_msd.contract.numerics import row_cosine
from edge_msd.eval.retrieval import retrieval_metrics


def parity_report(ref: dict[str, np.ndarray], out: dict[str, np.ndarray], caption_image_index: np.ndarray,
                  thresholds: dict) -> dict:
    """``ref``/``out``: {"image": (N, D), "text": (M, D)}; ``thresholds``: {min_cos, max_delta_r1}."""
    base = retrieval_metrics(ref["image"], ref["text"], caption_image_index)["mean_R@1"]
    report: dict = {"reference_R@1": base, "thresholds": dict(thresholds)}
    swapped = {"image": (out["image"], ref["text"]), "text": (ref["image"], out["text"])}
    for tower, (img, txt) in swapped.items():
        cos = row_cosine(out[tower].astype(np.float32), ref[tower].astype(np.float32))
        delta = retrieval_metrics(img, txt, caption_image_index)["mean_R@1"] - base
        ok = cos.min() >= thresholds["min_cos"] and -delta <= thresholds["max_delta_r1"]
        report[tower] = {"min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                         "delta_R@1": float(delta), "passed": bool(ok)}
    joint = retrieval_metrics(out["image"], out["text"], caption_image_index)["mean_R@1"] - base
    report["joint"] = {"delta_R@1": float(joint), "passed": bool(-joint <= thresholds["max_delta_r1"])}
    report["passed"] = all(report[k]["passed"] for k in ("image", "text", "joint"))
    return report
