"""The student as two exportable towers: image → L2-normalised embedding, int32 tokens → embedding.

open_clip pools the text at the end-of-text token with ``tokens.argmax()`` over int64 ids, which
TFLite, Core ML and old ONNX opsets cannot run. ``TextTower`` takes int32 tokens and pools with a
one-hot mask of the FIRST end-of-text position (compare, cumsum, multiply, sum): the same vector
as open_clip's argmax, built only from ops every target supports.

``nn.MultiheadAttention`` is rewritten as plain Linear + matmul + softmax with the same weights
(``explicit_attention``), for export and quantization alike: its inference fast path
(``aten::_native_multi_head_attention``) has no ONNX export, the fused op hides its projections from
quantizers (modelopt and coremltools quantize ``nn.Linear`` modules; MHA reads ``in_proj_weight``
directly), and Core ML's TorchScript frontend fails on its shape arithmetic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from edge_msd.errors import ConfigError
from edge_msd.students.presets import WEIGHTS_FILE, load_open_clip_student


class ExplicitSelfAttention(nn.Module):
    """Self-attention with open_clip's call signature ``attn(x, x, x, need_weights=False, attn_mask=m)``."""

    def __init__(self, mha: nn.MultiheadAttention, where: str = "attention"):
        super().__init__()
        if not (mha._qkv_same_embed_dim and mha.batch_first) or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError(
                f"{where}: only batch-first self-attention without bias_k/add_zero_attn "
                "can be exported and quantized"
            )
        # attention dropout (mha.dropout) is left out: inference never applies it, short QAT does without
        d = mha.embed_dim
        self.heads = mha.num_heads
        self.dim = d
        self.head_dim = d // mha.num_heads
        self.scale = self.head_dim**-0.5  # python constants: no shape arithmetic in traced graphs
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        b, n = query.shape[0], query.shape[1]
        qkv = self.in_proj(query).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, n, self.dim)
        return self.out_proj(out), None


def explicit_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by ``ExplicitSelfAttention``."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                where = f"{name}.{child_name}" if name else child_name
                setattr(mod, child_name, ExplicitSelfAttention(child, where))
    return model


@dataclass
class Preprocess:
    """How an RGB uint8 image becomes the image tower's input (copied into the bundle manifest)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bicubic"
    resize_mode: str = "shortest"

    def to_manifest(self) -> dict:
        return {"size": list(self.size), "resize": self.resize, "resize_mode": self.resize_mode,
                "crop": "center", "color_order": "RGB", "scale": 1.0 / 255.0,
                "mean": list(self.mean), "std": list(self.std), "layout": "NCHW"}

    def normalise(self, images_u8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 → (N, 3, H, W) float32, the bundle's documented formula."""
        x = images_u8.astype(np.float32) * np.float32(1.0 / 255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(image), dim=-1)


class TextTower(nn.Module):
    """open_clip's encode_text for the built-in text transformer, with int32 tokens and mask pooling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # CLIP keeps the text parts on the model; CustomTextCLIP keeps a TextTransformer in .text
        src = model.text if hasattr(model, "text") else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(src, n) for n in needed):
            raise ConfigError(f"text tower {type(src).__name__} is not an open_clip TextTransformer: "
                              "only the built-in text transformer can be exported")
        if getattr(src, "cls_emb", None) is not None:
            raise ConfigError("text tower: a class-token (CoCa) text tower cannot be exported")
        if getattr(src, "use_pad_mask", False):
            raise ConfigError("text tower: op 'pad mask' (use_pad_mask) is not supported by the exporters")
        self.pool_type = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise ConfigError(f"text tower: pool type {self.pool_type!r} is not supported")
        self.eos_id = getattr(src, "text_eos_id", None) or getattr(src, "eos_id", None)
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)

    def _pool_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) float one-hot of the position open_clip pools at."""
        length = tokens.shape[1]
        if self.pool_type == "first":
            return F.one_hot(torch.zeros_like(tokens[:, 0]).long(), length).to(torch.float32)
        if self.pool_type == "last":
            return F.one_hot(torch.full_like(tokens[:, 0], length - 1).long(), length).to(torch.float32)
        if self.pool_type == "eos":
            hit = (tokens == self.eos_id).to(torch.float32)
        else:  # argmax: eot is the largest id; the max is computed on int32, never an int64 argmax
            hit = (tokens == tokens.max(dim=1, keepdim=True).values).to(torch.float32)
        return hit * (torch.cumsum(hit, dim=1) == 1).to(torch.float32)  # first hit only, like argmax

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]  # static at export; a no-op slice would become an `alias` Core ML rejects
        full = length == self.positional_embedding.shape[0]
        pos = self.positional_embedding if full else self.positional_embedding[:length]
        x = self.token_embedding(tokens) + pos
        mask = self.attn_mask
        if mask is not None and not full:
            mask = mask[:length, :length]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = (x * self._pool_weights(tokens).to(x.dtype).unsqueeze(-1)).sum(dim=1)
        if self.text_projection is not None:
            proj = self.text_projection
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


@dataclass
class Student:
    """A loaded student: the open_clip model, its towers, tokenizer and preprocessing."""

    model: nn.Module
    image: ImageTower
    text: TextTower
    tokenizer: object  # open_clip tokenizer (callable: list[str] -> LongTensor)
    preprocess: Preprocess
    val_transform: object  # open_clip's eval transform (PIL -> tensor)
    context_length: int
    embed_dim: int
    name: str
    source: str
    sha256: str


def load_student_towers(folder: str | Path) -> Student:
    """A student folder as two exportable towers (explicit attention, module docstring), loaded by
    ``load_open_clip_student``: its manifest and sha256s are verified before anything is read."""
    folder = Path(folder)
    loaded = load_open_clip_student(folder)
    model = loaded.model
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], list | tuple) else (cfg["size"], cfg["size"])
    prep = Preprocess(size=tuple(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      resize=cfg.get("interpolation", "bicubic"),
                      resize_mode=cfg.get("resize_mode", "shortest"))
    exportable = explicit_attention(copy.deepcopy(model))  # ``model`` stays open_clip's own
    text = TextTower(exportable).eval()
    ctx = int(text.positional_embedding.shape[0])
    with torch.no_grad():
        dim = int(text(torch.zeros(1, ctx, dtype=torch.int32)).shape[-1])
    return Student(model=model, image=ImageTower(exportable).eval(), text=text, tokenizer=loaded.tokenizer,
                   preprocess=prep, val_transform=loaded.preprocess, context_length=ctx, embed_dim=dim,
                   name=loaded.preset, source=str(folder), sha256=loaded.manifest["files"][WEIGHTS_FILE])
