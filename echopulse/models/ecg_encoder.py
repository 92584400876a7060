"""ST-MEM-style ECG encoder: a ViT over 12 leads, one token per (lead, patch).

Each lead is cut into non-overlapping patches of ``patch`` samples (250 Hz). Every patch is
normalised, embedded by one shared linear layer and normalised again; a learned position embedding
(when, shared across leads) and a learned lead embedding (which lead) are added. Each lead's run of
patches is framed by a learned SEP token on either side, so attention can tell where one lead ends
and the next begins. All leads' tokens go through pre-norm transformer blocks together.

The output keeps the per-patch tokens (SEP tokens dropped) instead of pooling them to one vector:
the generator cross-attends to them, so it can see the timing of each beat. ST-MEM applies its
final LayerNorm to the mean-pooled vector; here the same norm (same weights, loaded from a
checkpoint) is applied to every per-patch token. A LayerNorm acts on each vector alone, so this is
the pretrained norm applied where the tokens are used; the pooled vector ST-MEM normalised is not
formed, and the generator's ``ecg_proj`` (trained) adapts to per-token statistics.

The layout is that of ST-MEM (Na et al., ICLR 2024), so :func:`load_stmem_checkpoint` can load an
encoder checkpoint the user supplies. ST-MEM's code and weights are CC BY-NC: nothing of them is
included here, only a mapping of their parameter names.
"""

from __future__ import annotations

import logging
import os
import pickle
import re

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from echopulse.config import ECGEncoderConfig
from echopulse.models.layers import init_weights

logger = logging.getLogger(__name__)


class ECGBlock(nn.Module):
    """Pre-norm ViT block with a fused, biased query-key-value projection (ST-MEM's layout)."""

    def __init__(self, dim: int, heads: int, mlp_mult: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ECG encoder dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_mult * dim), nn.GELU(), nn.Linear(mlp_mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b, n, d)
        q, k, v = rearrange(self.qkv(self.norm_attn(x)), "b n (three h e) -> three b h n e",
                            three=3, h=self.heads)
        attn = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, e)
        x = x + self.attn_out(rearrange(attn, "b h n e -> b n (h e)"))
        return x + self.mlp(self.norm_mlp(x))


class ECGEncoder(nn.Module):
    """``(b, leads, samples)`` standardized ECG -> ``(b, leads * samples // patch, dim)`` tokens."""

    def __init__(self, cfg: ECGEncoderConfig):
        super().__init__()
        if cfg.samples % cfg.patch:
            raise ValueError(f"ECG samples {cfg.samples} is not divisible by patch {cfg.patch}")
        self.cfg = cfg
        self.num_patches = cfg.samples // cfg.patch
        d = cfg.dim
        self.patch_embed = nn.Sequential(nn.LayerNorm(cfg.patch), nn.Linear(cfg.patch, d), nn.LayerNorm(d))
        # position 0 is the left SEP, 1..n the patches, n + 1 the right SEP
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches + 2, d) * 0.02)
        self.sep_embed = nn.Parameter(torch.randn(d) * 0.02)
        self.lead_embed = nn.Parameter(torch.randn(cfg.leads, d) * 0.02)
        self.blocks = nn.ModuleList(ECGBlock(d, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.apply(init_weights)
        if cfg.freeze:
            self.freeze()

    @property
    def num_tokens(self) -> int:
        return self.cfg.leads * self.num_patches

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or restart) training the encoder: sets ``requires_grad`` of all its parameters."""
        for param in self.parameters():
            param.requires_grad_(not frozen)

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
        b, n = ecg.shape[0], self.num_patches
        x = rearrange(ecg.float(), "b l (n p) -> b l n p", p=cfg.patch)
        x = self.patch_embed(x) + self.pos_embed[1:-1]  # (b, l, n, d)
        left = (self.sep_embed + self.pos_embed[0]).expand(b, cfg.leads, 1, -1)  # (b, l, 1, d)
        right = (self.sep_embed + self.pos_embed[-1]).expand(b, cfg.leads, 1, -1)
        x = torch.cat([left, x, right], dim=2) + rearrange(self.lead_embed, "l d -> l 1 d")  # (b, l, n+2, d)
        x = rearrange(x, "b l n d -> b (l n) d")
        for block in self.blocks:
            x = block(x)
        x = rearrange(x, "b (l n) d -> b l n d", l=cfg.leads)[:, :, 1 : n + 1]  # drop the SEP tokens
        return self.norm(rearrange(x, "b l n d -> b (l n) d"))  # (b, l * n, d)


# ---- ST-MEM checkpoints -----------------------------------------------------------------------

# ST-MEM parameter name -> ours, per block; ST-MEM's `to_patch_embedding.0` is a reshape (no weights)
# and its dropout layers sit at `to_out.1`, `net.2` and `net.4`
_STMEM_BLOCK_KEYS = {
    "attn.norm": "norm_attn",
    "attn.fn.to_qkv": "qkv",
    "attn.fn.to_out.0": "attn_out",
    "ff.norm": "norm_mlp",
    "ff.fn.net.0": "mlp.0",
    "ff.fn.net.3": "mlp.2",
}
_STMEM_EMBED_KEYS = {
    "to_patch_embedding.1": "patch_embed.0",
    "to_patch_embedding.2": "patch_embed.1",
    "to_patch_embedding.3": "patch_embed.2",
    "norm": "norm",
}
_BLOCK_KEY = re.compile(r"^block(\d+)\.(.+)\.(weight|bias)$")
_LEAD_KEY = re.compile(r"^lead_embeddings\.(\d+)$")
_IGNORED_PREFIXES = ("head.",)  # ST-MEM's classifier head; we emit tokens, not classes


def stmem_state_to_ours(
    stmem: dict[str, torch.Tensor], leads: int, sources: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Rename (and reshape) an ST-MEM encoder state dict to :class:`ECGEncoder`'s names.

    ``pos_embedding (1, n + 2, d)`` becomes ``pos_embed (n + 2, d)``; the ``leads`` vectors
    ``lead_embeddings.{i} (d,)`` are stacked into ``lead_embed (leads, d)``; ``head.*`` is dropped.
    ``sources``, when given, is filled with our name -> the ST-MEM name it came from.

    Raises:
        ValueError: for a key that is not part of an ST-MEM encoder, or missing lead embeddings.
    """
    ours: dict[str, torch.Tensor] = {}
    sources = {} if sources is None else sources
    lead_vectors: dict[int, torch.Tensor] = {}
    for key, value in stmem.items():
        if key.startswith("module."):  # saved from a DDP wrapper
            key = key[len("module."):]
        if key.startswith(_IGNORED_PREFIXES):
            logger.info("ST-MEM checkpoint: ignoring %s", key)
            continue
        if key == "pos_embedding":
            ours["pos_embed"] = value[0] if value.ndim == 3 else value
            sources["pos_embed"] = key
        elif key == "sep_embedding":
            ours["sep_embed"] = value
            sources["sep_embed"] = key
        elif (match := _LEAD_KEY.match(key)) is not None:
            lead_vectors[int(match.group(1))] = value
        elif (match := _BLOCK_KEY.match(key)) is not None and match.group(2) in _STMEM_BLOCK_KEYS:
            name = f"blocks.{match.group(1)}.{_STMEM_BLOCK_KEYS[match.group(2)]}.{match.group(3)}"
            ours[name], sources[name] = value, key
        elif (prefix := key.rsplit(".", 1)[0]) in _STMEM_EMBED_KEYS and key.endswith((".weight", ".bias")):
            name = f"{_STMEM_EMBED_KEYS[prefix]}.{key.rsplit('.', 1)[1]}"
            ours[name], sources[name] = value, key
        else:
            raise ValueError(f"ST-MEM checkpoint: unexpected key {key!r} (not part of an ST-MEM encoder)")
    if lead_vectors:
        if sorted(lead_vectors) != list(range(len(lead_vectors))):
            raise ValueError(f"ST-MEM checkpoint: lead_embeddings are not numbered 0..n-1: {sorted(lead_vectors)}")
        if len(lead_vectors) != leads:
            raise ValueError(
                f"ST-MEM checkpoint: lead_embeddings: expected {leads} leads, checkpoint has {len(lead_vectors)}"
            )
        shapes = {tuple(v.shape) for v in lead_vectors.values()}
        if len(shapes) != 1:
            raise ValueError(f"ST-MEM checkpoint: lead_embeddings.*: vectors of different shapes {sorted(shapes)}")
        ours["lead_embed"] = torch.stack([lead_vectors[i] for i in range(leads)])
        sources["lead_embed"] = f"lead_embeddings.0..{leads - 1} (stacked)"
    return ours


def load_stmem_checkpoint(
    path: str | os.PathLike, model: ECGEncoder, freeze: bool = False
) -> ECGEncoder:
    """Load an ST-MEM encoder checkpoint (``encoder.pth``) into ``model``.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs); it may be the
    state dict itself or a dict holding it under ``"model"`` (how ST-MEM saves it). The encoder's
    config must match the checkpoint: the released ST-MEM ViT-B is ``dim=768, depth=12, heads=12``,
    ``samples=2250, patch=75``, 12 leads.

    Args:
        path: the checkpoint file.
        model: the encoder to load into (e.g. ``generator.ecg_encoder``), changed in place.
        freeze: also freeze the encoder (``requires_grad`` False).

    Returns:
        ``model``.

    Raises:
        ValueError: an unreadable file, a missing or unexpected key, or a tensor whose shape differs
            from the encoder's (the message names the key, the expected and the given shape).
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        # weights_only refuses pickled objects other than tensors and plain containers
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read ST-MEM checkpoint {path} as weights only: {first_line}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"ST-MEM checkpoint {path}: expected a state dict (or {{'model': state dict}})")
    load_stmem_state(loaded, model, str(path))
    if freeze:
        model.freeze()
    logger.info("loaded ST-MEM encoder weights from %s%s", path, " (frozen)" if freeze else "")
    return model


def load_stmem_state(loaded: dict[str, torch.Tensor], model: ECGEncoder, path: str = "state dict") -> None:
    """Load an ST-MEM encoder state dict (its own key names) into ``model``, checking every key and
    shape (``path`` names the source in errors). Works on the meta device too (a shape check)."""
    sources: dict[str, str] = {}
    state = stmem_state_to_ours(loaded, model.cfg.leads, sources)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"ST-MEM checkpoint {path}: no tensor for our {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (encoder depth {model.cfg.depth})")
    extra = sorted(sources[k] for k in set(state) - set(expected))
    if extra:
        raise ValueError(f"ST-MEM checkpoint {path}: {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"has no place in an encoder of depth {model.cfg.depth}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"ST-MEM checkpoint {path}: {sources[key]} (our {key}): expected shape "
                             f"{tuple(tensor.shape)}, given {tuple(state[key].shape)}")
    model.load_state_dict(state, assign=next(iter(expected.values())).is_meta)
