"""The real-cine reconstruction check (echopulse.real_cine) on pydicom-data's SonoSite cine: the
ingest stage's clips, scores that separate a faithful reconstruction from a blank one, and a real
(untrained) tokenizer run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from echopulse.config import ClipConfig
from echopulse.fidelity import sector_mask
from echopulse.real_cine import real_cine_clips, real_cine_fidelity, reconstruction_scores, vendor_cine_path

CLIP = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)


@pytest.fixture(scope="module")
def real():
    if vendor_cine_path() is None:
        pytest.fail("pydicom-data is not installed (the test extra)")
    return real_cine_clips(CLIP)


def test_real_cine_is_cut_into_the_clips_ingest_makes(real):
    assert real.shape == (3, 5, 32, 32) and real.dtype == np.uint8
    for clip in real:
        mask = sector_mask(clip)
        assert 0.25 < mask.mean() < 0.8  # a fan, not the whole frame nor a speck
        # black beyond a pixel round the fan (text and markers masked away), a picture inside
        assert clip[:, ~ndimage.binary_dilation(mask)].max() == 0 and clip[:, mask].mean() > 8


def test_scores_tell_a_faithful_reconstruction_from_a_blank_one(real):
    same = reconstruction_scores(real, real)
    assert same["insector_psnr_db"] == np.inf and same["insector_ssim"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    near = np.clip(real + rng.normal(0, 3, real.shape), 0, 255).astype(np.uint8)
    close = reconstruction_scores(near, real)
    assert 30 < close["insector_psnr_db"] < 45 and close["insector_ssim"] > 0.6
    blank = reconstruction_scores(np.zeros_like(real), real)
    assert blank["insector_psnr_db"] < 20 and blank["insector_ssim"] < close["insector_ssim"] - 0.3
    # the black background flatters whole-frame PSNR; the in-sector figure does not count it
    assert blank["psnr_db"] > blank["insector_psnr_db"] + 2
    assert close["clips"] == blank["clips"] == 3


def test_an_untrained_tokenizer_scores_low_and_keeps_its_training_mode(real):
    from echopulse.models.tokenizer import VideoTokenizer
    from jobs.recipes import tiny

    recipe = tiny()
    assert recipe.clip.frames == CLIP.frames and recipe.clip.size == CLIP.size
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(recipe.tokenizer).train()
    got = real_cine_fidelity(tokenizer, recipe.clip, clips=real)
    assert tokenizer.training
    assert set(got) == {"psnr_db", "ssim", "insector_psnr_db", "insector_ssim", "clips"}
    assert np.isfinite(got["insector_psnr_db"]) and got["insector_psnr_db"] < 15  # about 7 dB: noise
