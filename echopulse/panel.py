"""The ECG panel: the conditioning ECG drawn under the video, with a cursor at each frame's time."""

from __future__ import annotations

import numpy as np

from echopulse.config import ECG_FS, ECG_LEADS

PANEL_LEAD = "II"  # the rhythm lead clinicians read first


def panel_lead(ecg: np.ndarray, lead_mask: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The trace to draw: lead II when it is real, else the first real lead.

    Args:
        ecg: (12, L) prepared ECG in ``ECG_LEADS`` order.
        lead_mask: bool (12,), True where the lead was recorded; ``None`` infers it (non-zero leads).
    """
    mask = np.asarray(lead_mask, dtype=bool) if lead_mask is not None else np.abs(ecg).max(axis=1) > 0
    index = ECG_LEADS.index(PANEL_LEAD)
    if not mask[index]:
        real = np.flatnonzero(mask)
        index = int(real[0]) if real.size else index
    return np.asarray(ecg[index], dtype=np.float64), ECG_LEADS[index]


def add_ecg_panel(frames: np.ndarray, trace: np.ndarray, fps: float, fs: float = ECG_FS,
                  label: str = PANEL_LEAD, height: int | None = None) -> np.ndarray:
    """Frames with the ECG drawn beneath them and a cursor moving with time.

    The panel's x axis spans the video's duration (``len(frames) / fps`` seconds from the ECG's
    first sample); the cursor of frame ``i`` is at ``i / fps`` seconds.

    Args:
        frames: uint8 (T, H, W) video, already at display size.
        trace: (L,) ECG samples at ``fs`` Hz; sample 0 is the time of frame 0.
        fps: frame rate of ``frames``.
        fs: ECG sample rate.
        label: lead name written in the panel's corner.
        height: panel height in pixels (default: a third of the width, at least 32).

    Returns:
        uint8 (T, H + height, W).
    """
    from PIL import Image, ImageDraw

    t, h, w = frames.shape
    height = height or max(32, w // 3)
    seconds = t / fps
    n = min(len(trace), int(round(seconds * fs)))
    seg = np.asarray(trace[:n], dtype=np.float64)
    lo, hi = np.percentile(seg, [0.5, 99.5]) if n else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    margin = 3
    xs = np.arange(n) / fs / seconds * (w - 1)
    ys = margin + (1 - (np.clip(seg, lo, hi) - lo) / span) * (height - 2 * margin - 1)

    base = Image.new("L", (w, height), 0)
    draw = ImageDraw.Draw(base)
    for sec in range(1, int(seconds) + 1):  # one faint tick per second
        x = sec / seconds * (w - 1)
        draw.line([(x, 0), (x, height - 1)], fill=50)
    if n > 1:
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=235, width=1)
    draw.text((2, 1), label, fill=160)
    panel = np.asarray(base)

    out = np.empty((t, h + height, w), dtype=np.uint8)
    out[:, :h] = frames
    for i in range(t):
        row = panel.copy()
        x = int(round(i / fps / seconds * (w - 1)))
        row[:, max(0, x - 1) : x + 1] = 255  # the cursor: 2 px, brighter than the trace
        out[i, h:] = row
    return out
