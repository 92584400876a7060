"""One optimization / evaluation step for each model, over dict batches.

Plain functions: no Ray, no process groups. The caller may pass a DDP-wrapped model; train steps
call ``model(...)`` so gradients are synchronized, eval steps use the bare module.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from echopulse.models.checkpoint import unwrap


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision when asked (bf16 on GPU); a no-op otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _frames_to_video(frames: Any, device: torch.device) -> torch.Tensor:
    """uint8 ``(b, t, h, w)`` (tensor or array) -> float32 in [0, 1] on ``device``."""
    frames = torch.as_tensor(frames)
    if frames.dtype == torch.uint8:
        return frames.to(device, non_blocking=True).float().div_(255.0)
    return frames.to(device, dtype=torch.float32, non_blocking=True)


def _optimize(
    model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float | None,
    lr: float | None,
) -> float:
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = grad_clip if grad_clip and grad_clip > 0 else math.inf  # inf: measure, do not clip
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return float(grad_norm)


def tokenizer_train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    lr: float | None = None,
    amp_dtype: torch.dtype | None = None,
    l1_weight: float = 0.0,
) -> dict[str, float]:
    """One tokenizer update.

    Args:
        model: :class:`~echopulse.models.tokenizer.VideoTokenizer` (or a DDP wrapper of one).
        batch: ``{"frames": uint8 (b, t, h, w)}``.
        optimizer: e.g. from :func:`make_optimizer`.
        grad_clip: max global grad norm; ``None``/0 disables clipping.
        lr: if given, set on every param group before stepping (see :func:`lr_at`).
        amp_dtype: autocast dtype for the forward (``torch.bfloat16`` on GPU); ``None`` is fp32.
        l1_weight: weight of an L1 term added to the MSE loss.

    Returns:
        ``loss``, ``mse``, ``mae``, ``psnr``, ``codebook_usage``, ``grad_norm`` as floats.
    """
    model.train()
    device = _device(model)
    video = _frames_to_video(batch["frames"], device)
    with _autocast(device, amp_dtype):
        _, loss, metrics = model(video, l1_weight=l1_weight)
    metrics["grad_norm"] = _optimize(model, loss, optimizer, grad_clip, lr)
    return metrics


@torch.no_grad()
def tokenizer_eval_step(model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
    """Reconstruction metrics on ``{"frames": uint8 (b, t, h, w)}`` in eval mode."""
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    try:
        video = _frames_to_video(batch["frames"], _device(bare))
        _, _, metrics = bare(video)
    finally:
        bare.train(was_training)
    return metrics


def _generator_inputs(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.as_tensor(batch["tokens"]).to(device, dtype=torch.long, non_blocking=True)
    ecg = torch.as_tensor(batch["ecg"]).to(device, dtype=torch.float32, non_blocking=True)
    return tokens, ecg


def generator_train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    lr: float | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One MaskGIT update.

    Args:
        model: :class:`~echopulse.models.generator.MaskGIT` (or a DDP wrapper of one).
        batch: ``{"tokens": int (b, t', h', w') or (b, n), "ecg": float (b, 12, L)}``.
        optimizer: e.g. from :func:`make_optimizer`.
        grad_clip: max global grad norm; ``None``/0 disables clipping.
        lr: if given, set on every param group before stepping.
        amp_dtype: autocast dtype for the forward; ``None`` is fp32.

    Returns:
        ``loss``, ``masked_acc``, ``mask_ratio``, ``grad_norm`` as floats.
    """
    model.train()
    device = _device(model)
    tokens, ecg = _generator_inputs(batch, device)
    with _autocast(device, amp_dtype):
        loss, metrics = model(tokens, ecg)
    metrics["grad_norm"] = _optimize(model, loss, optimizer, grad_clip, lr)
    return metrics


@torch.no_grad()
def generator_eval_step(
    model: nn.Module,
    batch: dict[str, Any],
    mask_ratio: float = 0.5,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Masked-token ``ce`` and ``acc`` at a fixed mask ratio (conditioned, no dropout).

    ``generator`` (a CPU ``torch.Generator``) fixes which positions are masked, so evaluations
    compare across steps.
    """
    bare = unwrap(model)
    tokens, ecg = _generator_inputs(batch, _device(bare))
    return bare.masked_eval(tokens, ecg, mask_ratio=mask_ratio, generator=generator)


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT): norms, biases and 1-d params are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay
    to ``min_ratio * base_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    min_lr = base_lr * min_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> float:
    """Fraction of the ``codebook_size`` codes that occur in ``indices``."""
    indices = torch.as_tensor(indices)
    if indices.numel() == 0:
        return 0.0
    return torch.unique(indices.long()).numel() / codebook_size
