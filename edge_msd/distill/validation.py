"""What a run measures: the student's retrieval on a split, and the plot of its losses and weights."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_msd.artifacts import atomic_write_bytes
from edge_msd.distill.splits import SplitData
from edge_msd.distill.text import encode_text
from edge_msd.eval.retrieval import retrieval_metrics


@torch.no_grad()
def encode_split(
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Student embeddings (normalised float32 numpy) of uint8 images and token rows."""
    was = model.training
    model.eval()
    img, txt = [], []
    for s in range(0, len(images), batch):
        x = (images[s : s + batch].to(device).float() / 255 - mean.to(device)) / std.to(device)
        img.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    for s in range(0, len(tokens), batch):
        txt.append(F.normalize(encode_text(model, tokens[s : s + batch].to(device)).float(), dim=-1).cpu())
    model.train(was)
    empty = np.zeros((0, 0), np.float32)
    return (torch.cat(img).numpy() if img else empty), (torch.cat(txt).numpy() if txt else empty)


def validate(model: nn.Module, data: SplitData, mean: Tensor, std: Tensor, device: torch.device) -> dict:
    """Student retrieval metrics on a split (its usable images and their captions)."""
    images, captions, targets = data.usable()
    tokens = data.tokens[torch.from_numpy(captions)]
    img, txt = encode_split(model, data.images.get(images), tokens, mean, std, device)
    return retrieval_metrics(img, txt, targets)


def read_metrics(path: Path) -> Iterator[dict]:
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def plot_metrics(metrics: Path, out_png: Path) -> None:
    """losses.png: every loss (log scale) and every balancer weight against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics) if "losses" in r]
    if not records:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    steps = [r["step"] for r in records]
    for name in records[-1]["losses"]:
        ax1.plot(steps, [r["losses"].get(name, float("nan")) for r in records], label=name)
        ax2.plot(steps, [r["weights"].get(name, float("nan")) for r in records], label=name)
    ax1.set_yscale("log")
    ax1.set_ylabel("loss")
    ax2.set_ylabel("balancer weight")
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax1.set_title("distillation losses and weights")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
