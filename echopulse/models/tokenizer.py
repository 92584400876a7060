"""C-ViViT-style video tokenizer (Phenaki): grayscale clip <-> grid of token ids.

The first frame is patchified alone and the rest in temporal patches of ``temporal_patch`` frames,
so a clip of ``1 + k * temporal_patch`` frames becomes ``1 + k`` token frames and the first frame
can be tokenized (and primed) on its own. Spatial blocks attend within a token frame, causal temporal
blocks attend along time at each spatial position; the decoder mirrors the encoder. With
``frame_local_encoder`` (temporal patch 1) the encoder has no temporal part: a frame's ids are a
function of that frame alone, wherever it sits in a clip.

The quantizer is FSQ by default and VQ with an EMA codebook as an option
(``TokenizerConfig.quantizer``); both give ids in ``[0, codebook_size)``. A patch's embedding sees
its layer-normalised pixels and, by default, the mean and spread the norm removed
(``TokenizerConfig.patch_input``): without them a patch's brightness is lost.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from echopulse.config import TokenizerConfig
from echopulse.models.layers import TransformerBlock, init_weights
from echopulse.models.quantizer import build_quantizer, codebook_stats


class NormWithStats(nn.Module):
    """A patch layer-normalised, with the mean and standard deviation the norm took away appended."""

    def __init__(self, n: int):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = x.mean(-1, keepdim=True), x.std(-1, unbiased=False, keepdim=True)
        return torch.cat([self.norm(x), mean, std], dim=-1)


def patch_embedding(n: int, dim: int, patch_input: str) -> nn.Sequential:
    """Flattened pixel patches ``(..., n)`` -> ``(..., dim)`` as ``TokenizerConfig.patch_input`` says.

    The Linear is always item 1, so ``"normed"`` checkpoints (item 0 the LayerNorm) keep their keys.
    """
    if patch_input == "normed":
        return nn.Sequential(nn.LayerNorm(n), nn.Linear(n, dim))
    if patch_input == "normed+stats":
        return nn.Sequential(NormWithStats(n), nn.Linear(n + 2, dim))
    return nn.Sequential(nn.Identity(), nn.Linear(n, dim))


class VideoTokenizer(nn.Module):
    """Grayscale video ``(b, t, h, w)`` in [0, 1] <-> token ids ``(b, t', h', w')``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if (cfg.frames - 1) % cfg.temporal_patch:
            raise ValueError(
                f"tokenizer frames must be 1 + k * temporal_patch ({cfg.temporal_patch}), got {cfg.frames}"
            )
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}"
            )
        self.cfg = cfg
        p, pt, d = cfg.patch_size, cfg.temporal_patch, cfg.dim
        t_tokens, s, _ = cfg.token_grid

        # encoder (frame-local: one embedding for every frame, nothing temporal)
        local = cfg.frame_local_encoder
        # (built in this order so a "normed" tokenizer's seeded initialisation is as it was)
        self.first_frame_embed = None if local else patch_embedding(p * p, d, cfg.patch_input)
        self.patch_embed = patch_embedding(pt * p * p, d, cfg.patch_input)
        self.enc_spatial_pos = nn.Parameter(torch.randn(s * s, d) * 0.02)
        self.enc_temporal_pos = None if local else nn.Parameter(torch.randn(t_tokens, d) * 0.02)
        self.enc_spatial = nn.ModuleList(TransformerBlock(d, cfg.heads) for _ in range(cfg.spatial_depth))
        self.enc_temporal = nn.ModuleList(
            TransformerBlock(d, cfg.heads, causal=True) for _ in range(0 if local else cfg.temporal_depth)
        )
        self.enc_norm = nn.LayerNorm(d)
        self.to_code = nn.Linear(d, cfg.code_dim)
        self.quantizer = build_quantizer(cfg)

        # decoder (mirror: temporal first, then spatial)
        self.from_code = nn.Linear(cfg.code_dim, d)
        self.dec_spatial_pos = nn.Parameter(torch.randn(s * s, d) * 0.02)
        self.dec_temporal_pos = nn.Parameter(torch.randn(t_tokens, d) * 0.02)
        self.dec_temporal = nn.ModuleList(
            TransformerBlock(d, cfg.heads, causal=True) for _ in range(cfg.temporal_depth)
        )
        self.dec_spatial = nn.ModuleList(TransformerBlock(d, cfg.heads) for _ in range(cfg.spatial_depth))
        self.dec_norm = nn.LayerNorm(d)
        self.to_first_frame = nn.Linear(d, p * p)
        self.to_patch = nn.Linear(d, pt * p * p)

        self.apply(init_weights)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return self.cfg.token_grid

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    # ---- shapes -------------------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        expected = (self.cfg.frames, self.cfg.image_size, self.cfg.image_size)
        if video.ndim != 4 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"expected video (b, {expected[0]}, {expected[1]}, {expected[2]}) [b, t, h, w], "
                f"got {tuple(video.shape)}"
            )
        # uint8 frames (the clips/v1 column) are accepted and scaled to [0, 1]
        if video.dtype == torch.uint8:
            return video.float() / 255.0
        return video.float()

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        grid = self.cfg.token_grid
        if indices.ndim == 2 and indices.shape[1] == math.prod(grid):
            indices = indices.reshape(indices.shape[0], *grid)
        if indices.ndim != 4 or tuple(indices.shape[1:]) != grid:
            raise ValueError(
                f"expected token ids (b, {grid[0]}, {grid[1]}, {grid[2]}) or (b, {math.prod(grid)}), "
                f"got {tuple(indices.shape)}"
            )
        return indices.long()

    # ---- encoder ------------------------------------------------------------------------------

    def encode_continuous(self, video: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents ``(b, t', h', w', code_dim)``."""
        video = self._check_video(video) * 2 - 1  # (b, t, h, w) in [-1, 1]
        p, pt = self.cfg.patch_size, self.cfg.temporal_patch
        first = rearrange(video[:, :1], "b t (h p1) (w p2) -> b t h w (p1 p2)", p1=p, p2=p)
        rest = rearrange(
            video[:, 1:], "b (t pt) (h p1) (w p2) -> b t h w (pt p1 p2)", pt=pt, p1=p, p2=p
        )
        embed_first = self.patch_embed if self.first_frame_embed is None else self.first_frame_embed
        x = torch.cat([embed_first(first), self.patch_embed(rest)], dim=1)  # (b, t', h', w', d)
        b, t, h, w, _ = x.shape

        x = rearrange(x, "b t h w d -> (b t) (h w) d") + self.enc_spatial_pos
        for block in self.enc_spatial:
            x = block(x)
        if self.enc_temporal_pos is None:  # frame-local: each frame's latents from that frame alone
            x = rearrange(x, "(b t) (h w) d -> b t h w d", b=b, h=h)
            return self.to_code(self.enc_norm(x))
        x = rearrange(x, "(b t) (h w) d -> (b h w) t d", b=b, h=h) + self.enc_temporal_pos
        for block in self.enc_temporal:
            x = block(x)
        x = rearrange(x, "(b h w) t d -> b t h w d", b=b, h=h, w=w)
        return self.to_code(self.enc_norm(x))  # (b, t', h', w', c)

    def quantize(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_q (b, t', h', w', c), indices (b, t', h', w'))``."""
        return self.quantizer(self.encode_continuous(video))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``(b, t, h, w)`` in [0, 1] (or uint8) -> token ids ``(b, t', h', w')`` long."""
        return self.quantize(video)[1]

    @torch.no_grad()
    def encode_first_frame(self, image: torch.Tensor) -> torch.Tensor:
        """One frame ``(b, h, w)`` -> its token frame ``(b, h', w')``, for first-frame priming.

        Temporal attention is causal and the first frame is patchified alone, so the first token
        frame depends on the first frame only: any clip starting with ``image`` gives the same ids.
        """
        if image.ndim != 3:
            raise ValueError(f"expected one frame per sample (b, h, w), got {tuple(image.shape)}")
        clip = image.unsqueeze(1).expand(-1, self.cfg.frames, -1, -1)  # (b, t, h, w)
        return self.encode(clip)[:, 0]

    # ---- decoder ------------------------------------------------------------------------------

    def decode(self, z_q: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Codes ``(b, t', h', w', c)`` -> video ``(b, t, h, w)`` in [0, 1] (unclamped if asked)."""
        grid, c = self.cfg.token_grid, self.cfg.code_dim
        if z_q.ndim != 5 or tuple(z_q.shape[1:]) != (*grid, c):
            raise ValueError(
                f"expected codes (b, {grid[0]}, {grid[1]}, {grid[2]}, {c}), got {tuple(z_q.shape)}"
            )
        p, pt = self.cfg.patch_size, self.cfg.temporal_patch
        x = self.from_code(z_q)  # (b, t', h', w', d)
        b, t, h, w, _ = x.shape

        x = rearrange(x, "b t h w d -> (b h w) t d") + self.dec_temporal_pos
        for block in self.dec_temporal:
            x = block(x)
        x = rearrange(x, "(b h w) t d -> (b t) (h w) d", b=b, h=h, w=w) + self.dec_spatial_pos
        for block in self.dec_spatial:
            x = block(x)
        x = self.dec_norm(rearrange(x, "(b t) (h w) d -> b t h w d", b=b, h=h))

        first = rearrange(self.to_first_frame(x[:, :1]), "b t h w (p1 p2) -> b t (h p1) (w p2)", p1=p, p2=p)
        rest = rearrange(
            self.to_patch(x[:, 1:]), "b t h w (pt p1 p2) -> b (t pt) (h p1) (w p2)", pt=pt, p1=p, p2=p
        )
        video = torch.cat([first, rest], dim=1) * 0.5 + 0.5  # (b, t, h, w)
        return video.clamp(0, 1) if clamp else video

    @torch.no_grad()
    def decode_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids ``(b, t', h', w')`` (or ``(b, n)``) -> video ``(b, t, h, w)`` in [0, 1]."""
        indices = self._check_indices(indices)
        return self.decode(self.quantizer.indices_to_codes(indices))

    # ---- training -----------------------------------------------------------------------------

    def forward(
        self, video: torch.Tensor, l1_weight: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Reconstruct ``video`` through the quantizer.

        In training mode a VQ tokenizer also updates its codebook (EMA) here.

        Args:
            video: ``(b, t, h, w)`` float in [0, 1] (uint8 is scaled).
            l1_weight: weight of an extra L1 term added to the MSE loss.

        Returns:
            ``(recon (b, t, h, w) in [0, 1], loss, metrics)``. The loss is MSE (+ ``l1_weight`` * L1,
            + ``vq_commitment_weight`` * commitment for VQ). Metrics (floats): ``loss``, ``mse``,
            ``mae``, ``psnr`` (dB, per clip on the clamped reconstruction with peak 1.0, averaged
            over the batch), ``codebook_usage`` (fraction of codes used in this batch),
            ``codebook_perplexity`` (exp of the entropy of this batch's code histogram) and, for VQ,
            ``commitment``.
        """
        target = self._check_video(video)
        z = self.encode_continuous(target)
        z_q, indices = self.quantizer(z)
        recon = self.decode(z_q, clamp=False)
        mse = F.mse_loss(recon, target)
        mae = F.l1_loss(recon, target)
        loss = mse + l1_weight * mae if l1_weight else mse
        commitment = None
        if self.cfg.quantizer == "vq":
            # the codebook follows the encoder by EMA; this term makes the encoder follow the codebook
            commitment = F.mse_loss(z.float(), z_q.detach())
            loss = loss + self.cfg.vq_commitment_weight * commitment
        with torch.no_grad():
            recon = recon.clamp(0, 1)
            per_clip_mse = (recon - target).pow(2).flatten(1).mean(dim=1)  # (b,)
            psnr = (10 * torch.log10(1.0 / per_clip_mse.clamp_min(1e-10))).mean().item()
            usage, perplexity = codebook_stats(indices, self.codebook_size)
        metrics = {
            "loss": loss.item(),
            "mse": mse.item(),
            "mae": mae.item(),
            "psnr": psnr,
            "codebook_usage": usage,
            "codebook_perplexity": perplexity,
        }
        if commitment is not None:
            metrics["commitment"] = commitment.item()
        return recon, loss, metrics
