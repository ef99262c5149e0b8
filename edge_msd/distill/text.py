"""The student's text tower on captions trimmed to the batch's longest: exact, and less work.

open_clip pads every caption to the full context length (32 tokens for the presets), while the demo's
captions are shorter. In an open_clip ``CLIP`` text tower with a causal mask and argmax (end-of-text)
pooling, a position only sees the ones before it and only the end-of-text position is pooled, so the
padding after the batch's longest caption cannot change the embedding nor its gradient: dropping
those columns gives the same values (up to float rounding of differently shaped matmuls). Any other
text tower (a subclass, another pooling, no causal mask, a QAT-prepared module) runs as it is.
"""

from __future__ import annotations

from torch import Tensor, nn

PAD = 0  # open_clip's SimpleTokenizer pads with 0


def _trimmable(model: nn.Module) -> bool:
    from open_clip.model import CLIP

    return (
        type(model) is CLIP
        and model.text_pool_type == "argmax"
        and isinstance(getattr(model, "attn_mask", None), Tensor)
    )


def encode_text(model: nn.Module, tokens: Tensor) -> Tensor:
    """``model.encode_text(tokens)``, computed on the columns up to the batch's longest caption."""
    if not _trimmable(model) or tokens.ndim != 2 or tokens.shape[0] == 0:
        return model.encode_text(tokens)
    used = (tokens != PAD).any(dim=0).nonzero()
    n = int(used.max()) + 1 if len(used) else tokens.shape[1]
    if n == tokens.shape[1]:
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    # open_clip's CLIP.encode_text, with the positional embedding and causal mask cut to n positions.
    text = tokens[:, :n]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:n].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x
