"""Metric functions against reference implementations (scikit-image) and exact identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from echopulse import metrics


def _pair(seed: int, shape=(4, 32, 32), noise=0.15, uint8=False):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1)
    if uint8:
        return (a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8)
    return a, b


@pytest.mark.parametrize("seed", range(4))
def test_ssim_agrees_with_scikit_image(seed):
    a, b = _pair(seed, shape=(3, 24 + 8 * seed, 32), noise=0.05 + 0.1 * seed)
    reference = np.mean([
        structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for x, y in zip(a, b)
    ])
    assert metrics.ssim(a, b) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_psnr_and_mse_agree_with_scikit_image_on_uint8(seed):
    a, b = _pair(seed, uint8=True)
    assert metrics.mse(a, b) == pytest.approx(mean_squared_error(a / 255.0, b / 255.0), rel=1e-12)
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-12)
    assert metrics.mae(a, b) == pytest.approx(np.mean(np.abs(a / 255.0 - b / 255.0)), rel=1e-12)


def test_identical_inputs_give_exact_values():
    a, _ = _pair(0, uint8=True)
    assert metrics.ssim(a, a) == 1.0
    assert metrics.mse(a, a) == 0.0
    assert metrics.mae(a, a) == 0.0
    assert metrics.psnr(a, a) == math.inf
    features = np.random.default_rng(0).normal(size=(40, 5))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_shape_mismatch_and_tiny_frames_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(np.zeros((2, 16, 16)), np.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match="11 x 11"):
        metrics.ssim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))


def test_frechet_distance_matches_closed_form_for_gaussians():
    # diagonal covariances: d = |mu_a - mu_b|^2 + sum (sa - sb)^2 with the sample stds
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(4000, 3))
    b = rng.normal(0.5, 2.0, size=(4000, 3))
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum((a.std(0, ddof=1) - b.std(0, ddof=1)) ** 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert metrics.frechet_distance(a, b) == pytest.approx(3 * 0.25 + 3 * 1.0, rel=0.1)


def test_ecg_sync_separates_own_from_other_ecg_on_phantom(clips_dataset):
    import pyarrow.parquet as pq

    from echopulse.schema import tensor_column_to_numpy

    table = pq.read_table(clips_dataset / "clips" / "part-0.parquet")
    frames = tensor_column_to_numpy(table.column("frames"))
    ecg = tensor_column_to_numpy(table.column("ecg"))
    n = len(frames)
    own = np.nanmean([metrics.ecg_sync_score(frames[i], ecg[i], 5.0) for i in range(n)])
    other = np.nanmean([metrics.ecg_sync_score(frames[i], ecg[(i + 1) % n], 5.0) for i in range(n)])
    assert own > other + 0.3


def test_ef_from_video_reads_phantom_ef():
    from echopulse.synth.phantom import make_study
    from echopulse.transforms.video import crop_region, resize_frames, sample_frames

    errors = []
    for seed, ef in ((0, 0.4), (1, 0.65)):
        study = make_study(seed, view="A4C", heart_rate_bpm=70, ef=ef, duration_s=1.5, fps=20)
        frames = crop_region(study.frames, study.region)
        clip = resize_frames(sample_frames(frames, study.fps, np.arange(11) / 10.0), 64)
        errors.append(metrics.ef_from_video(clip) - ef)
    assert all(abs(e) < 0.2 for e in errors), errors
    assert math.isnan(metrics.ef_from_video(np.zeros((5, 32, 32), dtype=np.uint8)))


# ---- ECG-sync score: real phantom clips with their own ECG, another study's ECG, a static clip ----


@pytest.fixture(scope="module")
def phantom_windows():
    """Window clips (the demo geometry: 11 frames at 10 fps, 64 px, 300 ECG samples at 250 Hz) of
    three phantom studies at 58, 76 and 97 bpm, cut as ingestion cuts them."""
    from echopulse.config import ECG_LEADS, ClipConfig
    from echopulse.synth.phantom import make_study
    from echopulse.transforms.clips import cut_clip, window_spans
    from echopulse.transforms.ecg import prepare_ecg
    from echopulse.transforms.video import crop_region

    clip = ClipConfig(frames=11, size=64, fps=10.0, ecg_samples=300, stride_s=0.45)
    clips = []
    for study, (seed, hr, view) in enumerate(((3, 58.0, "A4C"), (4, 76.0, "A2C"), (5, 97.0, "A4C"))):
        s = make_study(seed, view=view, heart_rate_bpm=hr, ef=0.55, duration_s=3.6, fps=25, rows=96, cols=120)
        prepared = prepare_ecg(s.ecg.signal, s.ecg.fs, list(ECG_LEADS))
        frames = crop_region(s.frames, s.region)
        for span in window_spans(frames.shape[0] / s.fps, prepared.duration_s, clip):
            video, ecg, _ = cut_clip(frames, s.fps, prepared, span, clip)
            clips.append({"study": study, "video": video, "ecg": ecg, "hr": prepared.heart_rate_bpm})
    return clips, clip.fps


def test_ecg_sync_is_high_for_a_clip_with_its_own_ecg(phantom_windows):
    clips, fps = phantom_windows
    assert len({c["study"] for c in clips}) == 3 and len(clips) >= 12
    estimated = [metrics.ecg_sync_score(c["video"], c["ecg"], fps) for c in clips]
    known_rate = [metrics.ecg_sync_score(c["video"], c["ecg"], fps, heart_rate_bpm=c["hr"]) for c in clips]
    assert np.mean(estimated) > 0.85, np.round(estimated, 2)
    assert np.mean(known_rate) > 0.9 and min(known_rate) > 0.75, np.round(known_rate, 2)


def test_ecg_sync_is_near_zero_with_another_studys_ecg(phantom_windows):
    clips, fps = phantom_windows
    other = [metrics.ecg_sync_score(a["video"], b["ecg"], fps, heart_rate_bpm=b["hr"])
             for a in clips[::2] for b in clips[1::2] if a["study"] != b["study"]]
    own = [metrics.ecg_sync_score(a["video"], a["ecg"], fps, heart_rate_bpm=a["hr"]) for a in clips]
    assert len(other) > 30
    assert abs(np.mean(other)) < 0.2, np.mean(other)
    assert np.mean(own) - np.mean(other) > 0.7


def test_ecg_sync_is_zero_for_a_static_clip_and_nan_without_r_peaks(phantom_windows):
    clips, fps = phantom_windows
    rng = np.random.default_rng(0)
    static = [metrics.ecg_sync_score(np.repeat(c["video"][:1], len(c["video"]), axis=0), c["ecg"], fps)
              for c in clips]
    assert static == [0.0] * len(clips)
    # a still frame with fresh noise in every frame: no motion to follow, about 0 on average
    noisy = []
    for c in clips:
        still = np.repeat(c["video"][:1].astype(np.float64), len(c["video"]), axis=0)
        still = np.clip(still + rng.normal(0, 6, still.shape), 0, 255).astype(np.uint8)
        noisy.append(metrics.ecg_sync_score(still, c["ecg"], fps))
    assert abs(np.nanmean(noisy)) < 0.25, np.round(noisy, 2)
    assert math.isnan(metrics.ecg_sync_score(clips[0]["video"], np.zeros_like(clips[0]["ecg"]), fps))


def test_expected_volume_follows_the_cardiac_cycle():
    rr = 0.8
    peaks = np.array([0.2, 1.0])
    t = np.linspace(0, 1.6, 801)
    v = metrics.expected_volume(t, peaks, rr)
    assert v.min() >= 0 and v.max() <= 1
    for r in (0.2, 1.0, 1.8 - rr):  # end-diastole (1) at each R-peak, extrapolated before the first
        assert v[np.argmin(np.abs(t - r))] == pytest.approx(1.0, abs=1e-6)
    es = 0.2 + metrics.end_systole_delay(rr)  # end-systole (0) at the T-wave end
    assert v[np.argmin(np.abs(t - es))] == pytest.approx(0.0, abs=1e-3)
    assert 0.3 < metrics.end_systole_delay(rr) < 0.4  # QT ~ 0.36 s at 75 bpm
