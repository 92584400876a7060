import pytest
import torch

from echopulse.config import ECGEncoderConfig
from echopulse.models.ecg_encoder import ECGEncoder


def test_ecg_encoder_emits_per_patch_tokens():
    cfg = ECGEncoderConfig()
    encoder = ECGEncoder(cfg)
    tokens = encoder(torch.randn(2, 12, cfg.samples))
    assert tokens.shape == (2, 12 * cfg.samples // cfg.patch, cfg.dim)
    assert encoder.num_tokens == tokens.shape[1]


def test_ecg_encoder_tokens_depend_on_lead_and_time():
    torch.manual_seed(0)
    cfg = ECGEncoderConfig()
    encoder = ECGEncoder(cfg).eval()
    ecg = torch.randn(1, 12, cfg.samples)
    ecg_later = ecg.clone()
    ecg_later[:, 3, -cfg.patch:] += 1.0  # change only the last patch of one lead
    a, b = encoder(ecg), encoder(ecg_later)
    assert not torch.allclose(a, b)
    # identical inputs on all leads still give lead-specific tokens (lead embedding)
    same = encoder(torch.ones(1, 12, cfg.samples))
    assert not torch.allclose(same[0, 0], same[0, cfg.samples // cfg.patch])


def test_ecg_encoder_wrong_length_names_both():
    encoder = ECGEncoder(ECGEncoderConfig())
    with pytest.raises(ValueError, match="300") as info:
        encoder(torch.randn(2, 12, 250))
    assert "250" in str(info.value)
    with pytest.raises(ValueError, match="12"):
        encoder(torch.randn(2, 8, 300))


def test_ecg_encoder_rejects_patch_not_dividing_samples():
    with pytest.raises(ValueError, match="divisible"):
        ECGEncoder(ECGEncoderConfig(samples=310, patch=75))
