"""Pixel fidelity of video pairs, batched in torch on any device, full-frame and inside the sector.

The numpy functions in :mod:`echopulse.metrics` are the reference definitions (checked against
scikit-image); these compute the same numbers for a batch of clips at once on the model's device
(the tests check them against the reference within a tolerance), and add the in-sector variant:
the same metric over the pixels of the ultrasound sector only. Outside the sector an echo frame is
black in both clips, so whole-frame MSE falls and PSNR/SSIM rise with the share of background
(64 % of a demo clip): the in-sector numbers are the honest ones, the full-frame ones are kept for
comparison with papers that report them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * 1.5 + 0.5): scipy's gaussian_filter(sigma=1.5, truncate=3.5), an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03
SECTOR_LEVEL = 0  # ingest zeroes every pixel outside the sector: a pixel > 0 in some frame is inside


def sector_mask(frames: np.ndarray) -> np.ndarray:
    """The clip's own sector: pixels non-zero in some frame, enclosed holes filled. bool (H, W).

    Ingest (:func:`echopulse.transforms.video.mask_outside_sector`) zeroes everything outside the
    moving sector, so the region it kept is where any frame is non-zero; a cavity that is black
    in every frame is still inside (filled). A clip with no black border gives the whole frame.

    Args:
        frames: uint8 (T, H, W) real clip (the generated clip of it is scored inside the same mask).
    """
    from scipy import ndimage

    frames = np.asarray(frames)
    return ndimage.binary_fill_holes(frames.max(axis=0) > SECTOR_LEVEL)


def _unit(video) -> torch.Tensor:
    video = torch.as_tensor(video)
    if video.dtype == torch.uint8:
        return video.double() / 255.0 if video.device.type == "cpu" else video.float() / 255.0
    return video if video.is_floating_point() else video.float()


def _gauss_kernel(device, dtype) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (k / k.sum()).to(dtype)


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM of (N, H, W) images in [0, data_range], over the valid region.

    The Gaussian-window SSIM of :func:`echopulse.metrics.ssim` (Wang et al. 2004, sigma 1.5,
    population covariances). Its reference crops a border of the window radius; pixels further
    in only see the image, so a valid (unpadded) separable convolution gives the same interior
    exactly: the output is (N, H - 10, W - 10).
    """
    if min(a.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM's 11 x 11 window needs frames of at least 11 x 11, got {tuple(a.shape[-2:])}")
    dtype = torch.float64 if a.device.type == "cpu" else torch.float32
    a, b = a.to(dtype)[:, None], b.to(dtype)[:, None]
    k = _gauss_kernel(a.device, dtype)
    kh, kw = k.view(1, 1, -1, 1), k.view(1, 1, 1, -1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kh), kw)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = blur(a), blur(b)
    vx = blur(a * a) - mx * mx
    vy = blur(b * b) - my * my
    cxy = blur(a * b) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s[:, 0]


def pair_metrics(a, b, mask=None, device=None) -> dict[str, np.ndarray]:
    """MSE, MAE, PSNR (dB) and SSIM of each clip pair, full-frame and (with ``mask``) in-sector.

    Args:
        a, b: (N, T, H, W) clips, uint8 or float in [0, 1] (numpy or torch).
        mask: bool (N, H, W) or (H, W) sector per clip; ``None`` computes full-frame metrics only.
        device: torch device to compute on (default: ``a``'s).

    Returns:
        Per-clip float64 arrays (N,): ``mse``, ``mae``, ``psnr``, ``ssim`` over the whole frame, and
        ``sector_mse``, ``sector_mae``, ``sector_psnr``, ``sector_ssim`` inside the mask (``nan``
        for a clip whose mask is empty, or holds no pixel SSIM's window fits around). PSNR is
        ``inf`` for identical clips. SSIM is the per-frame mean of the SSIM map, averaged over
        frames; the in-sector SSIM takes the map of both clips blacked out beyond the sector,
        averaged over the sector's pixels (so nothing outside the sector can change it).
    """
    x, y = _unit(a), _unit(b)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"need two (N, T, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if device is not None:
        x, y = x.to(device), y.to(device)
    n, t, h, w = x.shape
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    diff = x - y
    out = {"mse": diff.pow(2).mean(dim=(1, 2, 3)), "mae": diff.abs().mean(dim=(1, 2, 3))}
    smap = ssim_map(x.reshape(n * t, h, w), y.reshape(n * t, h, w)).reshape(n, t, h - 2 * SSIM_RADIUS,
                                                                            w - 2 * SSIM_RADIUS)
    out["ssim"] = smap.mean(dim=(1, 2, 3))
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask), device=x.device).bool()
        m = m.expand(n, h, w) if m.ndim == 2 else m
        pixels = m.sum(dim=(1, 2)).to(dtype) * t  # (n,)
        mf = m[:, None].to(dtype)
        out["sector_mse"] = (diff.pow(2) * mf).sum(dim=(1, 2, 3)) / pixels
        out["sector_mae"] = (diff.abs() * mf).sum(dim=(1, 2, 3)) / pixels
        # both clips blacked out beyond the sector, so windows at its edge see no outside change
        xm, ym = (x * mf).reshape(n * t, h, w), (y * mf).reshape(n * t, h, w)
        sector_map = ssim_map(xm, ym).reshape(smap.shape)
        inner = mf[:, :, SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]
        out["sector_ssim"] = (sector_map * inner).sum(dim=(1, 2, 3)) / (inner.sum(dim=(1, 2, 3)) * t)
    result = {k: v.double().cpu().numpy() for k, v in out.items()}
    for prefix in ("", "sector_") if mask is not None else ("",):
        err = result[f"{prefix}mse"]
        with np.errstate(divide="ignore", invalid="ignore"):
            result[f"{prefix}psnr"] = np.where(err == 0, np.inf, 10 * np.log10(1.0 / err))
    return result
