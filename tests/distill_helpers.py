"""A stand-in teacher for the distill, sweep and QAT tests: fixed random projections, fast and
deterministic."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class TinyTeacher:
    """A stand-in teacher: fixed random projections of pixels and of hashed words (fast, deterministic)."""

    embed_dim = 32

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.id = f"tiny-teacher-{seed}"
        self.w_img = torch.randn(3 * 8 * 8, self.embed_dim, generator=g)
        self.w_txt = torch.randn(512, self.embed_dim, generator=g)

    def preprocess(self, image):
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255)
        return x.permute(2, 0, 1)

    def tokenize(self, texts):
        out = torch.zeros(len(texts), 512)
        for i, t in enumerate(texts):
            for w in t.lower().replace(";", " ").replace(",", " ").split():
                out[i, sum(map(ord, w)) * 31 % 512] += 1
        return out

    def encode_image(self, images):
        return F.normalize(images.flatten(1) @ self.w_img, dim=-1)

    def encode_text(self, tokens):
        return F.normalize(tokens @ self.w_txt, dim=-1)
