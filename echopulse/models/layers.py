"""Transformer pieces shared by the tokenizer, the ECG encoder and the generator.

Pre-norm blocks (nanoGPT style) on ``torch.nn.functional.scaled_dot_product_attention``. A block
can be causal (the tokenizer's temporal blocks) and can cross-attend to a context (the generator's
ECG tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, else cross-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(b, h, m, e)`` of a context, for reuse across calls (see ``kv``)."""
        k, v = rearrange(self.to_kv(context), "b m (two h e) -> two b h m e", two=2, h=self.heads)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # x: (b, n, d); context: (b, m, d_c); kv: context_kv(context), when the context is fixed
        # across calls (the sampler's ECG) and its projection need not be recomputed
        if kv is None:
            kv = self.context_kv(x if context is None else context)
        q = rearrange(self.to_q(x), "b n (h e) -> b h n e", h=self.heads)
        out = F.scaled_dot_product_attention(q, *kv, is_causal=self.causal)  # (b, h, n, e)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a context, MLP.

    Args:
        dim: token width.
        heads: attention heads.
        causal: mask self-attention so position ``i`` sees only ``<= i``.
        context_dim: width of the cross-attention context; ``None`` means no cross-attention.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, context_dim: int | None = None):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=causal)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, context_dim=context_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # x: (b, n, d); context: (b, m, d_c), or its keys/values precomputed by cross_attn.context_kv
        x = x + self.attn(self.norm_attn(x))
        if self.cross_attn is not None:
            if context is None and cross_kv is None:
                raise ValueError("this block cross-attends: pass a context")
            x = x + self.cross_attn(self.norm_cross(x), context, kv=cross_kv)
        return x + self.mlp(self.norm_mlp(x))


def init_weights(module: nn.Module) -> None:
    """nanoGPT-style init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
