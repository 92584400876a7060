import numpy as np
import pytest

from echopulse.transforms.video import (
    crop_region,
    estimate_region,
    mask_outside_sector,
    resize_frames,
    sample_frames,
)


def test_crop_region_is_inclusive_and_clipped():
    frames = np.arange(2 * 10 * 12, dtype=np.uint8).reshape(2, 10, 12)
    out = crop_region(frames, (2, 3, 5, 7))
    assert out.shape == (2, 5, 4)
    assert out[0, 0, 0] == frames[0, 3, 2] and out[0, -1, -1] == frames[0, 7, 5]
    assert crop_region(frames, (-5, -5, 100, 100)).shape == (2, 10, 12)
    with pytest.raises(ValueError):
        crop_region(frames, (8, 3, 2, 7))


def test_resize_pads_to_square_and_antialiases():
    frames = np.full((3, 40, 80), 200, dtype=np.uint8)
    out = resize_frames(frames, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    # 80 wide -> 32: the 40 rows become 16 rows centred, black above and below
    assert out[0, :7].max() == 0 and out[0, -7:].max() == 0 and out[0, 16, 16] == 200
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)[None]
    small = resize_frames(checker, 16)
    assert np.abs(small[0, 2:-2, 2:-2].astype(int) - 127).max() < 20  # averaged, not aliased


def test_sample_frames_interpolates():
    frames = (np.arange(5, dtype=np.uint8) * 10)[:, None, None] * np.ones((1, 2, 2), dtype=np.uint8)
    out = sample_frames(frames, 10.0, np.array([0.0, 0.05, 0.12, 0.4]))
    assert out[:, 0, 0].tolist() == [0, 5, 12, 40]
    assert sample_frames(frames, 10.0, np.array([0.45]))[0, 0, 0] == 40  # within one frame: hold
    with pytest.raises(ValueError):
        sample_frames(frames, 10.0, np.array([0.7]))
    with pytest.raises(ValueError):
        sample_frames(frames, 10.0, np.array([-0.2]))


def test_estimate_region_and_mask_ignore_static_text():
    rng = np.random.default_rng(0)
    frames = np.zeros((6, 50, 60), dtype=np.uint8)
    frames[:, 15:45, 10:50] = rng.integers(20, 255, size=(6, 30, 40))  # moving content
    frames[:, 2:8, 5:40] = 220  # static burned-in text
    assert estimate_region(frames) == (10, 15, 49, 44)
    masked = mask_outside_sector(frames)
    assert masked[:, 2:8].max() == 0
    np.testing.assert_array_equal(masked[:, 16:44, 11:49], frames[:, 16:44, 11:49])
