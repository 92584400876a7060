"""Video quality and ECG-control metrics, with the meanings the literature gives them.

Videos are float arrays in [0, 1] (T, H, W) or uint8 (scaled to [0, 1]); frames are compared
one by one and averaged.
"""

from __future__ import annotations

import numpy as np

from echopulse.config import ECG_FS

# Expected LV volume timing (see :func:`expected_volume`)
QT_BAZETT_S = 0.40  # QT = 0.40 s * sqrt(RR / 1 s) (Bazett, QTc 400 ms), measured from QRS onset
QRS_ONSET_S = 0.04  # QRS onset precedes the R-peak by about 40 ms
DEFAULT_RR_S = 0.8  # R-R interval assumed when a window holds one R-peak and no rate is given


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


def end_systole_delay(rr_s: float) -> float:
    """Seconds from an R-peak to end-systole (the T-wave end): Bazett's QT less the R's lag behind
    QRS onset."""
    return QT_BAZETT_S * float(np.sqrt(rr_s)) - QRS_ONSET_S


def expected_volume(frame_times_s: np.ndarray, r_peaks_s: np.ndarray, rr_s: float) -> np.ndarray:
    """The LV volume curve an ECG implies, in [0, 1], at ``frame_times_s``.

    The Wiggers-diagram cycle: volume is maximal at each R-peak (end-diastole), falls as a
    half-cosine to its minimum at the T-wave end (end-systole, :func:`end_systole_delay`), then
    refills: rapid filling (78 % of the stroke volume in the first 40 % of diastole), diastasis
    (6 %), and the atrial kick (16 %, the last 25 %), back to 1 at the next R-peak. Beats before
    the first and after the last R-peak are extrapolated with ``rr_s``; each beat's timing uses its
    own R-R interval.

    Args:
        frame_times_s: times (s) on the ECG's clock.
        r_peaks_s: R-peak times (s), at least one.
        rr_s: R-R interval (s) used to extend the peaks beyond the window.
    """
    t = np.asarray(frame_times_s, dtype=np.float64)
    peaks = np.sort(np.asarray(r_peaks_s, dtype=np.float64))
    if peaks.size == 0 or rr_s <= 0:
        raise ValueError(f"need at least one R-peak and a positive R-R interval, got {peaks.size} and {rr_s}")
    lo = min(float(t.min(initial=peaks[0])), peaks[0])
    hi = max(float(t.max(initial=peaks[-1])), peaks[-1])
    before = peaks[0] - rr_s * np.arange(int(np.ceil((peaks[0] - lo) / rr_s)) + 1, 0, -1)
    after = peaks[-1] + rr_s * np.arange(1, int(np.ceil((hi - peaks[-1]) / rr_s)) + 2)
    beats = np.concatenate([before, peaks, after])
    out = np.ones_like(t)
    for r, r_next in zip(beats[:-1], beats[1:]):
        te = r + min(end_systole_delay(r_next - r), 0.6 * (r_next - r))
        sys = (t >= r) & (t < te)
        out[sys] = 0.5 * (1 + np.cos(np.pi * (t[sys] - r) / (te - r)))
        dia = (t >= te) & (t < r_next)
        u = (t[dia] - te) / (r_next - te)
        early = 0.5 * (1 - np.cos(np.pi * np.clip(u / 0.4, 0, 1)))
        diastasis = np.clip((u - 0.4) / 0.35, 0, 1)
        kick = 0.5 * (1 - np.cos(np.pi * np.clip((u - 0.75) / 0.25, 0, 1)))
        out[dia] = 0.78 * early + 0.06 * diastasis + 0.16 * kick
    return out


def ecg_rr_interval(r_peaks_s: np.ndarray, duration_s: float) -> float:
    """The R-R interval (s) a window's R-peaks imply: the median interval with two or more peaks;
    with one, ``DEFAULT_RR_S`` or, when longer, just more than the window shows without a second
    peak (``max(peak, duration - peak) + 30 ms``)."""
    peaks = np.sort(np.asarray(r_peaks_s, dtype=np.float64))
    if peaks.size >= 2:
        return float(np.median(np.diff(peaks)))
    if peaks.size == 1:
        return max(DEFAULT_RR_S, max(peaks[0], duration_s - peaks[0]) + 0.03)
    raise ValueError("no R-peaks")


def ecg_sync_score(video: np.ndarray, ecg: np.ndarray, fps: float, fs: int = ECG_FS,
                   heart_rate_bpm: float | None = None) -> float:
    """How well a clip's motion follows its ECG's timing, in [-1, 1] (``nan`` without R-peaks).

    Pearson correlation between the clip's LV cavity-area curve (:func:`lv_area_curve`) and the LV
    volume curve the ECG implies (:func:`expected_volume`: end-diastole at the R-peaks detected in
    ``ecg``, end-systole at the T-wave end by Bazett's QT). A static clip scores 0; a clip whose
    motion follows another ECG (another rate or phase) scores about 0 on average; one that follows
    this ECG scores near 1 (real phantom clips with their own ECG: about 0.95, 0.98 with the
    true heart rate).

    Args:
        video: (T, H, W) frames; frame ``i`` at ``i / fps`` seconds after the ECG's first sample.
        ecg: (12, L) ECG at ``fs`` Hz, aligned with the clip.
        fps: frame rate of ``video``.
        fs: ECG sample rate.
        heart_rate_bpm: the ECG's heart rate when known from a longer record (a clip's
            ``heart_rate_bpm``); otherwise estimated from the window (:func:`ecg_rr_interval`).
    """
    from echopulse.transforms.ecg import detect_r_peaks

    ecg = np.asarray(ecg, dtype=np.float64)
    try:
        peaks = detect_r_peaks(ecg, fs) / fs
    except ValueError:
        return float("nan")
    if len(peaks) == 0:
        return float("nan")
    if heart_rate_bpm is not None and np.isfinite(heart_rate_bpm) and heart_rate_bpm > 0:
        rr = 60.0 / float(heart_rate_bpm)
    else:
        rr = ecg_rr_interval(peaks, ecg.shape[-1] / fs)
    times = np.arange(len(video)) / fps
    expected = expected_volume(times, peaks, rr)
    area = lv_area_curve(video)
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


# ---- phantom-free ECG control: the motion's rate and phase from pixels alone ------------------

PIXEL_HR_RANGE_BPM = (35.0, 190.0)  # heart rates the autocorrelation looks for
PIXEL_HR_MIN_PEAK = 0.3  # autocorrelation a beat must reach to be believed
PIXEL_HR_UPSAMPLE = 4  # the motion is resampled this much finer before its autocorrelation


def _motion_axis(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(sector, centred, axis)`` of a [0, 1] video: the pixels bright at some time (holes
    filled), those pixels over time minus their mean frame ``(T, P)``, and the leading
    right-singular vector of that matrix ``(P,)``; ``None`` without a sector or with < 3 frames."""
    from scipy import ndimage

    sector = ndimage.binary_fill_holes(v.max(axis=0) > 0.08)
    if not sector.any() or len(v) < 3:
        return None
    x = v[:, sector]
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return sector, x, vt[0]


def motion_component(video: np.ndarray) -> np.ndarray:
    """The motion's first principal component over time, ``(T,)``: the projection of each frame
    (pixels inside the sector -- those bright at some time -- minus their mean frame) on the
    leading right-singular vector. Nothing about hearts or phantoms is assumed."""
    v = _as_unit(video)
    found = _motion_axis(v)
    if found is None:
        return np.zeros(len(v))
    _, x, axis = found
    return x @ axis


def pixel_heart_rate(video: np.ndarray, fps: float, upsample: int = PIXEL_HR_UPSAMPLE) -> tuple[float, float]:
    """Heart rate (bpm) of a video from its pixels: autocorrelation of :func:`motion_component`.

    The motion is first resampled ``upsample`` times finer (polyphase, band-limited), so a period
    between two whole frames (134 bpm at 10 fps is 4.48 frames) has its own autocorrelation peak
    instead of leaving the highest one at two periods (8.96, near 9). The beat period is the
    shortest autocorrelation peak (within :data:`PIXEL_HR_RANGE_BPM`) reaching 0.8 of the highest
    one, refined by a parabola through its neighbours.

    Returns:
        ``(bpm, peak)``: ``peak`` is the normalised autocorrelation at the period; ``bpm`` is
        ``nan`` (rejected) when no peak reaches :data:`PIXEL_HR_MIN_PEAK` -- a still, noisy or
        aperiodic video has no heart rate. Needs about two beats of video.
    """
    from scipy.signal import resample_poly

    m = motion_component(video)
    n = len(m)
    if n < 4 or not np.any(m):
        return float("nan"), 0.0
    m = m - np.polyval(np.polyfit(np.arange(n), m, 1), np.arange(n))  # drift is not a beat
    up = max(1, int(upsample))
    m = resample_poly(m, up, 1) if up > 1 else m
    n, rate = len(m), fps * up  # samples and samples per second from here on
    full = np.correlate(m, m, mode="full")[n - 1:]
    if full[0] <= 0:
        return float("nan"), 0.0
    # unbiased: each lag normalised by its overlap, so long lags are not penalised
    ac = full / full[0] * n / (n - np.arange(n))
    lo = max(1, int(np.floor(rate * 60.0 / PIXEL_HR_RANGE_BPM[1])))
    hi = min(n - 2, int(np.ceil(rate * 60.0 / PIXEL_HR_RANGE_BPM[0])), (2 * n) // 3)
    peaks = [k for k in range(lo, hi + 1) if ac[k] >= ac[k - 1] and ac[k] >= ac[k + 1]]
    if not peaks:
        return float("nan"), 0.0
    best = max(ac[k] for k in peaks)
    if best < PIXEL_HR_MIN_PEAK:
        return float("nan"), float(best)
    k = next(k for k in peaks if ac[k] >= 0.8 * best)
    denom = ac[k - 1] - 2 * ac[k] + ac[k + 1]
    shift = 0.5 * (ac[k - 1] - ac[k + 1]) / denom if denom < 0 else 0.0
    return float(60.0 * rate / (k + float(np.clip(shift, -0.5, 0.5)))), float(ac[k])


def beat_phase_locking(video: np.ndarray, fps: float, r_peaks_s: np.ndarray, bins: int = 5) -> float:
    """How much of the motion is explained by where each frame falls in the ECG's cardiac cycle.

    Each frame gets its phase in the R-R interval it lies in (0 at an R-peak); the motion
    component is binned by phase and the share of its variance the bin means explain (eta
    squared) is rescaled so that chance (``(bins - 1) / (frames - 1)``) is 0 and a motion that
    repeats exactly with every beat is 1. Frames before the first or after the last R-peak are
    left out. ``nan`` with fewer than two R-peaks or too few frames in the beats.
    """
    peaks = np.sort(np.asarray(r_peaks_s, dtype=np.float64))
    m = motion_component(video)
    t = np.arange(len(m)) / fps
    if len(peaks) < 2:
        return float("nan")
    inside = (t >= peaks[0]) & (t < peaks[-1])
    if inside.sum() < 2 * bins:
        return float("nan")
    k = np.searchsorted(peaks, t[inside], side="right") - 1
    phase = (t[inside] - peaks[k]) / (peaks[k + 1] - peaks[k])
    which = np.minimum((phase * bins).astype(int), bins - 1)
    x = m[inside] - m[inside].mean()
    total = float((x**2).sum())
    if total <= 1e-12:
        return 0.0
    explained = sum(float(x[which == b].sum() ** 2 / (which == b).sum()) for b in range(bins) if (which == b).any())
    eta2 = explained / total
    chance = (bins - 1) / (len(x) - 1)
    return float(np.clip((eta2 - chance) / (1 - chance), 0.0, 1.0))


def pixel_ecg_control(video: np.ndarray, fps: float, ecg: np.ndarray, fs: int = ECG_FS,
                      tolerance_bpm: float = 5.0) -> dict[str, float]:
    """ECG control measured from pixels alone (no phantom model): does the video beat at the
    ECG's rate, in step with its R-peaks?

    Args:
        video: (T, H, W) frames; frame ``i`` at ``i / fps`` s after the ECG's first sample.
        ecg: (12, L) ECG at ``fs`` Hz, aligned with the video.
        fps: frame rate of ``video``.
        fs: ECG rate.
        tolerance_bpm: how close the rates must be for ``hr_match``.

    Returns:
        ``hr_video`` (:func:`pixel_heart_rate`, nan when no beat is found), ``hr_ecg`` (from the
        R-peaks), ``hr_match`` (1.0 when within ``tolerance_bpm``, else 0.0), ``phase_locking``
        (:func:`beat_phase_locking`) and ``score`` = ``hr_match * phase_locking``.
    """
    from echopulse.transforms.ecg import detect_r_peaks

    try:
        peaks = detect_r_peaks(np.asarray(ecg, dtype=np.float64), fs) / fs
    except ValueError:
        peaks = np.array([])
    hr_ecg = float(60.0 / np.median(np.diff(peaks))) if len(peaks) >= 2 else float("nan")
    hr_video, _ = pixel_heart_rate(video, fps)
    match = float(np.isfinite(hr_video) and np.isfinite(hr_ecg) and abs(hr_video - hr_ecg) <= tolerance_bpm)
    locking = beat_phase_locking(video, fps, peaks)
    return {"hr_video": hr_video, "hr_ecg": hr_ecg, "hr_match": match, "phase_locking": locking,
            "score": match * (0.0 if not np.isfinite(locking) else locking)}


def motion_agreement(generated: np.ndarray, reference: np.ndarray, first: int = 0) -> float:
    """How closely a generated clip's motion follows a reference clip's, in [-1, 1], from pixels.

    The reference's motion direction is its leading principal component over time (the pixels
    inside its sector, minus its mean frame, as in :func:`motion_component`); both clips are
    projected on that one spatial pattern (each minus its own mean frame, so a brightness offset
    does not count) and the score is the Pearson correlation of the two curves from frame
    ``first`` on (frames before it were given, e.g. a primed first frame). A generated clip that
    contracts and relaxes when the reference does scores near 1, one that moves to another beat
    near 0, a still one 0. Nothing about hearts or phantoms is assumed: the reference is any clip
    recorded with the ECG the generated one was drawn from.
    """
    _check_pair(np.asarray(generated), np.asarray(reference))
    g, r = _as_unit(generated), _as_unit(reference)
    found = _motion_axis(r)
    if found is None or len(r) - first < 3:
        return float("nan")
    sector, x, axis = found
    ref_curve = (x @ axis)[first:]
    y = g[:, sector]
    gen_curve = ((y - y.mean(axis=0)) @ axis)[first:]
    if ref_curve.std() < 1e-9:
        return float("nan")
    if gen_curve.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(ref_curve, gen_curve)[0, 1])
