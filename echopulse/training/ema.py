"""Exponential moving average of a model's weights (no Ray, no process groups).

Every rank of a DDP run keeps the same EMA (the parameters are identical after each optimizer step),
so nothing is communicated. The decay is warmed up, ``min(decay, (1 + n) / (10 + n))`` after ``n``
updates, so a short run's EMA is not dominated by the random initialisation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from echopulse.models.checkpoint import unwrap


class EMA:
    """Shadow copies of ``model``'s floating-point parameters and buffers.

    Args:
        model: the model (a DDP/compiled wrapper is unwrapped); names are its ``state_dict`` keys.
        decay: the target decay in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in unwrap(model).state_dict().items()
            if v.dtype.is_floating_point
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights in (call after each optimizer step)."""
        d = self.current_decay()
        state = unwrap(model).state_dict()
        keys = list(self.shadow)
        shadow = [self.shadow[k] for k in keys]
        current = [state[k].detach() for k in keys]
        torch._foreach_lerp_(shadow, current, 1.0 - d)  # shadow += (1 - d) * (current - shadow)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = unwrap(model).state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the EMA weights; the training weights come back after."""
        state = unwrap(model).state_dict()
        backup = {k: state[k].detach().clone() for k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in backup.items():
                    state[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int = 0) -> None:
        missing = set(self.shadow) - set(weights)
        if missing:
            raise ValueError(f"EMA weights lack {sorted(missing)[:3]}")
        for k, v in self.shadow.items():
            v.copy_(weights[k])
        self.updates = int(updates)
