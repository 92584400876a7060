"""Helpers shared by the bench scripts (not a benchmark itself)."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
