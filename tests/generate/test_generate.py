"""Generation from Python and from the CLI: formats, duration and rate, chaining, first frames,
the ECG panel, every ECG format, and bad input (one line, exit 2, no file left behind)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from echopulse.cli import EXIT_BAD_INPUT, EXIT_OK, main
from echopulse.config import ClipConfig
from echopulse.errors import EchoPulseError
from echopulse.generate import longest_video_s, plan_windows, prime_frames

from .test_video_out import gif_frames_and_fps, mp4_frames_and_fps


@pytest.fixture(scope="module")
def ecg_file(corpus):
    return str(corpus / "ecg" / "study_0000.hea")


def test_api_returns_uint8_video_deterministic_per_seed(model, ecg_file):
    video = model.generate(ecg_file, seed=3)
    assert video.dtype == np.uint8 and video.shape == (model.clip.frames, model.size, model.size)
    assert np.array_equal(video, model.generate(ecg_file, seed=3))
    assert not np.array_equal(video, model.generate(ecg_file, seed=4))


@pytest.mark.parametrize("ecg_samples", [299, 300, 749, 750, 1500])
def test_longest_video_is_the_last_one_the_ecg_can_condition(ecg_samples):
    clip = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)
    seconds = longest_video_s(clip, ecg_samples)
    if ecg_samples < clip.ecg_samples:
        assert seconds == 0.0
        return
    frames = int(round(seconds * clip.fps))
    assert frames >= clip.frames
    plan_windows(frames, clip, ecg_samples)  # fits
    with pytest.raises(EchoPulseError, match="needs"):
        plan_windows(frames + 1, clip, ecg_samples)  # one frame more does not


def test_plan_windows_covers_the_video_with_token_aligned_priming():
    clip = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)
    windows = plan_windows(15, clip, ecg_samples=1000, temporal_patch=2, prime_token_frames=1)
    assert windows[0].start == 0 and windows[0].overlap == 0
    assert windows[-1].start + clip.frames >= 15
    for before, after in zip(windows, windows[1:]):
        assert after.overlap == before.start + clip.frames - after.start >= 1
        assert after.ecg_start == round(after.start / clip.fps * 250)
        assert after.ecg_start + clip.ecg_samples <= 1000
    # a short ECG moves the last window earlier: a longer overlap, primed with whole token frames
    tight = plan_windows(14, clip, ecg_samples=750, temporal_patch=2)
    assert tight[-1].start + clip.frames >= 14 and tight[-1].ecg_start + 300 <= 750
    assert prime_frames(4) == (3, 2) and prime_frames(1) == (1, 1)
    with pytest.raises(EchoPulseError, match="needs"):
        plan_windows(30, clip, ecg_samples=750)


def test_longer_video_chains_windows_at_the_requested_rate(model, ecg_file):
    video = model.generate(ecg_file, seconds=3.0, seed=0)
    assert video.shape == (15, model.size, model.size)  # 3 s at the model's 5 fps: 4 windows
    fast = model.generate(ecg_file, seconds=2.0, fps=12.0, seed=0)
    assert fast.shape == (24, model.size, model.size)


def test_first_frame_primes_the_video(model, ecg_file, corpus, tmp_path):
    from echopulse.generate import load_first_frame

    dicom = corpus / "echo" / "study_0001.dcm"
    frame = load_first_frame(str(dicom), model.size)
    assert frame.shape == (model.size, model.size) and frame.dtype == np.uint8
    video = model.generate(ecg_file, first_frame=str(dicom), seed=0)
    assert np.array_equal(video[0], frame)
    png = tmp_path / "first.png"
    Image.fromarray(frame).save(png)
    assert np.array_equal(model.generate(ecg_file, first_frame=str(png), seed=0), video)


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ".dcm"])
def test_cli_writes_each_format_with_requested_count_and_rate(tiny_checkpoint, ecg_file, tmp_path,
                                                              suffix, capsys):
    out = tmp_path / f"echo{suffix}"
    code = main(["generate", "--checkpoint", str(tiny_checkpoint), "--ecg", ecg_file, "--out", str(out),
                 "--seconds", "2", "--fps", "10", "--panel", "--guidance", "0", "--steps", "2"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    if suffix == ".gif":
        count, rates = gif_frames_and_fps(out)
        assert count == 20 and rates == pytest.approx([10.0] * 20)
        with Image.open(out) as image:
            assert image.size == (256, 256 + 85)  # upscaled 8x, ECG panel beneath
    elif suffix == ".mp4":
        frames, rate = mp4_frames_and_fps(out)
        assert frames.shape[0] == 20 and rate == pytest.approx(10.0)
    else:
        ds = pydicom.dcmread(out)
        assert int(ds.NumberOfFrames) == 20 and 1000.0 / float(ds.FrameTime) == pytest.approx(10.0)
        assert ds.pixel_array.shape == (20, 32 + 32, 32)  # native size, panel beneath


def test_panel_cursor_moves_with_time(model, ecg_file):
    from echopulse.generate import load_ecg_file
    from echopulse.panel import add_ecg_panel, panel_lead

    prepared = load_ecg_file(ecg_file)
    trace, lead = panel_lead(prepared.ecg, prepared.lead_mask)
    assert lead == "II"
    frames = np.zeros((10, 64, 96), dtype=np.uint8)
    out = add_ecg_panel(frames, trace, fps=5.0, label=lead)
    assert out.shape == (10, 64 + 32, 96)
    panel = out[:, 64:].astype(int)
    cursor_x = [int(np.argmax((p == 255).sum(axis=0))) for p in panel]
    assert cursor_x == sorted(cursor_x) and cursor_x[0] < 3 and cursor_x[-1] > 80
    assert (panel[0] > 200).sum() > 96  # the trace is drawn


def test_no_patient_data_from_any_input_in_the_dicom(tiny_checkpoint, ecg_file, corpus, tmp_path):
    source = pydicom.dcmread(corpus / "echo" / "study_0000.dcm")
    out = tmp_path / "echo.dcm"
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--ecg", ecg_file, "--out", str(out),
                 "--first-frame", str(corpus / "echo" / "study_0000.dcm")]) == EXIT_OK
    ds = pydicom.dcmread(out)
    text = repr(ds)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(source[keyword].value)
        assert value and value not in text, keyword
    assert str(ds.PatientName) == "" and "DERIVED" in ds.ImageType


def test_apple_health_csv_ecg(model, tmp_path):
    from echopulse.synth.ecg_sim import simulate_ecg

    ecg = simulate_ecg(30.0, 64, fs=512, seed=5)
    lines = ["Name,Alex Phantom", 'Date of Birth,"Jan 1, 1970"', "Recorded Date,2024-03-05 09:15:30 +0100",
             "Classification,Sinus Rhythm", "Symptoms,", "Software Version,2", 'Device,"Watch6,2"',
             "Sample Rate,512 hertz", "Lead,Lead I", "Unit,µV", "", "", ""]
    lines += [f"{v:.3f}" for v in ecg.signal[0] * 1000.0]
    path = tmp_path / "ecg_2024-03-05.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    video = model.generate(str(path), seconds=2.0, seed=0)
    assert video.shape == (10, model.size, model.size)


def _flat_wfdb(tmp_path):
    import wfdb

    from echopulse.config import ECG_LEADS

    wfdb.wrsamp("flat", fs=250, units=["mV"] * 12, sig_name=list(ECG_LEADS),
                p_signal=np.zeros((1500, 12)), fmt=["16"] * 12, adc_gain=[200.0] * 12,
                baseline=[0] * 12, write_dir=str(tmp_path))
    return str(tmp_path / "flat.hea")


@pytest.mark.parametrize("case", ["unreadable", "flat", "missing", "too_short", "extension",
                                  "frame_size", "bad_frame_file"])
def test_bad_input_is_one_line_exit_2_and_no_output(tiny_checkpoint, ecg_file, tmp_path, capsys, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out = out_dir / "echo.mp4"
    argv = ["generate", "--checkpoint", str(tiny_checkpoint), "--ecg", ecg_file, "--out", str(out)]
    if case == "unreadable":
        bad = inputs / "bad.hea"
        bad.write_text("this is not a WFDB header\n")
        argv[4], needle = str(bad), str(bad)
    elif case == "flat":
        argv[4], needle = _flat_wfdb(inputs), "flat"
    elif case == "missing":
        argv[4], needle = str(inputs / "none.hea"), "none.hea"
    elif case == "too_short":
        argv += ["--seconds", "10"]
        needle = "shorter than the requested 10.00 s"
    elif case == "extension":
        argv[6] = str(out_dir / "echo.avi")
        needle = ".avi"
    elif case == "frame_size":
        png = inputs / "big.png"
        Image.fromarray(np.zeros((48, 40), dtype=np.uint8)).save(png)
        argv += ["--first-frame", str(png)]
        needle = "40x48"
    else:
        junk = inputs / "frame.png"
        junk.write_bytes(b"not an image")
        argv += ["--first-frame", str(junk)]
        needle = "frame.png"
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("patch, prime_k", [(2, 2), (1, 3)])
def test_chained_windows_start_from_the_models_own_tokens(patch, prime_k):
    """A window is primed with its first frame (encoded alone) plus the previous window's own
    generated token frames that cover the same frames -- not pixels re-encoded -- with pairs of
    frames per token frame (patch 2) or one (patch 1, the demo recipes')."""
    import torch

    from echopulse.config import SamplingConfig

    calls = []
    model, cfg = _recording_model(11, 600, SamplingConfig(steps=2, guidance=0.0, window_candidates=1),
                                  lambda ecg, kwargs, out: calls.append((kwargs.get("prime_tokens"), out)),
                                  temporal_patch=patch)
    clip = model.clip
    ecg = np.random.default_rng(0).standard_normal((12, 250 * 10)).astype(np.float32)
    model.generate(ecg, seconds=7.0)
    frames_needed = model._frame_plan(7.0, None, ecg.shape[1])[0]
    windows = plan_windows(frames_needed, clip, ecg.shape[1], patch, cfg.chain_prime_token_frames)
    assert len(calls) == len(windows) >= 3
    checked = 0
    for (prime, _), (_, previous), (w, w_prev) in zip(calls[1:], calls[:-1], zip(windows[1:], windows[:-1])):
        hop = w.start - w_prev.start
        assert prime.shape[1] == cfg.chain_prime_token_frames == prime_k
        assert w.overlap == 1 + patch * (prime_k - 1) or w is windows[-1]
        if hop % patch == 0:
            j0 = hop // patch
            assert torch.equal(prime[:, 1:], previous[:, j0 + 1:j0 + prime_k])
            checked += 1
    assert checked >= 2


def test_long_video_keeps_the_first_windows_black_background(model, ecg_file, monkeypatch):
    """Pixels black throughout the first window stay at its level in every later window, even where
    a later window's decoder draws them grey. The decoder is wrapped so the first window has a black
    corner and later windows a bright one (a 40-step tiny model draws no pure black of its own)."""
    plain = model.tokenizer.decode_from_indices
    calls = []

    def decode(tokens):
        frames = plain(tokens).clone()
        frames[..., :8, :8] = 0.0 if not calls else 0.6
        calls.append(1)
        return frames

    monkeypatch.setattr(model.tokenizer, "decode_from_indices", decode)
    video = model.generate(ecg_file, seconds=3.0, seed=1)  # 4 windows
    first = video[: model.clip.frames]
    black = first.max(axis=0) <= 4
    assert black[:8, :8].all() and len(calls) >= 4
    anchor = np.round(first.mean(axis=0)[black])
    assert (video[model.clip.frames:, black] == anchor).all()
    calls.clear()
    drawn = model.generate(ecg_file, seconds=3.0, seed=1, anchor_background=False)  # what it would be
    assert (drawn[model.clip.frames:, :8, :8] > 100).all()


def test_shifted_negative_guides_each_window_against_its_ecg_half_a_beat_later():
    from echopulse.config import ECG_LEADS, SamplingConfig
    from echopulse.synth.ecg_sim import simulate_ecg
    from echopulse.transforms.ecg import prepare_ecg, shifted_ecg

    seen = []
    model, _ = _recording_model(5, 300, SamplingConfig(steps=2, guidance=2.0, negative="shifted", window_candidates=1),
                                lambda ecg, kwargs, out: seen.append((ecg, kwargs.get("negative_ecg"))))
    prepared = prepare_ecg(simulate_ecg(8.0, 75, fs=500, seed=3).signal, 500, list(ECG_LEADS))
    shifted = shifted_ecg(prepared.ecg)
    model.generate(prepared, seconds=3.0)
    assert len(seen) >= 3
    for ecg, negative in seen:
        start = next(s for s in range(prepared.ecg.shape[1] - 299)
                     if np.allclose(prepared.ecg[:, s:s + 300], ecg[0].numpy()))
        assert np.allclose(negative[0].numpy(), shifted[:, start:start + 300])
    seen.clear()
    model.generate(prepared, seconds=3.0, guidance=0.0)  # no guidance: nothing to push away from
    assert all(negative is None for _, negative in seen)
    with pytest.raises(ValueError, match="negative"):
        SamplingConfig(negative="reversed")


def test_a_chained_window_is_redrawn_until_it_keeps_the_first_windows_look():
    from echopulse.generate import _closest_to_anchor

    yy, xx = np.mgrid[:32, :32]
    anchor = np.where((yy - 16) ** 2 + (xx - 12) ** 2 < 60, 200.0, 20.0)  # a bright chamber on the left
    moved = np.where((yy - 16) ** 2 + (xx - 22) ** 2 < 60, 200.0, 20.0)  # ... drifted to the right
    looks = [moved, moved, anchor, anchor]
    drawn = []

    def draw(attempt):
        drawn.append(attempt)
        frames = np.repeat(looks[attempt][None], 5, axis=0)
        frames[attempt % 5] += 10  # the frames within a window differ; their mean is the look
        return f"tokens{attempt}", np.clip(frames, 0, 255).astype(np.uint8)

    tokens, frames = _closest_to_anchor(draw, anchor, candidates=4, accept=0.85)
    assert tokens == "tokens2" and drawn == [0, 1, 2]  # the first draw that keeps the look, then stop
    drawn.clear()
    tokens, _ = _closest_to_anchor(draw, anchor, candidates=2, accept=0.85)
    assert drawn == [0, 1] and tokens in ("tokens0", "tokens1")  # none keeps it: the closest of those drawn
    drawn.clear()
    assert _closest_to_anchor(draw, anchor, candidates=1, accept=0.85)[0] == "tokens0" and drawn == [0]


def _recording_model(frames: int, ecg_samples: int, sampling, record, temporal_patch: int = 2):
    """An untrained 32 px EchoGenerator whose generator passes each call's (ecg, kwargs, out) to
    ``record``; returns (model, generator config)."""
    import torch

    from echopulse.config import ECGEncoderConfig, GeneratorConfig, TokenizerConfig
    from echopulse.generate import EchoGenerator
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer

    torch.manual_seed(0)
    clip = ClipConfig(frames=frames, size=32, fps=5.0, ecg_samples=ecg_samples)
    tok_cfg = TokenizerConfig(frames=frames, image_size=32, dim=32, spatial_depth=1, temporal_depth=1,
                              heads=2, temporal_patch=temporal_patch)
    tokenizer = VideoTokenizer(tok_cfg).eval()
    cfg = GeneratorConfig(token_grid=tok_cfg.token_grid, dim=32, depth=1, heads=2, fps=5.0,
                          temporal_patch=temporal_patch,
                          ecg=ECGEncoderConfig(samples=ecg_samples, dim=32, depth=1, heads=2))
    generator = MaskGIT(cfg).eval()
    plain = generator.generate

    def recorded(ecg, **kwargs):
        out = plain(ecg, **kwargs)
        record(ecg, kwargs, out)
        return out

    generator.generate = recorded
    return EchoGenerator(generator, tokenizer, clip, sampling, {}, None), cfg
