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
