"""Video quality and ECG-control metrics, with the meanings the literature gives them.

Videos are float arrays in [0, 1] (T, H, W) or uint8 (scaled to [0, 1]); frames are compared
one by one and averaged.
"""

from __future__ import annotations

import numpy as np

from echopulse.config import ECG_FS

SYSTOLE_FRACTION = 0.35  # end-systole at about a third of the R-R interval


def _as_unit(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video.astype(np.float64) / 255.0
    return video.astype(np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over all pixels (intensities in [0, 1])."""
    a, b = _as_unit(a), _as_unit(b)
    _check_pair(a, b)
    return float(np.mean((a - b) ** 2))


def mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute error over all pixels (intensities in [0, 1])."""
    a, b = _as_unit(a), _as_unit(b)
    _check_pair(a, b)
    return float(np.mean(np.abs(a - b)))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole video (``inf`` for identical inputs)."""
    err = mse(a, b)
    return float("inf") if err == 0 else float(10 * np.log10(data_range**2 / err))


def _ssim_frame(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    from scipy.ndimage import gaussian_filter

    # Wang et al. 2004: Gaussian window sigma 1.5 (11 x 11), K1 0.01, K2 0.03, population
    # covariances; the same as scikit-image's structural_similarity(gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False), border cropped by the window radius like it
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    kw = {"sigma": 1.5, "truncate": 3.5, "mode": "reflect"}
    mx, my = gaussian_filter(x, **kw), gaussian_filter(y, **kw)
    vx = gaussian_filter(x * x, **kw) - mx * mx
    vy = gaussian_filter(y * y, **kw) - my * my
    cxy = gaussian_filter(x * y, **kw) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    pad = int(3.5 * 1.5 + 0.5)  # the window radius (5)
    return float(s[pad:-pad, pad:-pad].mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Gaussian-window SSIM), averaged over frames; 1.0 for identical inputs."""
    a, b = _as_unit(a), _as_unit(b)
    _check_pair(a, b)
    frames = a if a.ndim == 3 else a[None]
    others = b if b.ndim == 3 else b[None]
    if min(frames.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11 x 11 window needs frames of at least 11 x 11, got {frames.shape[-2:]}")
    return float(np.mean([_ssim_frame(x, y, data_range) for x, y in zip(frames, others)]))


def expected_volume(frame_times_s: np.ndarray, r_peaks_s: np.ndarray, rr_s: float) -> np.ndarray:
    """The LV volume curve an ECG implies: maximal at each R-peak (end-diastole), minimal
    ``SYSTOLE_FRACTION`` of the R-R interval later (end-systole), in [0, 1]."""
    t = np.asarray(frame_times_s, dtype=np.float64)
    peaks = np.sort(np.asarray(r_peaks_s, dtype=np.float64))
    # phase within the cardiac cycle, extending the first/last R-R interval beyond the window
    prev = np.array([peaks[peaks <= x].max() if np.any(peaks <= x) else
                     peaks[0] - rr_s * np.ceil((peaks[0] - x) / rr_s) for x in t])
    phase = np.mod((t - prev) / rr_s, 1.0)
    s = SYSTOLE_FRACTION
    return np.where(phase < s, 0.5 * (1 + np.cos(np.pi * phase / s)),
                    0.5 * (1 - np.cos(np.pi * (phase - s) / (1 - s))))


def cavity_curve(video: np.ndarray) -> np.ndarray:
    """Blood-pool area per frame: the fraction of imaged pixels darker than the clip's median.

    Imaged pixels are those bright at some time (inside the sector); blood is dark in echo.
    """
    v = _as_unit(video)
    imaged = v.max(axis=0) > 0.08
    if not imaged.any():
        return np.zeros(len(v))
    threshold = np.median(v[:, imaged])
    return (v[:, imaged] < threshold * 0.6).mean(axis=1)


def ecg_sync_score(video: np.ndarray, ecg: np.ndarray, fps: float, fs: int = ECG_FS) -> float:
    """How well a clip's motion follows its ECG's timing, in [-1, 1] (``nan`` without R-peaks).

    Pearson correlation between the clip's cavity-area curve (:func:`cavity_curve`) and the volume
    curve its ECG implies (:func:`expected_volume`: end-diastole at the R-peaks). A generator that
    ignores the ECG scores about 0 on average; one that follows it scores high.

    Args:
        video: (T, H, W) frames; frame ``i`` at ``i / fps`` seconds after the ECG's first sample.
        ecg: (12, L) ECG at ``fs`` Hz, aligned with the clip.
        fps: frame rate of ``video``.
        fs: ECG sample rate.
    """
    from echopulse.transforms.ecg import detect_r_peaks

    try:
        peaks = detect_r_peaks(np.asarray(ecg, dtype=np.float64), fs) / fs
    except ValueError:
        return float("nan")
    if len(peaks) == 0:
        return float("nan")
    rr = float(np.median(np.diff(peaks))) if len(peaks) > 1 else 0.8
    times = np.arange(len(video)) / fps
    expected = expected_volume(times, peaks, rr)
    area = cavity_curve(video)
    if area.std() < 1e-9 or expected.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(area, expected)[0, 1])


def lv_area_curve(video: np.ndarray, valve_depth: float = 0.55) -> np.ndarray:
    """Left-ventricular cavity area (pixels) per frame of an apical clip.

    Blood is dark: pixels below half the sector's median intensity (after light smoothing) are
    cavity. The LV is the largest dark region above ``valve_depth`` of the sector's depth (the
    ventricles lie above the valve plane, the atria below) in the frame where that upper dark area
    is largest (end-diastole); each frame's area is its dark pixels inside that region, which the
    LV only shrinks from. The sector includes the cavities (holes filled in the ever-bright mask).

    Args:
        video: (T, H, W) frames, uint8 or [0, 1].
        valve_depth: fraction of the sector's height above which the ventricles lie.
    """
    from scipy import ndimage

    v = _as_unit(video)
    sector = ndimage.binary_fill_holes(v.max(axis=0) > 0.08)
    if not sector.any():
        return np.zeros(len(v))
    rows = np.flatnonzero(sector.any(axis=1))
    upper = np.zeros_like(sector)
    upper[: int(rows[0] + valve_depth * (rows[-1] - rows[0])) + 1] = True
    smooth = np.stack([ndimage.gaussian_filter(f, max(0.5, v.shape[-1] / 96)) for f in v])
    dark = (smooth < 0.5 * np.median(smooth[:, sector])) & (sector & upper)[None]
    ed = int(np.argmax(dark.sum(axis=(1, 2))))
    labels, n = ndimage.label(dark[ed])
    if n == 0:
        return np.zeros(len(v))
    sizes = ndimage.sum(dark[ed], labels, index=range(1, n + 1))
    region = ndimage.binary_dilation(labels == 1 + int(np.argmax(sizes)), iterations=1)
    return (dark & region[None]).sum(axis=(1, 2)).astype(np.float64)


def ef_from_video(video: np.ndarray) -> float:
    """Ejection fraction from LV cavity area, ``1 - (A_min / A_max) ** 1.5`` (``nan`` without an LV).

    Volume from area as ``V = A ** 1.5`` (the phantom's definition, area-length scaling). The clip
    must span end-diastole and end-systole; a clip shorter than a beat underestimates EF. On phantom
    clips at 32-128 px this estimator reads EF about 0.1 low (see ``evaluate``'s real-clip row).
    """
    area = lv_area_curve(video)
    if area.max() <= 0:
        return float("nan")
    return float(1.0 - (area.min() / area.max()) ** 1.5)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID/FVD formula).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with sample covariances.

    Args:
        features_a: (n, d) features, n >= 2.
        features_b: (m, d) features, m >= 2.
    """
    from scipy import linalg

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (n >= 2, d) feature sets of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if caught or not np.isfinite(covmean).all():  # singular: regularise as the reference code does
        eps = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(max(0.0, diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)))
