"""The text tower's token-embedding table in int8, one scale per token (per row, symmetric).

The table (vocabulary × width, 49408 rows for the CLIP tokenizer) is most of a small text tower's
bytes. ``Int8Embedding`` stores it as int8 rows and a float scale per row; a lookup gathers the int8
rows of the tokens and their scales and multiplies (dequantized on the fly), so only the looked-up
rows are ever float. Families whose exporter converts a torch module (tflite, executorch, coreml)
swap it in with ``int8_token_embedding``; the ONNX families rewrite the exported graph instead
(``edge_msd.families.tensorrt``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# module path of the table in the text tower; PT2E keeps its lookup out of activation quantization (an
# int8 range over the gathered row scales would round the small ones away)
TABLE = "token_embedding"


def per_row_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``weight ≈ q * scale[:, None]``, q in [-127, 127]; (q, scale)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` kept as int8 rows and a float32 scale per row, dequantized per lookup."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        q, scale = per_row_int8(embedding.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale[:, None].contiguous())  # (vocab, 1): gathered like a row

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.weight_int8).to(torch.float32)
        return rows * F.embedding(tokens, self.scale)


def int8_token_embedding(tower: nn.Module) -> nn.Module:
    """``tower`` (changed in place: pass a copy) with its ``token_embedding`` as ``Int8Embedding``; a
    tower without that table (the image tower) is returned unchanged."""
    table = getattr(tower, TABLE, None)
    if isinstance(table, nn.Embedding):
        setattr(tower, TABLE, Int8Embedding(table))
    return tower
