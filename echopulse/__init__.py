"""EchoPulse: ECG-conditioned echocardiogram video generation on Ray."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(checkpoint: str):
    """Load a generator checkpoint for generation from Python.

    Args:
        checkpoint: a generator checkpoint directory (local path or URI).

    Returns:
        An :class:`echopulse.generate.EchoGenerator` with ``.generate(ecg, ...)``.
    """
    from echopulse.generate import EchoGenerator

    return EchoGenerator.from_checkpoint(checkpoint)
