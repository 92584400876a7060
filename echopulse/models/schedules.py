"""Masking schedules: progress ``r`` in [0, 1] -> fraction of tokens masked.

One small module shared by training (``r ~ U(0, 1)``, mask ``schedule(r)`` of the tokens) and by
sampling (after step ``s`` of ``S``, ``schedule((s + 1) / S)`` of the unknown tokens stay masked).
Every named schedule is monotone non-increasing with ``schedule(0) == 1`` and ``schedule(1) == 0``.
Truncated forms (:func:`truncated_schedule`) keep the shape but run from ``high`` down to ``low``
(e.g. never mask fewer than 10% of the tokens in training); the generator's
``mask_ratio_min``/``mask_ratio_max`` are exactly this truncation.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch

Progress = Union[torch.Tensor, float]
Schedule = Callable[[Progress], Progress]


def _apply(r: Progress, fn: Callable[[torch.Tensor], torch.Tensor]) -> Progress:
    """Evaluate ``fn`` on ``r`` clamped to [0, 1], with exact endpoints; floats in, float out."""
    is_float = not isinstance(r, torch.Tensor)
    x = torch.as_tensor(r, dtype=torch.float64) if is_float else r
    x = x.clamp(0.0, 1.0)
    out = fn(x).clamp(0.0, 1.0)
    # cos(pi/2) is 6e-17, not 0: pin the endpoints so "fully masked" / "done" are exact
    out = torch.where(x <= 0, torch.ones_like(out), out)
    out = torch.where(x >= 1, torch.zeros_like(out), out)
    return float(out) if is_float else out


def cosine_schedule(r: Progress) -> Progress:
    """``cos(r * pi / 2)``: the MaskGIT default, few tokens decoded early, many late."""
    return _apply(r, lambda x: torch.cos(x * math.pi / 2))


def linear_schedule(r: Progress) -> Progress:
    """``1 - r``."""
    return _apply(r, lambda x: 1 - x)


def square_schedule(r: Progress) -> Progress:
    """``1 - r^2``."""
    return _apply(r, lambda x: 1 - x**2)


def cubic_schedule(r: Progress) -> Progress:
    """``1 - r^3``."""
    return _apply(r, lambda x: 1 - x**3)


def sqrt_schedule(r: Progress) -> Progress:
    """``1 - sqrt(r)``: many tokens decoded early."""
    return _apply(r, lambda x: 1 - torch.sqrt(x))


def arccos_schedule(r: Progress) -> Progress:
    """``arccos(r) / (pi / 2)`` (MaskGIT's arccos variant)."""
    return _apply(r, lambda x: torch.arccos(x) / (math.pi / 2))


def exp_schedule(r: Progress) -> Progress:
    """``(exp(-5 r) - exp(-5)) / (1 - exp(-5))``: an exponential decay, pinned to hit 0 at r = 1."""
    return _apply(r, lambda x: (torch.exp(-5 * x) - math.exp(-5)) / (1 - math.exp(-5)))


SCHEDULES: dict[str, Schedule] = {
    "cosine": cosine_schedule,
    "linear": linear_schedule,
    "square": square_schedule,
    "cubic": cubic_schedule,
    "sqrt": sqrt_schedule,
    "arccos": arccos_schedule,
    "exp": exp_schedule,
}


def get_schedule(name: str) -> Schedule:
    """The masking schedule called ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(
            f"unknown masking schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}"
        ) from None


def truncated_schedule(schedule: str | Schedule, low: float = 0.0, high: float = 1.0) -> Schedule:
    """The truncated form of a schedule: ``low + (high - low) * schedule(r)``.

    Monotone non-increasing like its base, with ``value(0) == high`` and ``value(1) == low``.

    Args:
        schedule: a name from :data:`SCHEDULES` or a schedule function.
        low: the masked fraction at ``r = 1``.
        high: the masked fraction at ``r = 0``.

    Raises:
        ValueError: an unknown name, or bounds outside ``0 <= low < high <= 1``.
    """
    base = get_schedule(schedule) if isinstance(schedule, str) else schedule
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"truncated schedule bounds must satisfy 0 <= low < high <= 1, got [{low}, {high}]")

    def truncated(r: Progress) -> Progress:
        return low + (high - low) * base(r)

    truncated.__name__ = f"truncated_{getattr(base, '__name__', 'schedule')}"
    return truncated


# ---- decoding orders ---------------------------------------------------------------------------

ORDERS = ("confidence", "halton")


def _radical_inverse(index: int, base: int) -> float:
    """The ``index``-th term of the van der Corput sequence in ``base``."""
    out, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        out += digit * scale
        scale /= base
    return out


def halton_order(grid: tuple[int, ...]) -> torch.Tensor:
    """Every flat position of ``grid`` once, in the order a Halton sequence visits its cells.

    The Halton scheduler (Besnier et al., ICLR 2025) decodes tokens in this fixed low-discrepancy
    order instead of by confidence: each step's new tokens are spread over the whole clip, so
    neighbours (which are strongly correlated and would be drawn independently in one step)
    rarely land in the same step. Point ``i`` is ``(phi_2(i), phi_3(i), phi_5(i), ...)`` scaled to
    the grid; a cell enters the order at its first visit (cells the first ``64 * cells`` points
    miss, if any, follow in raster order).

    Returns:
        ``(prod(grid),)`` long: a permutation of ``range(prod(grid))`` (row-major flat indices).
    """
    bases = (2, 3, 5, 7, 11, 13)[: len(grid)]
    if len(grid) != len(bases) or any(g < 1 for g in grid):
        raise ValueError(f"halton_order takes a grid of 1-{len((2, 3, 5, 7, 11, 13))} positive sizes, got {grid}")
    cells = math.prod(grid)
    strides = [math.prod(grid[k + 1:]) for k in range(len(grid))]
    seen: dict[int, None] = {}
    for i in range(1, 64 * cells + 1):
        flat = sum(min(g - 1, int(_radical_inverse(i, base) * g)) * stride
                   for g, base, stride in zip(grid, bases, strides))
        seen.setdefault(flat, None)
        if len(seen) == cells:
            break
    order = list(seen) + [c for c in range(cells) if c not in seen]
    return torch.tensor(order, dtype=torch.long)


def check_order(name: str) -> str:
    """``name`` if it is a known decoding order (:data:`ORDERS`), else ValueError listing them."""
    if name not in ORDERS:
        raise ValueError(f"unknown decoding order {name!r}; known: {', '.join(ORDERS)}")
    return name
