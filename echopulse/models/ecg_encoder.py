"""ST-MEM-style ECG encoder: a ViT over 12 leads, one token per (lead, patch).

Each lead is cut into non-overlapping patches of ``patch`` samples (250 Hz); a shared linear layer
embeds every patch, then a learned lead embedding (which lead) and a learned patch-position
embedding (when, shared across leads) are added. The tokens are not pooled: the generator
cross-attends to them, so it can see the timing of each beat.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from echopulse.config import ECGEncoderConfig
from echopulse.models.layers import TransformerBlock, init_weights


class ECGEncoder(nn.Module):
    """``(b, leads, samples)`` standardized ECG -> ``(b, leads * samples // patch, dim)`` tokens."""

    def __init__(self, cfg: ECGEncoderConfig):
        super().__init__()
        if cfg.samples % cfg.patch:
            raise ValueError(f"ECG samples {cfg.samples} is not divisible by patch {cfg.patch}")
        self.cfg = cfg
        self.num_patches = cfg.samples // cfg.patch
        self.patch_embed = nn.Linear(cfg.patch, cfg.dim)
        self.lead_embed = nn.Parameter(torch.randn(cfg.leads, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.apply(init_weights)

    @property
    def num_tokens(self) -> int:
        return self.cfg.leads * self.num_patches

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        """Encode.

        Args:
            ecg: ``(b, leads, samples)`` float.

        Returns:
            ``(b, leads * samples // patch, dim)`` per-patch tokens, lead-major.

        Raises:
            ValueError: when the number of leads or samples differs from the config.
        """
        cfg = self.cfg
        if ecg.ndim != 3 or ecg.shape[1] != cfg.leads or ecg.shape[2] != cfg.samples:
            raise ValueError(
                f"expected ECG (b, {cfg.leads}, {cfg.samples}) [b, leads, samples], got {tuple(ecg.shape)}"
            )
        x = rearrange(ecg.float(), "b l (n p) -> b l n p", p=cfg.patch)
        x = self.patch_embed(x)  # (b, l, n, d)
        x = x + rearrange(self.lead_embed, "l d -> l 1 d") + self.pos_embed  # (b, l, n, d)
        x = rearrange(x, "b l n d -> b (l n) d")
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (b, l * n, d)
