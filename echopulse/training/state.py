"""Resumable training state beside a model checkpoint: optimizer state, the step reached, and
(with EMA) the raw training weights.

A checkpoint's ``model.safetensors`` is the model it *is*: the EMA weights when EMA is on (what
validation scored and what gets exported), else the training weights. With EMA the training
weights go to ``train_weights.safetensors``, beside ``optimizer.pt``; both are dropped on export.
The optimizer state is saved with ``torch.save`` and read back with ``weights_only=True`` (tensors
and plain containers only; nothing is unpickled as code). The learning-rate schedule is a pure
function of the step, so it needs no state.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
TRAIN_WEIGHTS_FILE = "train_weights.safetensors"
TRAINING_ONLY_FILES = (OPTIMIZER_FILE, STATE_FILE, TRAIN_WEIGHTS_FILE)


def save_train_state(path: str, optimizer: torch.optim.Optimizer, step: int,
                     train_weights: nn.Module | None = None, ema_updates: int = 0) -> None:
    """Write the optimizer state and ``step`` into the checkpoint directory ``path``.

    ``train_weights``: the model whose raw weights to keep beside an EMA ``model.safetensors``.
    """
    torch.save(optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILE))
    if train_weights is not None:
        from echopulse.models.checkpoint import unwrap

        weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(train_weights).state_dict().items()}
        save_file(weights, os.path.join(path, TRAIN_WEIGHTS_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump({"step": int(step), "ema_updates": int(ema_updates)}, f)


def load_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     ema=None) -> int:
    """Restore training weights, optimizer state and (when given) the EMA from ``path``; return
    the step reached.

    A checkpoint written without EMA restores the EMA from its weights (EMA switched on later).

    Raises:
        ValueError: when the checkpoint's weights do not fit ``model``.
    """
    from echopulse.models.checkpoint import WEIGHTS_FILE

    raw = os.path.join(path, TRAIN_WEIGHTS_FILE)
    exported = load_file(os.path.join(path, WEIGHTS_FILE), device="cpu")
    weights = load_file(raw, device="cpu") if os.path.exists(raw) else exported
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    state = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
    with open(os.path.join(path, STATE_FILE)) as f:
        info = json.load(f)
    if ema is not None:
        ema.load_state_dict(exported, updates=info.get("ema_updates", 0) if os.path.exists(raw) else 0)
    return int(info["step"])

