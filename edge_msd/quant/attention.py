"""``nn.MultiheadAttention`` rewritten as plain Linear + matmul + softmax, with the same weights.

Why: the fused attention hides its projections from quantizers (modelopt and coremltools quantize
``nn.Linear`` modules, and MHA reads ``in_proj_weight`` directly), its inference fast path
(``aten::_native_multi_head_attention``) has no ONNX export, and Core ML's TorchScript frontend fails
on its shape arithmetic. The explicit form computes the same function and every piece of it exports.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_msd.errors import ConfigError


class ExplicitSelfAttention(nn.Module):
    """Self-attention with open_clip's call signature ``attn(x, x, x, need_weights=False, attn_mask=m)``."""

    def __init__(self, mha: nn.MultiheadAttention, where: str = "attention"):
        super().__init__()
        if not (mha._qkv_same_embed_dim and mha.batch_first) or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError(
                f"{where}: only batch-first self-attention without bias_k/add_zero_attn "
                "can be rewritten for quantization"
            )
        if mha.dropout:
            raise ConfigError(f"{where}: attention dropout {mha.dropout} must be 0 at quantization time")
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
