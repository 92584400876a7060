"""The ECG drawn on screen: phantom strips in both display modes, and every way a strip can be bad."""

import numpy as np
import pytest

from echopulse.io.screen_ecg import NoTraceError, ScreenECGError, read_screen_ecg
from echopulse.synth.ecg_sim import simulate_ecg
from echopulse.synth.screen_trace import PHILIPS_YELLOW, TraceStyle, draw_screen_trace
from echopulse.transforms.ecg import prepare_ecg

FPS = 30.0
ROWS, COLS = 40, 160
REGION = (0, 0, COLS - 1, ROWS - 1)  # the imaging box: the strip is drawn below it


def _screen(mode="sweep", hr=75.0, seconds=3.0, seed=0, signal=None, **style):
    ecg = simulate_ecg(seconds, hr, seed=seed)
    frames = np.full((int(seconds * FPS), ROWS, COLS), 70, np.uint8)  # a grey image above the strip
    return draw_screen_trace(frames, FPS, ecg, seed=seed + 100, style=TraceStyle(mode=mode, **style),
                             signal=signal)


def _read(screen, region=REGION):
    return read_screen_ecg(screen.frames, "RGB", region, FPS, shown="echo/x.dcm")


def _peak_errors_ms(screen, signal, meta):
    """Distance of every drawn R-peak (50 ms or more inside the recovered span) to the nearest
    detected one."""
    prepared = prepare_ecg(signal, meta["fs"], meta["leads"])
    found = prepared.r_peaks / meta["fs"] - meta["offset_s"]
    start, end = -meta["offset_s"], -meta["offset_s"] + signal.shape[1] / meta["fs"]
    truth = screen.r_peaks_s[(screen.r_peaks_s > start + 0.05) & (screen.r_peaks_s < end - 0.05)]
    assert truth.size >= 3
    return np.array([np.min(np.abs(found - t)) for t in truth]) * 1000, truth


@pytest.mark.parametrize("mode", ["sweep", "scroll"])
@pytest.mark.parametrize("hr", [55.0, 140.0])
def test_r_peaks_recovered_within_25_ms_in_both_modes(mode, hr):
    screen = _screen(mode, hr, seed=int(hr))
    signal, meta = _read(screen)
    assert meta["source"] == "screen" and meta["mode"] == mode and meta["leads"] == ["II"]
    assert meta["fs"] == 250.0 and signal.shape[0] == 1
    errors, truth = _peak_errors_ms(screen, signal, meta)
    assert errors.max() < 25, (errors, truth)
    # the trace already on screen at frame 0 is history: beats before the cine are recovered too
    assert (truth < 0).any() and meta["offset_s"] == pytest.approx(1.6, abs=0.1)


def test_time_scale_comes_from_the_motion_between_frames():
    for sweep_s in (1.2, 2.0):
        signal, meta = _read(_screen(sweep_s=sweep_s, seconds=3.0))
        assert meta["px_per_s"] == pytest.approx(COLS / sweep_s, rel=0.01)


def test_any_hue_and_white_on_a_coloured_strip():
    for style in ({"color": PHILIPS_YELLOW}, {"color": (60, 120, 255)},
                  {"color": (255, 255, 255), "background": (20, 40, 140), "label": ""}):
        screen = _screen(**style)
        errors, _ = _peak_errors_ms(screen, *_read(screen))
        assert errors.max() < 25, style


def test_strip_found_below_the_image_without_ultrasound_regions():
    screen = _screen()
    signal, meta = _read(screen, region=None)
    assert meta["strip"][1] >= ROWS - ROWS // 3  # in the bottom band, not the grey image
    errors, _ = _peak_errors_ms(screen, signal, meta)
    assert errors.max() < 25


def test_no_trace_is_no_ecg_not_a_made_up_one():
    screen = _screen()
    grey = screen.frames.copy()
    grey[:, ROWS:] = grey[:, ROWS:].max(axis=-1, keepdims=True)  # the same strip in grey
    with pytest.raises(NoTraceError, match="echo/x.dcm: no ECG trace found"):
        read_screen_ecg(grey, "RGB", REGION, FPS, shown="echo/x.dcm")
    with pytest.raises(NoTraceError, match="grey-scale"):
        read_screen_ecg(None, "MONOCHROME2", REGION, FPS, shown="echo/x.dcm")
    with pytest.raises(NoTraceError):  # no room for a strip outside the imaging box
        read_screen_ecg(screen.frames, "RGB", (0, 0, COLS - 1, screen.frames.shape[1] - 1), FPS)


def test_clipped_or_saturated_trace_is_refused():
    with pytest.raises(ScreenECGError, match="echo/x.dcm: .*clipped or saturated"):
        _read(_screen(px_per_mv=30.0))


def test_flat_trace_is_refused():
    t = np.arange(-2.2 * 500, 3.0 * 500) / 500
    with pytest.raises(ScreenECGError, match="echo/x.dcm: .*flat trace"):
        _read(_screen(signal=(t, np.zeros_like(t))))


def _overlay(a, b):
    """Strip ``b``'s coloured pixels drawn over strip ``a`` (two traces on one screen)."""
    out = a.frames.copy()
    coloured = b.frames.max(axis=-1) - b.frames.min(axis=-1) > 40
    out[coloured] = b.frames[coloured]
    return out


def test_ecg_and_respiration_traces_take_the_ecg():
    ecg = _screen(baseline=0.75)
    t = np.arange(-2.2 * 500, 3.0 * 500) / 500
    breathing = _screen(signal=(t, 0.8 * np.sin(2 * np.pi * 0.3 * t)), color=PHILIPS_YELLOW,
                        baseline=0.3, px_per_mv=8.0, label="")
    signal, meta = read_screen_ecg(_overlay(ecg, breathing), "RGB", REGION, FPS)
    errors, _ = _peak_errors_ms(ecg, signal, meta)
    assert errors.max() < 25


def test_two_ecg_like_traces_are_refused():
    a = _screen(baseline=0.75, px_per_mv=5.0)
    b = _screen(seed=9, baseline=0.35, px_per_mv=5.0, color=PHILIPS_YELLOW, label="")
    with pytest.raises(ScreenECGError, match="2 ECG-like traces"):
        read_screen_ecg(_overlay(a, b), "RGB", REGION, FPS)
    same = _screen(seed=9, baseline=0.35, px_per_mv=5.0, label="")  # the second in the same green
    with pytest.raises(ScreenECGError, match="two traces drawn in one colour"):
        read_screen_ecg(_overlay(a, same), "RGB", REGION, FPS)


def test_strip_wider_than_the_cine_is_refused():
    with pytest.raises(ScreenECGError, match="strip spans .* more than the cine"):
        _read(_screen(sweep_s=2.5, seconds=2.0))
