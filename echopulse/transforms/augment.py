"""Training-time augmentation of uint8 clips for the tokenizer: the looks one phantom cannot show.

A tokenizer trained on phantom clips alone learns the phantom's vocabulary (its fan, its chamber
outlines, its brightness) and redraws a real echo in it. :func:`augment_clips` shows it each clip
mirrored or not (scanners differ in left-right convention), played forward or back, zoomed, turned
and shifted (depth, probe position), blurred (a softer point-spread) and with another gain and
grey-map exponent, so its codes have to describe what is in the picture rather than which phantom
it came from. Measured on pydicom-data's real SonoSite cine: BENCHMARKS.md, "Tokenizer on a real
echo". Torch ops on the clips' device; one draw per clip, the same for all of its frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClipAugment:
    """Ranges of :func:`augment_clips` (each drawn uniformly per clip; zoom and gamma log-uniformly).

    Attributes:
        flip: probability of a left-right mirror.
        reverse: probability of playing the clip backwards.
        zoom: (min, max) magnification about the centre.
        rotate_deg: largest rotation either way.
        shift: largest shift either way, as a fraction of the frame's size.
        blur: probability of a Gaussian blur.
        blur_px: (min, max) blur sigma in pixels of a 64-pixel frame (scaled with the size).
        gain: (min, max) factor on the grey level (clipped at white).
        gamma: (min, max) exponent of the grey map.
        lines: probability of drawing thin bright curves inside the picture (valve leaflets,
            septum and pericardium edges, which real echo shows and the phantom draws thick):
            1 to ``max_lines`` quadratic curves, each swaying a few pixels over the clip.
        max_lines: most curves per clip.
    """

    flip: float = 0.5
    reverse: float = 0.5
    zoom: tuple[float, float] = (0.8, 1.3)
    rotate_deg: float = 12.0
    shift: float = 0.1
    blur: float = 0.5
    blur_px: tuple[float, float] = (0.3, 1.5)
    gain: tuple[float, float] = (0.4, 1.3)
    gamma: tuple[float, float] = (0.7, 1.6)
    lines: float = 0.0
    max_lines: int = 4


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(t, h, w)`` frames, ``sigma`` in pixels."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    frames = x[:, None]  # (t, 1, h, w)
    frames = F.conv2d(F.pad(frames, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    frames = F.conv2d(F.pad(frames, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return frames[:, 0]


def _bright_curves(x: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` thin bright curves over one clip ``(t, h, w)`` in [0, 1], about as bright as the
    clip's brightest tissue, drawn only where the clip shows anything (never on the black
    background around the sector)."""
    t, h, w = x.shape
    scale = w / 64.0
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], -1).to(x.device)  # (h*w, 2)
    size = torch.tensor([w, h], dtype=x.dtype)
    s = torch.linspace(0, 1, 96, dtype=x.dtype)[:, None]  # (96, 1) along the curve
    frame = torch.arange(t, dtype=x.dtype)[:, None, None]  # (t, 1, 1)
    out = x.clone()
    inside = (x.amax(0) > 2 / 255).flatten()  # (h*w,)
    shown = x.flatten(1)[:, inside]
    values = shown.flatten()
    values = values[::max(1, values.numel() // 100_000)]  # an even subsample: quantile's input is bounded
    level = max(0.2, float(torch.quantile(values, 0.995))) if values.numel() else 0.5
    for _ in range(count):
        p0, p1, p2 = (_uniform(2, 0.15, 0.85, gen) * size for _ in range(3))
        curve = (1 - s) ** 2 * p0 + 2 * s * (1 - s) * p1 + s ** 2 * p2  # (96, 2)
        width = float(_uniform(1, 0.5, 1.5, gen)) * scale
        bright = min(1.0, float(_uniform(1, 0.7, 1.4, gen)) * level)  # about the clip's brightest tissue
        amp, period, phase = (float(_uniform(1, 0.0, 3.0, gen)) * scale, float(_uniform(1, 5.0, 12.0, gen)),
                              float(_uniform(1, 0.0, 2 * math.pi, gen)))
        direction = F.normalize(torch.randn(2, generator=gen, dtype=x.dtype), dim=0)
        moved = curve + amp * torch.sin(2 * math.pi * frame / period + phase) * direction  # (t, 96, 2)
        dist2 = torch.cdist(pixels[None].expand(t, -1, -1), moved.to(x.device)).amin(-1) ** 2  # (t, h*w)
        grain = 0.6 + 0.4 * torch.rand(h * w, generator=gen, dtype=x.dtype).to(x.device)  # speckled, not flat
        line = bright * torch.exp(-dist2 / (2 * width ** 2)) * grain * inside
        out = torch.maximum(out, line.view(t, h, w))
    return out


def augment_clips(frames: torch.Tensor, gen: torch.Generator, cfg: ClipAugment = ClipAugment()) -> torch.Tensor:
    """Augmented copies of uint8 clips ``(b, t, h, w)`` (same shape, dtype and device).

    Args:
        frames: uint8 clips.
        gen: a CPU ``torch.Generator``: the draws (so a seeded run is repeatable).
        cfg: the ranges.
    """
    if frames.ndim != 4 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 clips (b, t, h, w), got {frames.dtype} {tuple(frames.shape)}")
    b, _, h, w = frames.shape
    x = frames.float() / 255.0
    flip = torch.rand(b, generator=gen) < cfg.flip
    reverse = torch.rand(b, generator=gen) < cfg.reverse
    zoom = torch.exp(_uniform(b, math.log(cfg.zoom[0]), math.log(cfg.zoom[1]), gen))
    angle = torch.deg2rad(_uniform(b, -cfg.rotate_deg, cfg.rotate_deg, gen))
    shift = _uniform(2 * b, -2 * cfg.shift, 2 * cfg.shift, gen).view(b, 2)  # normalized coords span 2
    blur = torch.rand(b, generator=gen) < cfg.blur
    sigma = _uniform(b, *cfg.blur_px, gen) * (w / 64.0)
    gain = _uniform(b, *cfg.gain, gen)
    gamma = torch.exp(_uniform(b, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), gen))

    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    x = torch.where(reverse.to(x.device)[:, None, None, None], x.flip(1), x)
    # output pixel -> input pixel: rotate and shrink by the zoom about the centre, then shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # frames as channels
    if cfg.lines > 0:
        drawn = torch.rand(b, generator=gen) < cfg.lines
        counts = torch.randint(1, cfg.max_lines + 1, (b,), generator=gen)
        x = torch.stack([_bright_curves(clip, int(k), gen) if on else clip for clip, on, k in zip(x, drawn, counts)])
    x = torch.stack([_gaussian_blur(clip, float(s)) if on else clip for clip, on, s in zip(x, blur, sigma)])
    g = gain.to(x)[:, None, None, None]
    x = (x * g).clamp(0, 1) ** gamma.to(x)[:, None, None, None]
    return (x * 255).round().clamp(0, 255).to(torch.uint8)
