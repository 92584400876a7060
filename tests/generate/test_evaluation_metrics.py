"""The evaluation core's metrics on cases with known answers (no model, no Ray; fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from echopulse import ef_regression, fidelity, frechet, metrics
from echopulse.evaluate import partners, summarize
from echopulse.memorization import memorization_check


def _clips(seed: int, n=3, t=4, h=32, w=40, noise=20.0):
    rng = np.random.default_rng(seed)
    a = (rng.random((n, t, h, w)) * 255).astype(np.uint8)
    b = np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("seed", range(3))
def test_batched_metrics_agree_with_the_numpy_reference(seed):
    a, b = _clips(seed, noise=5.0 + 15 * seed)
    got = fidelity.pair_metrics(torch.as_tensor(a), torch.as_tensor(b))
    for i in range(len(a)):
        assert got["ssim"][i] == pytest.approx(metrics.ssim(a[i], b[i]), abs=1e-6)
        assert got["psnr"][i] == pytest.approx(metrics.psnr(a[i], b[i]), abs=1e-6)
        assert got["mse"][i] == pytest.approx(metrics.mse(a[i], b[i]), rel=1e-9)
        assert got["mae"][i] == pytest.approx(metrics.mae(a[i], b[i]), rel=1e-9)
    # float32 (the precision used on an accelerator) stays within a small tolerance of the reference
    s32 = fidelity.ssim_map(torch.as_tensor(a[0]).float() / 255, torch.as_tensor(b[0]).float() / 255)
    assert s32.mean().item() == pytest.approx(metrics.ssim(a[0], b[0]), abs=1e-4)


def test_in_sector_metrics_ignore_changes_outside_the_mask():
    a, _ = _clips(1)
    mask = np.zeros(a.shape[-2:], bool)
    mask[8:26, 10:30] = True
    outside = a.copy()
    outside[:, :, ~mask] = 255 - outside[:, :, ~mask]  # only the background changes
    got = fidelity.pair_metrics(a, outside, mask)
    assert np.all(got["sector_psnr"] == math.inf) and np.all(got["sector_mse"] == 0)
    assert np.allclose(got["sector_ssim"], 1.0)
    assert np.all(np.isfinite(got["psnr"])) and np.all(got["ssim"] < 0.99)  # full frame sees it
    inside = a.copy()
    inside[:, :, mask] = 255 - inside[:, :, mask]
    assert np.all(fidelity.pair_metrics(a, inside, mask)["sector_psnr"] < 10)
    assert np.all(np.isnan(fidelity.pair_metrics(a, a, np.zeros_like(mask))["sector_mse"]))  # empty: dropped


def test_sector_mask_is_the_clips_own_nonzero_region_with_cavities_inside():
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 < 15**2
    frames = np.where(disc, 120, 0).astype(np.uint8)[None].repeat(3, axis=0)
    frames[:, 16:24, 16:24] = 0  # a blood pool black in every frame
    assert np.array_equal(fidelity.sector_mask(frames), disc)


def test_frechet_distance_closed_form_and_identity():
    mu_a, mu_b = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    s_a, s_b = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # commuting covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2 = 13 + 4 + 1
    assert frechet.frechet_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(18.0, abs=1e-9)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4))
    s_a, s_b = m @ m.T + np.eye(4), np.diag([1.0, 2.0, 3.0, 4.0])
    w, v = np.linalg.eigh(s_a)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ s_b @ root_a)).sum()  # Tr (S_a^1/2 S_b S_a^1/2)^1/2
    direct = 4.0 + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert frechet.frechet_from_stats(np.zeros(4), s_a, np.full(4, 1.0), s_b) == pytest.approx(direct, rel=1e-9)
    # samples of shifted Gaussians: the distance of their population statistics
    x, y = rng.normal(0, 1, (20000, 3)), rng.normal(0.5, 2, (20000, 3))
    got = frechet.frechet_from_stats(*frechet.gaussian_stats(x), *frechet.gaussian_stats(y))
    assert got == pytest.approx(3 * 0.25 + 3 * 1.0, rel=0.05)
    assert frechet.frechet_from_stats(*frechet.gaussian_stats(x), *frechet.gaussian_stats(x)) == pytest.approx(0, abs=1e-9)


class ProbeI3D(torch.nn.Module):
    """The I3D call signature; the features report what it was given."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        n = x.shape[0]
        f = x.float()
        info = torch.tensor([float(x.dim()), float(x.shape[1]), float(x.shape[2]),
                             float(x.dtype == torch.uint8), float(rescale), float(resize),
                             float(return_features)])
        return torch.cat([info.expand(n, -1), f.amax(dim=(1, 2, 3, 4))[:, None],
                          (f[:, 0] - f[:, 2]).abs().amax(dim=(1, 2, 3))[:, None]], dim=1)


class ProbeInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        n = x.shape[0]
        info = torch.tensor([float(x.dim()), float(x.shape[1]), float(x.dtype == torch.uint8),
                             float(return_features)])
        return torch.cat([info.expand(n, -1), x.float().amax(dim=(1, 2, 3))[:, None]], dim=1)


def test_fvd_preprocessing_follows_stylegan_v(tmp_path):
    torch.jit.script(ProbeI3D()).save(str(tmp_path / "i3d.pt"))
    net = frechet.load_torchscript(str(tmp_path / "i3d.pt"), "I3D")
    videos = np.zeros((3, 20, 24, 24), np.uint8)
    videos[:, :, 4, 4] = 255
    f = frechet.i3d_features(net, videos)
    # (N, 3, 16, H, W) uint8 in [0, 255]; rescale, resize and the pre-softmax features asked for
    assert np.allclose(f[:, :7], [5, 3, 16, 1, 1, 1, 1]) and np.allclose(f[:, 7], 255) and np.allclose(f[:, 8], 0)
    with pytest.raises(ValueError, match="16 consecutive frames"):
        frechet.i3d_features(net, videos[:, :10])
    torch.jit.script(ProbeInception()).save(str(tmp_path / "inception.pt"))
    inc = frechet.load_torchscript(str(tmp_path / "inception.pt"), "Inception")
    g = frechet.inception_features(inc, videos.reshape(-1, 24, 24))
    assert g.shape[0] == 60 and np.allclose(g[:, :4], [4, 3, 1, 1]) and np.allclose(g[:, 4], 255)


class Moments(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        f = x.float().flatten(1) / 255.0
        return torch.stack([f.mean(1), f.std(1), f[:, ::7].mean(1)], dim=1)


def test_fvd_identical_sets_zero_and_paper_protocol_divides_by_11():
    net = torch.jit.script(Moments())
    rng = np.random.default_rng(3)
    real = (rng.random((12, 16, 16, 16)) * 255).astype(np.uint8)
    same = frechet.stylegan_v_fvd(net, real, real.copy())
    assert same["value"] == pytest.approx(0.0, abs=1e-9) and same["real_clips"] == 12
    assert same["protocol"] == "stylegan-v fvd2048_16f"
    darker = (real // 2).astype(np.uint8)
    assert frechet.stylegan_v_fvd(net, real, darker)["value"] > 0.01
    a, b = real[0], darker[0]
    fa, fb = frechet.inception_features(net, a), frechet.inception_features(net, b)
    direct = frechet.frechet_from_stats(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    paper = frechet.paper_fid(net, [(a, b)])
    assert paper["value"] == pytest.approx(direct / 11) and paper["protocol"].startswith("echopulse-paper")


def test_ef_agreement_known_answers():
    truth = np.array([35.0, 50.0, 60.0, 70.0])
    constant = ef_regression.agreement(np.full(4, 55.0), truth)
    assert constant["r2"] <= 0
    perfect = ef_regression.agreement(truth, truth)
    assert perfect == {"r2": 1.0, "mae": 0.0, "rmse": 0.0, "clips": 4}
    off = ef_regression.agreement(truth + 3.0, truth)
    assert off["mae"] == pytest.approx(3.0) and off["rmse"] == pytest.approx(3.0)
    samples = np.stack([truth + 10, truth - 1, truth + 5, truth], axis=1)  # the 4th is not among the first 3
    assert np.allclose(ef_regression.best_of(samples, truth), truth - 1)
    net = torch.jit.script(Constant())
    pred = ef_regression.predict_ef(net, np.zeros((4, 5, 16, 16), np.uint8))
    assert np.allclose(pred, 55.0) and ef_regression.agreement(pred, truth)["r2"] <= 0


class Constant(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), 55.0)


def test_memorization_flags_copies_of_training_clips():
    rng = np.random.default_rng(0)
    train = rng.random((10, 50))
    heldout = rng.random((4, 50))
    generated = np.concatenate([train[3:4] + 0.001, rng.random((3, 50))])
    out = memorization_check(generated, heldout, train, ["g0", "g1", "g2", "g3"],
                             [f"t{i}" for i in range(10)], "pixel")
    assert out["share_closer_than_heldout"] == pytest.approx(0.25)
    assert out["flagged"] == [{"generated": "g0", "nearest_train": "t3", "distance": pytest.approx(0.001, rel=1e-4)}]


def test_partners_are_other_studies_and_summaries_count_dropped():
    p = partners(["s1", "s1", "s2", "s3"])
    assert all(np.asarray(["s1", "s1", "s2", "s3"])[p] != np.asarray(["s1", "s1", "s2", "s3"]))
    assert list(partners(["s", "s", "s"])) == [1, 2, 0]
    table = summarize({"x": np.array([1.0, np.nan, 3.0, 5.0])}, ["A4C", "A4C", "A2C", "A2C"])
    assert table["all"]["x"] == {"mean": 3.0, "used": 3, "dropped": 1}
    assert table["A4C"]["x"] == {"mean": 1.0, "used": 1, "dropped": 1}
    assert table["A2C"]["x"]["mean"] == 4.0


def test_tokenizer_validation_ssim_is_the_batched_core_and_matches_the_reference():
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.training.steps import tokenizer_val_step
    from jobs.recipes import tiny

    torch.manual_seed(0)
    model = VideoTokenizer(tiny().tokenizer)
    frames = torch.as_tensor((np.random.default_rng(0).random((2, 5, 32, 32)) * 255).astype(np.uint8))
    out, recon = tokenizer_val_step(model, {"frames": frames})
    reference = np.mean([metrics.ssim(f.numpy() / 255.0, r.numpy()) for f, r in zip(frames, recon)])
    assert out["ssim"] == pytest.approx(reference, abs=1e-5)


def test_feature_distances_by_protocol_per_view():
    from echopulse.evaluate import EvalOptions, _feature_distances

    net = torch.jit.script(Moments())
    rng = np.random.default_rng(5)
    real = (rng.random((6, 16, 16, 16)) * 255).astype(np.uint8)
    fake = np.stack([real, real // 2], axis=1)  # (6, 2 samples, T, H, W)
    views = ["A4C"] * 4 + ["A2C"] * 2
    peers = _feature_distances(EvalOptions(min_fvd_clips=4), real, fake, views, net, net, None)
    assert peers["fvd"]["protocol"] == "stylegan-v fvd2048_16f" and peers["fvd"]["generated_clips"] == 12
    assert peers["fvd"]["per_view"]["A4C"]["real_clips"] == 4
    assert peers["fvd"]["per_view"]["A2C"]["status"] == "not computed"  # 2 clips < --min-fvd-clips 4
    paper = _feature_distances(EvalOptions(protocol="echopulse-paper"), real, fake, views, net, None, None)
    assert paper["fid"]["pairs"] == 12 and paper["fvd"]["protocol"].startswith("echopulse-paper")
    assert paper["fvd"]["per_view"]["A2C"]["pairs"] == 4
