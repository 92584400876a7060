"""One optimization / evaluation step for each model, over dict batches.

Plain functions: no Ray, no process groups. The caller may pass a DDP-wrapped model; train steps
call ``model(...)`` so gradients are synchronized, eval steps use the bare module.

Gradient accumulation: a train step takes one batch or a list of micro-batches. Each micro-batch's
loss is weighted by its share of the samples, so the summed gradient is that of the whole batch
(exactly, for per-sample mean losses); under DDP every micro-batch but the last runs in
``model.no_sync()``, so gradients are all-reduced once per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

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


def _batch_size(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values())))


def _accumulate(
    model: nn.Module,
    batch: dict[str, Any] | list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    lr: float | None,
    forward: Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, float]]],
) -> dict[str, float]:
    """Forward/backward over the micro-batches, one optimizer step; sample-weighted metrics."""
    micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    if not micro:
        raise ValueError("a train step needs at least one micro-batch")
    sizes = [_batch_size(b) for b in micro]
    total = sum(sizes)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for i, (b, n) in enumerate(zip(micro, sizes)):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            loss, metrics = forward(b)
            (loss * (n / total)).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
    out = {k: v / total for k, v in sums.items()}
    max_norm = grad_clip if grad_clip and grad_clip > 0 else math.inf  # inf: measure, do not clip
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    out["grad_norm"] = float(grad_norm)
    return out


def tokenizer_train_step(
    model: nn.Module,
    batch: dict[str, Any] | list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    lr: float | None = None,
    amp_dtype: torch.dtype | None = None,
    l1_weight: float = 0.0,
) -> dict[str, float]:
    """One tokenizer update.

    Args:
        model: :class:`~echopulse.models.tokenizer.VideoTokenizer` (or a DDP wrapper of one).
        batch: ``{"frames": uint8 (b, t, h, w)}``, or a list of such micro-batches (accumulated).
        optimizer: e.g. from :func:`make_optimizer`.
        grad_clip: max global grad norm; ``None``/0 disables clipping.
        lr: if given, set on every param group before stepping (see :func:`lr_at`).
        amp_dtype: autocast dtype for the forward (``torch.bfloat16`` on GPU); ``None`` is fp32.
        l1_weight: weight of an L1 term added to the MSE loss.

    Returns:
        every numeric metric the model returns (``loss``, ``mse``, ``mae``, ``psnr``,
        ``codebook_usage``, ...; sample-weighted over micro-batches) and ``grad_norm``, as floats.
    """
    model.train()
    device = _device(model)

    def forward(b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        video = _frames_to_video(b["frames"], device)
        with _autocast(device, amp_dtype):
            _, loss, metrics = model(video, l1_weight=l1_weight)
        return loss, _numeric(metrics)

    return _accumulate(model, batch, optimizer, grad_clip, lr, forward)


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
    return _numeric(metrics)


@torch.no_grad()
def tokenizer_val_step(model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, float], torch.Tensor]:
    """Reconstruction quality of ``{"frames": uint8 (b, t, h, w)}`` in eval mode, fp32.

    Returns:
        ``(metrics, recon)``: the model's numeric metrics plus ``mse``, ``psnr`` (dB) and ``ssim``
        (Gaussian window, :func:`echopulse.fidelity.pair_metrics`), each the mean over the batch's clips of
        the per-clip value on the clamped reconstruction; ``recon`` is ``(b, t, h, w)`` in [0, 1].
    """
    from echopulse import fidelity as quality

    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    try:
        video = _frames_to_video(batch["frames"], _device(bare))
        recon, _, model_metrics = bare(video)
    finally:
        bare.train(was_training)
    recon = recon.float().clamp(0, 1)
    out = _numeric(model_metrics)
    per_clip = (recon - video).pow(2).flatten(1).mean(dim=1)  # (b,)
    out["mse"] = per_clip.mean().item()
    out["psnr"] = (10 * torch.log10(1.0 / per_clip.clamp_min(1e-10))).mean().item()
    if min(video.shape[-2:]) >= 11:  # batched on the model's device
        out["ssim"] = float(quality.pair_metrics(video, recon)["ssim"].mean())
    return out, recon


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The model's metrics that are numbers (scalars or one-element tensors), as floats."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _generator_inputs(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.as_tensor(batch["tokens"]).to(device, dtype=torch.long, non_blocking=True)
    ecg = torch.as_tensor(batch["ecg"]).to(device, dtype=torch.float32, non_blocking=True)
    return tokens, ecg


def generator_conditions(model: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The extra conditions the generator's config asks for, from a batch: ``view`` (int ids, -1
    unknown; or view names, see :func:`echopulse.config.view_id`), ``ef`` (fractions, NaN
    unknown) and an optional ``lead_mask`` (b, 12) bool.

    A batch without a column the model needs gives "unknown" for every row (so a tokens dataset
    from before the column existed still trains), never an error mid-run.
    """
    from echopulse.config import view_id

    cfg = unwrap(model).cfg
    b = _batch_size(batch)
    out: dict[str, Any] = {}
    if cfg.num_views > 0:
        view = batch.get("view")
        if view is None:
            view = torch.full((b,), -1, dtype=torch.long)
        elif not isinstance(view, torch.Tensor) and len(view) and isinstance(view[0], (str, bytes)):
            view = torch.tensor([view_id(v, cfg.num_views) for v in view], dtype=torch.long)
        out["view"] = torch.as_tensor(view).to(device, dtype=torch.long)
    if cfg.ef_conditioning:
        ef = batch.get("ef")
        out["ef"] = (torch.full((b,), float("nan")) if ef is None else torch.as_tensor(ef)).to(
            device, dtype=torch.float32)
    if batch.get("lead_mask") is not None:
        out["lead_mask"] = torch.as_tensor(batch["lead_mask"]).to(device, dtype=torch.bool)
    return out


def make_condition_columns_fn(num_views: int, ef_conditioning: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A numpy-batch transform for a ``tokens/v1`` dataset: ``view`` names become int64 ids
    (-1 unknown, :func:`echopulse.config.view_id`) and ``ef`` float32 (missing: NaN), so the
    batches reach torch; columns the model does not condition on are dropped."""
    import numpy as np

    from echopulse.config import view_id

    def fn(batch: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in batch.items() if k not in ("view", "ef")}
        n = len(next(iter(batch.values())))
        if num_views > 0:
            names = batch.get("view", [None] * n)
            out["view"] = np.asarray([view_id(v, num_views) for v in names], dtype=np.int64)
        if ef_conditioning:
            ef = batch.get("ef")
            out["ef"] = (np.full(n, np.nan, dtype=np.float32) if ef is None
                         else np.asarray([np.nan if v is None else v for v in ef], dtype=np.float32))
        return out

    return fn


def generator_train_step(
    model: nn.Module,
    batch: dict[str, Any] | list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    lr: float | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One MaskGIT update.

    Args:
        model: :class:`~echopulse.models.generator.MaskGIT` (or a DDP wrapper of one).
        batch: ``{"tokens": int (b, t', h', w') or (b, n), "ecg": float (b, 12, L)}`` plus, for a
            view/EF-conditioned model, ``"view"`` and ``"ef"`` (see :func:`generator_conditions`),
            and optionally ``"lead_mask"``; or a list of such micro-batches (accumulated; each
            micro-batch's loss is its masked-token mean, weighted by its sample count).
        optimizer: e.g. from :func:`make_optimizer`.
        grad_clip: max global grad norm; ``None``/0 disables clipping.
        lr: if given, set on every param group before stepping.
        amp_dtype: autocast dtype for the forward; ``None`` is fp32.

    Returns:
        ``loss``, ``masked_acc``, ``mask_ratio``, ``grad_norm`` as floats.
    """
    model.train()
    device = _device(model)

    def forward(b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, ecg = _generator_inputs(b, device)
        conditions = generator_conditions(model, b, device)
        with _autocast(device, amp_dtype):
            loss, metrics = model(tokens, ecg, **conditions)
        return loss, _numeric(metrics)

    return _accumulate(model, batch, optimizer, grad_clip, lr, forward)


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
    return bare.masked_eval(tokens, ecg, mask_ratio=mask_ratio, generator=generator,
                            **generator_conditions(bare, batch, _device(bare)))


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
