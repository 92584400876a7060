"""The ECG drawn on screen: find the strip and its trace in a colour cine, recover one lead.

Scanners (GE, Philips, Siemens, Canon) draw the ECG recorded with the cine as a coloured line in a
strip outside the imaging area; in archives such as MIMIC-IV-ECHO it is the only synchronized ECG.
The strip is looked for outside the Sequence of Ultrasound Regions' imaging box (below it first,
then above), or in the bottom third of the frame when the file has no regions. The trace is told
from the grey image by colour, any hue: the strip's pixels are grouped by hue, or, on a coloured
strip, the white pixels form their own group. A group counts as a trace when it covers most columns
with a thin run in each; when two groups do (an ECG and a respiration trace), the one with
QRS-like content is taken, and two ECG-like traces are refused rather than guessed between.

The signal recovery itself (sweep or scroll mode, the time scale from the motion between frames)
is in :mod:`echopulse.transforms.screen_trace`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from echopulse.transforms.screen_trace import (
    QRS_BAND_SHARE,
    TraceError,
    qrs_share,
    recover_trace,
    split_runs_share,
    to_uniform,
)

log = logging.getLogger(__name__)

SOURCE = "screen"
DEFAULT_LEAD = "II"
FS = 250.0  # the recovered trace is resampled to the project's ECG rate
MIN_STRIP_ROWS = 8
FRAME_STEP_S = 0.1  # the trace is read from frames this far apart (and the last one)
_GREY_CHROMA = 20.0  # chroma (YCbCr, 0-255 scale) below this is grey
_TRACE_CHROMA = 35.0  # a trace pixel on a grey strip has at least this chroma
_MIN_COVERAGE = 0.5  # a trace draws in at least this share of the strip's columns
_MAX_SAME_COLOUR_SPLIT = 0.3  # more columns than this with two separate runs: two traces, one colour
_YBR = ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")


class ScreenECGError(ValueError):
    """An on-screen trace that cannot give an ECG (clipped, flat, two traces...)."""


class NoTraceError(ScreenECGError):
    """No strip or no trace at all: the echo simply shows no ECG."""


def candidate_strips(shape: tuple[int, int], region: tuple[int, int, int, int] | None
                     ) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1, inclusive) where a strip may be, best first.

    Args:
        shape: (rows, cols) of a frame.
        region: the imaging box from the Sequence of Ultrasound Regions, or None.
    """
    rows, cols = shape
    if region is None:
        return [(0, rows - rows // 3, cols - 1, rows - 1)]
    x0, y0, x1, y1 = region
    out = []
    if rows - 1 - y1 >= MIN_STRIP_ROWS:
        out.append((0, y1 + 1, cols - 1, rows - 1))
    if y0 >= MIN_STRIP_ROWS:
        out.append((0, 0, cols - 1, y0 - 1))
    return out


def to_ycc(raw: np.ndarray, photometric: str) -> np.ndarray:
    """Colour pixels (..., 3) as float32 (Y, Cb - 128, Cr - 128) on a 0-255 scale.

    YBR data (as decoded without colour conversion) is used as it is; RGB gets ITU-R BT.601.
    """
    px = raw.astype(np.float32)
    if raw.dtype != np.uint8:
        px *= 255.0 / max(1.0, float(np.max(px)))
    if photometric in _YBR:
        return np.stack([px[..., 0], px[..., 1] - 128.0, px[..., 2] - 128.0], axis=-1)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, 0.564 * (b - y), 0.713 * (r - y)], axis=-1)


def colour_groups(strip: np.ndarray, photometric: str) -> list[tuple[str, np.ndarray]]:
    """Pixel groups of one colour each that could be a trace, as (name, bool (T, rows, cols)).

    Only pixels far from the strip's background colour are converted and looked at closely (a
    trace is a few percent of the strip).

    Args:
        strip: (T, rows, cols, 3) the strip's pixels as decoded.
        photometric: their PhotometricInterpretation (RGB or YBR_*).
    """
    cols = strip.shape[2]
    first = strip[0].reshape(-1, 3)
    bg_raw = np.median(first, axis=0)
    bg_y, bg_cb, bg_cr = to_ycc(bg_raw[None], photometric)[0]
    far = _far_from(strip, bg_raw, 40)
    where = np.nonzero(far)
    ycc = to_ycc(strip[where], photometric)  # (n, 3)
    y, cb, cr = ycc[:, 0], ycc[:, 1], ycc[:, 2]
    chroma = np.hypot(cb, cr)
    hue = np.degrees(np.arctan2(cr, cb)) % 360.0
    groups = []

    def group(keep: np.ndarray) -> np.ndarray:
        mask = np.zeros(strip.shape[:3], dtype=bool)
        mask[tuple(w[keep] for w in where)] = True
        return mask

    if np.hypot(bg_cb, bg_cr) >= _GREY_CHROMA:
        # a coloured strip: a white (or grey) trace on it
        groups.append(("white", group((chroma < _GREY_CHROMA) & (y > bg_y + 60))))
        bg_hue = float(np.degrees(np.arctan2(bg_cr, bg_cb)) % 360.0)
        coloured = (chroma > _TRACE_CHROMA) & (_hue_distance(hue, bg_hue) > 40)
    else:
        coloured = (chroma > _TRACE_CHROMA) & (y > 25)
    counts, edges = np.histogram(hue[coloured & (where[0] == 0)], bins=36, range=(0, 360))
    taken: list[float] = []
    for b in np.argsort(counts)[::-1]:
        if counts[b] < _MIN_COVERAGE * cols:
            break
        centre = float(edges[b] + 5.0)
        if any(_hue_distance(centre, t) < 40 for t in taken):
            continue
        taken.append(centre)
        groups.append((f"hue {centre:.0f}", group(coloured & (_hue_distance(hue, centre) <= 30))))
    return groups


def _far_from(pixels: np.ndarray, colour: np.ndarray, distance: int) -> np.ndarray:
    """Pixels whose value in any channel differs from ``colour`` by more than ``distance``.

    One comparison per channel plane: ten times faster than widening the whole strip and reducing
    over its short colour axis.
    """
    top = 255 if pixels.dtype == np.uint8 else int(np.iinfo(pixels.dtype).max)
    out = np.zeros(pixels.shape[:-1], dtype=bool)
    for i in range(pixels.shape[-1]):
        plane, c = pixels[..., i], int(round(float(colour[i])))
        if c + distance < top:
            out |= plane > c + distance
        if c - distance > 0:
            out |= plane < c - distance
    return out


def _hue_distance(a: Any, b: float) -> Any:
    d = np.abs(np.asarray(a) - b) % 360.0
    return np.minimum(d, 360.0 - d)


def _covers(mask: np.ndarray) -> bool:
    """Frame 0 of the group covers most columns, thinly (a line, not a filled area or text)."""
    frame = mask[0]
    drawn = frame.any(axis=0)
    if drawn.mean() < _MIN_COVERAGE:
        return False
    return float(np.median(frame[:, drawn].sum(axis=0))) <= 0.5 * frame.shape[0]


def read_screen_ecg(color_frames: np.ndarray, photometric: str, region: tuple[int, int, int, int] | None,
                    fps: float, shown: str = "echo") -> tuple[np.ndarray, dict[str, Any]]:
    """The ECG drawn on screen in a colour cine.

    Args:
        color_frames: (T, rows, cols, 3) frames as decoded (RGB, or YBR when ``photometric`` says so).
        photometric: the file's PhotometricInterpretation.
        region: the imaging box (x0, y0, x1, y1) from the Sequence of Ultrasound Regions, or None.
        fps: frame rate (frame k at k / fps on the echo's clock).
        shown: the file's name for messages.

    Returns:
        ``signal`` float32 (1, N) in strip pixels (up positive) at 250 Hz, and metadata like the
        other ECG readers (``fs``, ``leads``, ``source`` "screen", ``units`` "px", ``start`` None)
        plus ``offset_s`` (frame 0 on this ECG's clock: the seconds of history before the cine),
        ``mode``, ``px_per_s`` and ``strip`` (the box it was found in).

    Raises:
        NoTraceError: a grey file, no strip outside the imaging box, or no coloured line in it.
        ScreenECGError: a trace that is clipped, flat, saturated, has no steady motion, spans more
            time than the cine, shows no QRS complexes, or is one of two ECG-like traces.
    """
    if color_frames is None or color_frames.ndim != 4 or color_frames.shape[-1] != 3:
        raise NoTraceError(f"{shown}: grey-scale file; an on-screen ECG trace is found by its colour")
    n = color_frames.shape[0]
    # frames FRAME_STEP_S apart are enough: what is drawn stays on screen for a whole sweep (or
    # scroll across), so the frames between add no samples, only work
    picks = np.unique(np.append(np.arange(0, n, max(1, int(round(fps * FRAME_STEP_S)))), n - 1))
    times = picks / float(fps)
    found: list[tuple[str, tuple, np.ndarray]] = []
    for box in candidate_strips(color_frames.shape[1:3], region):
        x0, y0, x1, y1 = box
        for name, mask in colour_groups(color_frames[picks, y0 : y1 + 1, x0 : x1 + 1], photometric):
            if _covers(mask):
                found.append((name, box, mask))
        if found:
            break
    if not found:
        raise NoTraceError(f"{shown}: no ECG trace found (no coloured line outside the imaging area)")

    usable, problems = [], []
    for name, box, mask in found:
        if split_runs_share(mask) > _MAX_SAME_COLOUR_SPLIT:
            problems.append(f"two traces drawn in one colour ({name}); cannot tell the ECG apart")
            continue
        try:
            trace = recover_trace(mask, times)
        except TraceError as exc:
            problems.append(str(exc))
            continue
        signal, t0 = to_uniform(trace, FS)
        share = qrs_share(signal, FS)
        if share < QRS_BAND_SHARE:
            problems.append(f"the {name} trace shows no QRS complexes (QRS-band share {share:.2f}); "
                            "not an ECG (respiration?)")
            continue
        usable.append((name, box, trace, signal, t0))
    if len(usable) > 1:
        raise ScreenECGError(f"{shown}: {len(usable)} ECG-like traces on screen "
                             f"({', '.join(u[0] for u in usable)}); refusing to guess which is the ECG")
    if not usable:
        raise ScreenECGError(f"{shown}: on-screen ECG unusable: {'; '.join(problems)}")
    name, box, trace, signal, t0 = usable[0]
    meta = {
        "fs": FS,
        "leads": [DEFAULT_LEAD],
        "source": SOURCE,
        "units": "px",
        "start": None,
        "offset_s": -t0,
        "mode": trace.mode,
        "px_per_s": trace.px_per_s,
        "strip": box,
    }
    log.debug("%s: %s trace (%s), %.1f px/s, %.2f s of history", shown, trace.mode, name,
              trace.px_per_s, -t0)
    return signal[None, :].astype(np.float32), meta
