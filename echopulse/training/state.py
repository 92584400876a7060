"""Resumable training state beside a model checkpoint: optimizer state and the step reached.

The optimizer state is saved with ``torch.save`` and read back with ``weights_only=True`` (tensors
and plain containers only; nothing is unpickled as code). Model weights stay in the checkpoint's
safetensors file. The learning-rate schedule is a pure function of the step, so it needs no state.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"


def save_train_state(path: str, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write the optimizer state and ``step`` into the checkpoint directory ``path``."""
    torch.save(optimizer.state_dict(), os.path.join(path, OPTIMIZER_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump({"step": int(step)}, f)


def load_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model weights and optimizer state from ``path``; return the step reached.

    Raises:
        ValueError: when the checkpoint's weights do not fit ``model``.
    """
    from echopulse.models.checkpoint import WEIGHTS_FILE

    weights = load_file(os.path.join(path, WEIGHTS_FILE), device="cpu")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    state = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
    with open(os.path.join(path, STATE_FILE)) as f:
        return int(json.load(f)["step"])


def is_resumable(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, name)) for name in (OPTIMIZER_FILE, STATE_FILE))
