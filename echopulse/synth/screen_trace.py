"""The ECG strip a scanner draws below the image, added to a phantom study.

A GE or Philips display shows lead II as a coloured line in a dark strip under the sector, with
the lead's name at its left. In **sweep** mode a cursor moves left to right and erases a few columns
just ahead of itself; in **scroll** mode the trace moves left with the newest sample at the right
edge. At frame 0 the strip already shows the seconds before the cine (history), so the drawn ECG
starts before frame 0: the history comes from a second simulated record whose beats continue the
study's own rhythm (its last R-peak lands on the study's beat before 0).

Each column shows the min..max of the signal over the column's time span joined to its
neighbours, as scanners draw it, so a QRS narrower than a column still reaches its peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echopulse.config import ECG_LEADS
from echopulse.synth.ecg_sim import SimulatedECG, simulate_ecg

GE_GREEN = (40, 230, 60)
PHILIPS_YELLOW = (235, 215, 40)


@dataclass(frozen=True)
class TraceStyle:
    """How the strip looks.

    Attributes:
        mode: "sweep" or "scroll".
        color: RGB of the trace.
        background: RGB of the strip.
        strip_rows: height of the strip in pixels.
        sweep_s: seconds the strip's width spans.
        gap_px: columns erased ahead of the sweep cursor.
        px_per_mv: vertical gain.
        label: lead name written at the strip's left (grey text), "" for none.
        start_phase: where the sweep cursor is at frame 0, as a fraction of the width.
        baseline: height of the zero line, as a fraction of the strip from its top.
    """

    mode: str = "sweep"
    color: tuple[int, int, int] = GE_GREEN
    background: tuple[int, int, int] = (0, 0, 0)
    strip_rows: int = 28
    sweep_s: float = 1.6
    gap_px: int = 6
    px_per_mv: float = 8.0
    label: str = "II"
    start_phase: float = 0.3
    baseline: float = 0.6


@dataclass
class ScreenTrace:
    """A study's cine with the ECG strip drawn under it.

    Attributes:
        frames: uint8 (T, rows + strip_rows, cols, 3) RGB.
        r_peaks_s: every R-peak time drawn (history included, so some are negative), echo clock.
        strip: (x0, y0, x1, y1) inclusive box of the strip.
        style: how it was drawn.
    """

    frames: np.ndarray
    r_peaks_s: np.ndarray
    strip: tuple[int, int, int, int]
    style: TraceStyle


def lead_with_history(ecg: SimulatedECG, history_s: float, seed: int,
                      lead: str = "II") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One lead of the study's ECG preceded by ``history_s`` seconds of earlier rhythm.

    Returns:
        ``times`` (s, echo clock, starting at about ``-history_s``), ``values`` (mV) and the R-peak
        times (s) inside that span.
    """
    fs = ecg.fs
    rr = float(np.median(np.diff(ecg.beat_r_s)))
    earlier = simulate_ecg(history_s + 3 * rr, 60.0 / rr, fs=fs, seed=seed)
    # shift the earlier record so its last R-peak before the join sits on the study's beat before 0
    join_r = float(ecg.beat_r_s[0])
    last = earlier.r_peaks_s[earlier.r_peaks_s < earlier.duration_s - 1.3 * rr][-1]
    shift = join_r - float(last)
    n_hist = int(round(history_s * fs))
    t_hist = -np.arange(n_hist, 0, -1) / fs
    src = np.round((t_hist - shift) * fs).astype(int)
    if src.min() < 0 or src.max() >= earlier.signal.shape[1]:
        raise ValueError("history longer than the simulated earlier record")
    k = ECG_LEADS.index(lead)
    hist = earlier.signal[k, src]
    # match the levels at the join so no step is drawn
    hist = hist - hist[-1] + ecg.signal[k, 0]
    times = np.concatenate([t_hist, np.arange(ecg.signal.shape[1]) / fs])
    values = np.concatenate([hist, ecg.signal[k]])
    hist_r = earlier.r_peaks_s + shift
    peaks = np.concatenate([hist_r[(hist_r >= times[0]) & (hist_r < 0) & (hist_r <= join_r + 1e-9)],
                            ecg.beat_r_s[(ecg.beat_r_s >= 0) & (ecg.beat_r_s < times[-1])]])
    return times, values, np.unique(np.round(peaks, 6))


def _column_envelopes(times: np.ndarray, values: np.ndarray,
                      edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of the signal over each column's span [edges[i], edges[i+1]], joined to the
    neighbouring columns (the span's end samples are shared)."""
    idx = np.clip(np.searchsorted(times, edges), 0, len(times) - 1)
    lo_i, hi_i = idx[:-1], np.maximum(idx[1:], idx[:-1] + 1)
    out_min = np.empty(len(lo_i))
    out_max = np.empty(len(lo_i))
    for i, (a, b) in enumerate(zip(lo_i, hi_i)):
        seg = values[max(0, a - 1) : b + 1]
        out_min[i], out_max[i] = seg.min(), seg.max()
    return out_min, out_max


def draw_screen_trace(frames: np.ndarray, fps: float, ecg: SimulatedECG, seed: int,
                      style: TraceStyle = TraceStyle(),
                      signal: tuple[np.ndarray, np.ndarray] | None = None) -> ScreenTrace:
    """Draw the strip under a grey cine.

    Args:
        frames: uint8 (T, rows, cols) grey cine.
        fps: its frame rate.
        ecg: the study's ECG (sample 0 at frame 0).
        seed: seed of the earlier record drawn as history.
        style: the strip's look and display mode.
        signal: (times in s on the echo's clock, values in mV) to draw instead of the ECG's lead II
            (a respiration trace, a flat line); it must start ``style.sweep_s`` before frame 0.
    """
    if style.mode not in ("sweep", "scroll"):
        raise ValueError(f"mode must be 'sweep' or 'scroll', got {style.mode!r}")
    n, rows, cols = frames.shape
    px_per_s = cols / style.sweep_s
    times, values, peaks = lead_with_history(ecg, style.sweep_s + 0.5, seed)
    if signal is not None:
        times, values, peaks = np.asarray(signal[0]), np.asarray(signal[1]), np.zeros(0)
    # the tape: unwrapped column u spans positions [u, u + 1), position c0 + px_per_s * t
    c0 = style.start_phase * cols
    u_lo = int(np.floor(c0 + px_per_s * times[0])) + 1
    u_hi = int(np.floor(c0 + px_per_s * (n - 1) / fps))
    u = np.arange(u_lo, u_hi + 1)
    env_min, env_max = _column_envelopes(times, values, (np.append(u, u_hi + 1) - c0) / px_per_s)
    baseline = style.strip_rows * style.baseline
    y_top = np.clip(np.round(baseline - env_max * style.px_per_mv), 0, style.strip_rows - 1).astype(int)
    y_bot = np.clip(np.round(baseline - env_min * style.px_per_mv), 0, style.strip_rows - 1).astype(int)

    strip = np.empty((n, style.strip_rows, cols, 3), dtype=np.uint8)
    strip[:] = np.asarray(style.background, dtype=np.uint8)
    label = _label_mask(style.label, style.strip_rows, cols)
    strip[:, label] = 200
    rr = np.arange(style.strip_rows)[:, None]
    x = np.arange(cols)
    for k in range(n):
        cursor = int(np.floor(c0 + px_per_s * k / fps))
        if style.mode == "sweep":
            c = cursor % cols
            shown = np.where(x <= c, cursor - (c - x), cursor - (c - x) - cols)
            erased = (x > c) & (x <= c + style.gap_px) | (x + cols <= c + style.gap_px)
        else:
            shown = cursor - (cols - 1 - x)
            erased = np.zeros(cols, dtype=bool)
        valid = (shown >= u_lo) & ~erased
        j = np.where(valid, shown - u_lo, 0)
        on = (rr >= y_top[j][None, :]) & (rr <= y_bot[j][None, :]) & valid[None, :]
        strip[k][on] = style.color
    rgb = np.concatenate([np.repeat(frames[..., None], 3, axis=-1), strip], axis=1)
    return ScreenTrace(frames=rgb, r_peaks_s=peaks,
                       strip=(0, rows, cols - 1, rows + style.strip_rows - 1), style=style)


def _label_mask(text: str, rows: int, cols: int) -> np.ndarray:
    if not text:
        return np.zeros((rows, cols), dtype=bool)
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (cols, rows), 0)
    ImageDraw.Draw(img).text((2, 0), text, fill=255, font=ImageFont.load_default())
    return np.asarray(img) > 127
