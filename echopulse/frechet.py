"""FID and FVD from user-supplied TorchScript feature networks, by two named protocols.

``stylegan-v`` (the peers' protocol: EchoDiffusion, EchoNet-Synthetic report it): StyleGAN-V's
``fvd2048_16f`` and FID.

- FVD: the TorchScript port of the Kinetics-400 I3D (``i3d_torchscript.pt``). Each clip gives its
  first ``frames`` (16) consecutive frames, grey repeated to RGB, as uint8 (N, 3, T, H, W) in
  [0, 255]; the network is called with ``rescale=True`` (it maps [0, 255] to [-1, 1] itself),
  ``resize=True`` (it resizes to 224 x 224 itself) and ``return_features=True`` (the 400 logits
  before the softmax). One feature vector per clip; up to 2,048 real and 2,048 generated clips.
- FID: the TorchScript Inception-v3 (``inception-2015-12-05.pt``) on every frame of every clip,
  uint8 (N, 3, H, W) in [0, 255], ``return_features=True`` (the 2,048-d pool features).
- Both fit Gaussians with the population covariance (StyleGAN-V's ``FeatureStats``) and take
  the Fréchet distance with no regularisation.

``echopulse-paper`` (ECHOPulse's own evaluation scripts, for side-by-side tables only; not
comparable with the rows above): per (real, generated) pair,

- FID: Inception features of each clip's frames, sample covariances, the Fréchet distance
  divided by 11, averaged over pairs;
- "FVD": no I3D. Frames resized to 224 x 224, Inception features per frame, each feature min-max
  scaled to [0, 1] within the clip, sample covariances, the Fréchet distance, averaged over pairs.
  The paper used Keras' ImageNet InceptionV3; here the given Inception file stands in for it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from echopulse.errors import EchoPulseError

STYLEGAN_V = "stylegan-v"
ECHOPULSE_PAPER = "echopulse-paper"
PROTOCOLS = (STYLEGAN_V, ECHOPULSE_PAPER)
FVD_FRAMES = 16  # fvd2048_16f
MAX_CLIPS = 2048  # fvd2048: at most this many real and generated clips
PAPER_FID_DIVISOR = 11.0  # ECHOPulse eval/FiD.py divides each pair's FID by 11
PAPER_FVD_SIZE = 224  # ECHOPulse eval/fvd.py resizes frames to 224 x 224


def load_torchscript(path: str, what: str):
    """A TorchScript module from ``path`` on the CPU, in eval mode (never unpickles Python objects).

    Raises:
        EchoPulseError: the file is missing or is not TorchScript (one line, naming the file).
    """
    import torch

    if not Path(path).is_file():
        raise EchoPulseError(f"{path}: {what} file not found")
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise EchoPulseError(f"{path}: not a TorchScript {what} ({type(exc).__name__}: {first})") from None


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance (divided by n, as StyleGAN-V's ``FeatureStats``)."""
    x = np.asarray(features, dtype=np.float64)
    mu = x.mean(axis=0)
    return mu, x.T @ x / len(x) - np.outer(mu, mu)


def frechet_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the real part, no regularisation."""
    from scipy import linalg

    diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products: the real part is what every reference keeps
        covmean = linalg.sqrtm(np.asarray(sigma_a, np.float64) @ np.asarray(sigma_b, np.float64))
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(np.real(covmean))
    return float(np.real(value))


def _rgb(x):
    return x.repeat_interleave(3, dim=1) if x.shape[1] == 1 else x


def i3d_features(net, videos: np.ndarray, frames: int = FVD_FRAMES, batch: int = 16, device=None) -> np.ndarray:
    """StyleGAN-V FVD features of uint8 clips (N, T, H, W): (N, d), one vector per clip."""
    import torch

    if videos.shape[1] < frames:
        raise ValueError(f"FVD needs {frames} consecutive frames per clip, clips have {videos.shape[1]}")
    out = []
    with torch.inference_mode():
        for k in range(0, len(videos), batch):
            x = torch.as_tensor(np.ascontiguousarray(videos[k:k + batch, :frames]))[:, None]  # (b, 1, t, h, w)
            x = _rgb(x).to(device or "cpu")
            out.append(net(x, rescale=True, resize=True, return_features=True).float().cpu())
    return torch.cat(out).numpy()


def inception_features(net, images: np.ndarray, batch: int = 64, device=None) -> np.ndarray:
    """Inception features of uint8 images (M, H, W): (M, d)."""
    import torch

    out = []
    with torch.inference_mode():
        for k in range(0, len(images), batch):
            x = _rgb(torch.as_tensor(np.ascontiguousarray(images[k:k + batch]))[:, None]).to(device or "cpu")
            out.append(net(x, return_features=True).float().cpu())
    return torch.cat(out).numpy()


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames).float()[:, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def stylegan_v_fvd(net, real: np.ndarray, fake: np.ndarray, frames: int = FVD_FRAMES,
                   device=None) -> dict[str, Any]:
    """FVD of uint8 clips (N, T, H, W) by StyleGAN-V's protocol (at most ``MAX_CLIPS`` each)."""
    real, fake = real[:MAX_CLIPS], fake[:MAX_CLIPS]
    a = gaussian_stats(i3d_features(net, real, frames, device=device))
    b = gaussian_stats(i3d_features(net, fake, frames, device=device))
    return {"value": frechet_from_stats(*a, *b), "protocol": f"{STYLEGAN_V} fvd{MAX_CLIPS}_{frames}f",
            "real_clips": int(len(real)), "generated_clips": int(len(fake)), "frames_per_clip": frames}


def stylegan_v_fid(net, real: np.ndarray, fake: np.ndarray, device=None) -> dict[str, Any]:
    """FID of every frame of uint8 clips (N, T, H, W) by StyleGAN-V's protocol."""
    fr, ff = real.reshape(-1, *real.shape[-2:]), fake.reshape(-1, *fake.shape[-2:])
    a = gaussian_stats(inception_features(net, fr, device=device))
    b = gaussian_stats(inception_features(net, ff, device=device))
    return {"value": frechet_from_stats(*a, *b), "protocol": f"{STYLEGAN_V} fid (all frames)",
            "real_clips": int(len(real)), "generated_clips": int(len(fake)),
            "real_frames": int(len(fr)), "generated_frames": int(len(ff))}


def _sample_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def paper_fid(net, pairs: list[tuple[np.ndarray, np.ndarray]], device=None) -> dict[str, Any]:
    """ECHOPulse's per-pair FID: each (real, generated) uint8 clip pair's FID / 11, averaged."""
    values = []
    for real, fake in pairs:
        a = _sample_stats(inception_features(net, real, device=device))
        b = _sample_stats(inception_features(net, fake, device=device))
        values.append(frechet_from_stats(*a, *b) / PAPER_FID_DIVISOR)
    return {"value": float(np.mean(values)), "protocol": f"{ECHOPULSE_PAPER} per-pair fid / 11",
            "pairs": len(values)}


def _minmax(features: np.ndarray) -> np.ndarray:
    lo, hi = features.min(axis=0), features.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)  # a constant feature scales to 0, as MinMaxScaler does
    return (features - lo) / span


def paper_fvd(net, pairs: list[tuple[np.ndarray, np.ndarray]], device=None) -> dict[str, Any]:
    """ECHOPulse's per-pair "FVD": per-frame Inception features at 224 px, min-max scaled per clip."""
    values = []
    for real, fake in pairs:
        a = _sample_stats(_minmax(inception_features(net, _resize(real, PAPER_FVD_SIZE), device=device)))
        b = _sample_stats(_minmax(inception_features(net, _resize(fake, PAPER_FVD_SIZE), device=device)))
        values.append(frechet_from_stats(*a, *b))
    return {"value": float(np.mean(values)),
            "protocol": f"{ECHOPULSE_PAPER} per-pair inception 'fvd' (no I3D)", "pairs": len(values)}
