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

    # Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, sample covariances
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    kw = {"sigma": 1.5, "truncate": 3.5, "mode": "reflect"}
    n = 7 * 7  # the window's effective size for the unbiased covariance, as scikit-image does
    unbias = n / (n - 1)
    mx, my = gaussian_filter(x, **kw), gaussian_filter(y, **kw)
    vx = unbias * (gaussian_filter(x * x, **kw) - mx * mx)
    vy = unbias * (gaussian_filter(y * y, **kw) - my * my)
    cxy = unbias * (gaussian_filter(x * y, **kw) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    pad = 3  # drop the border like scikit-image's (win_size - 1) // 2 crop
    return float(s[pad:-pad, pad:-pad].mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Gaussian-window SSIM), averaged over frames; 1.0 for identical inputs."""
    a, b = _as_unit(a), _as_unit(b)
    _check_pair(a, b)
    frames = a if a.ndim == 3 else a[None]
    others = b if b.ndim == 3 else b[None]
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
