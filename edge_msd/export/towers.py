"""The student as two exportable towers: image → L2-normalised embedding, int32 tokens → embedding.

open_clip pools the text at the end-of-text token with ``tokens.argmax()`` over int64 ids, which
TFLite, Core ML and old ONNX opsets cannot run. ``TextTower`` takes int32 tokens and pools with a
one-hot mask of the FIRST end-of-text position (compare, cumsum, multiply, sum): the same vector
as open_clip's argmax, built only from ops every target supports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_msd.errors import ArtifactError, ConfigError

STUDENT_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


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


def check_student_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: student folder not found (run `edge-msd distill` first)")
    for f in STUDENT_FILES:
        if not (folder / f).is_file():
            raise ArtifactError(f"{folder} is not a student folder: {f} is missing")
    try:
        json.loads((folder / STUDENT_FILES[0]).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{folder / STUDENT_FILES[0]}: not valid JSON ({e})") from e


def load_student(folder: str | Path, model: nn.Module | None = None) -> Student:
    """Load a student folder (open_clip hub layout). ``model`` overrides its weights, e.g. a QAT model."""
    import open_clip

    from edge_msd.artifacts import sha256_file

    folder = Path(folder)
    check_student_dir(folder)
    try:
        loaded, _, val_tf = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (RuntimeError, KeyError, ValueError) as e:
        raise ArtifactError(f"{folder}: open_clip cannot load this student ({e})") from e
    model = (model or loaded).eval()
    cfg = open_clip.get_model_preprocess_cfg(loaded)
    size = cfg["size"] if isinstance(cfg["size"], list | tuple) else (cfg["size"], cfg["size"])
    prep = Preprocess(size=tuple(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      resize=cfg.get("interpolation", "bicubic"),
                      resize_mode=cfg.get("resize_mode", "shortest"))
    text = TextTower(model).eval()
    ctx = int(text.positional_embedding.shape[0])
    with torch.no_grad():
        dim = int(text(torch.zeros(1, ctx, dtype=torch.int32)).shape[-1])
    manifest = folder / "manifest.json"
    name = json.loads(manifest.read_text()).get("preset", folder.name) if manifest.is_file() else folder.name
    return Student(model=model, image=ImageTower(model).eval(), text=text, tokenizer=tokenizer,
                   preprocess=prep, val_transform=val_tf, context_length=ctx, embed_dim=dim,
                   name=str(name), source=str(folder), sha256=sha256_file(folder / STUDENT_FILES[1]))
