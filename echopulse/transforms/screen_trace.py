"""Recover an ECG from the trace a scanner draws on screen: pure functions on per-frame trace masks.

The reader (:mod:`echopulse.io.screen_ecg`) finds the strip and the trace's pixels; everything here
works on a boolean mask ``(T, rows, cols)`` of trace pixels per frame and the frame times.

Two display modes:

* **sweep**: the trace stays put and a cursor moves left to right, erasing a few columns just ahead
  of itself. The cursor is the last column before the erase gap; its unwrapped position against
  the frame times gives the time scale (pixels per second) by a straight-line fit, and every column
  of every sweep then has a time: ``(u - a) / b`` for unwrapped column ``u``.
* **scroll**: the whole trace moves left and the newest sample is at the right edge. The shift
  between frames (matched on the trace's column profile) against the frame times gives the scale.

Each column of the mask holds a vertical run of trace pixels (a scanner draws the min..max of the
signal over the column's time, joined to its neighbours). A column gives two samples, its run's
ends, ordered so they continue from the previous column: a QRS spike that fits in one column keeps
its peak. Amplitudes are in pixels (up is positive): only the shape matters downstream, where each
lead is standardized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal as sps

MODES = ("sweep", "scroll")
MIN_GAP_PX = 2  # a sweep display's erase gap is at least this wide
MIN_PEAK_TO_PEAK_PX = 3.0  # a trace spanning fewer rows than this is flat
MAX_CLIPPED_SHARE = 0.01  # more columns than this touching the strip's top or bottom row: clipped
QRS_BAND_SHARE = 0.15  # share of a trace's variation in the 8-20 Hz band above which it has QRS complexes


class TraceError(ValueError):
    """A trace that cannot give a trustworthy ECG; the message says why in plain words."""


@dataclass(frozen=True)
class RecoveredTrace:
    """A trace turned back into a signal.

    Attributes:
        times_s: float (n,) sample times on the echo's clock (frame 0 at 0; earlier samples are the
            history already on screen at frame 0, so they are negative).
        values: float (n,) amplitude in pixels, up positive.
        mode: "sweep" or "scroll".
        px_per_s: the measured time scale.
    """

    times_s: np.ndarray
    values: np.ndarray
    mode: str
    px_per_s: float


def column_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top and bottom trace row of every column of every frame (NaN where a column is empty).

    Args:
        mask: bool (T, rows, cols) trace pixels.

    Returns:
        ``top``, ``bottom``: float (T, cols).
    """
    rows = mask.shape[1]
    present = mask.any(axis=1)  # (T, cols)
    top = np.argmax(mask, axis=1).astype(np.float64)
    bottom = (rows - 1 - np.argmax(mask[:, ::-1, :], axis=1)).astype(np.float64)
    top[~present] = np.nan
    bottom[~present] = np.nan
    return top, bottom


def check_trace(top: np.ndarray, bottom: np.ndarray, rows: int) -> None:
    """Refuse a trace that is flat, saturated or clipped at the strip's top or bottom edge.

    Raises:
        TraceError: naming the problem.
    """
    if np.all(np.isnan(top)):
        raise TraceError("no trace pixels in the strip")
    span = np.nanmax(bottom) - np.nanmin(top)
    if span < MIN_PEAK_TO_PEAK_PX:
        raise TraceError(f"flat trace: it spans {span:.0f} pixel rows (need {MIN_PEAK_TO_PEAK_PX:.0f})")
    drawn = ~np.isnan(top)
    edge = ((top <= 0) | (bottom >= rows - 1)) & drawn
    share = edge.sum() / max(1, drawn.sum())
    if share > MAX_CLIPPED_SHARE:
        raise TraceError(
            f"trace clipped or saturated at the strip's edge: {100 * share:.1f}% of its columns touch "
            f"the strip's top or bottom row"
        )


def erase_gaps(present: np.ndarray) -> np.ndarray:
    """Per frame, the column just before the widest run of empty columns (circular), or -1.

    Args:
        present: bool (T, cols), a trace pixel in the column.
    """
    n, cols = present.shape
    padded = np.zeros((n, 2 * cols + 2), dtype=np.int8)
    padded[:, 1:-1] = np.concatenate([~present, ~present], axis=1)  # twice round: wrapping runs whole
    step = np.diff(padded, axis=1)
    start_row, start_col = np.nonzero(step == 1)  # row-major: starts and ends pair up in order
    _, end_col = np.nonzero(step == -1)
    length = np.minimum(end_col - start_col, cols)
    out = np.full(n, -1, dtype=np.int64)
    if length.size == 0:
        return out
    order = np.lexsort((-length, start_row))  # per frame, its longest run first
    rows_sorted = start_row[order]
    first = order[np.concatenate([[True], rows_sorted[1:] != rows_sorted[:-1]])]
    ok = (length[first] >= MIN_GAP_PX) & (length[first] < cols)
    out[start_row[first][ok]] = (start_col[first][ok] - 1) % cols
    return out


def detect_mode(present: np.ndarray, cursors: np.ndarray | None = None) -> str:
    """"sweep" when most frames show an erase gap that moves, else "scroll"."""
    cursors = erase_gaps(present) if cursors is None else cursors
    found = cursors >= 0
    if found.mean() >= 0.8 and len(np.unique(cursors[found])) > 1:
        return "sweep"
    return "scroll"


def _fit_scale(positions: np.ndarray, times: np.ndarray, what: str) -> tuple[float, float]:
    """Least-squares line ``positions = a + b * times``; refuses a motion that is not steady."""
    if len(positions) < 3:
        raise TraceError(f"the {what} is seen in fewer than 3 frames; no time scale can be measured")
    b, a = np.polyfit(times, positions, 1)
    if not np.isfinite(b) or b <= 0:
        raise TraceError(f"the {what} does not move forward between frames; no time scale")
    residual = positions - (a + b * times)
    if np.median(np.abs(residual)) > 2.0:
        raise TraceError(f"the {what} moves unevenly between frames (median misfit "
                         f"{np.median(np.abs(residual)):.1f} px); no steady time scale")
    return float(a), float(b)


def _ordered_samples(top: np.ndarray, bottom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two values per column (last axis), in drawing order: the end nearer the previous column
    first. Rows grow downward, so values are negated rows."""
    first, second = -bottom.copy(), -top.copy()
    level = (first + second) / 2
    prev = np.concatenate([np.full(level.shape[:-1] + (1,), np.nan), level[..., :-1]], axis=-1)
    flip = np.abs(prev + top) < np.abs(prev + bottom)  # previous level nearer the top end
    first[flip], second[flip] = -top[flip], -bottom[flip]
    return first, second


def recover_sweep(top: np.ndarray, bottom: np.ndarray, times: np.ndarray,
                  cursor: np.ndarray | None = None) -> RecoveredTrace:
    """Signal from a sweep display.

    Args:
        top, bottom: float (T, cols) run ends per column (NaN: empty).
        times: float (T,) frame times in seconds (frame 0 at 0).
        cursor: :func:`erase_gaps` of the trace, when already known.
    """
    n, cols = top.shape
    cursor = erase_gaps(~np.isnan(top)) if cursor is None else cursor
    seen = cursor >= 0
    if seen.sum() < 3:
        raise TraceError("no erase gap found in the sweep; the cursor cannot be followed")
    # unwrap the cursor: it only moves forward, by less than half the strip per frame
    idx = np.flatnonzero(seen)
    step = np.mod(np.diff(cursor[idx]), cols)
    if np.any(step > cols // 2):
        raise TraceError("the sweep cursor jumps by more than half the strip between frames")
    unwrapped = np.concatenate([[cursor[idx[0]]], cursor[idx[0]] + np.cumsum(step)]).astype(np.float64)
    a, b = _fit_scale(unwrapped, times[idx], "sweep cursor")
    # latest view of every unwrapped column; frame 0 also holds the previous sweep (the history)
    lo = int(unwrapped[0]) - cols
    store_first = np.full(int(unwrapped[-1]) - lo + 1, np.nan)
    store_second = store_first.copy()
    firsts, seconds = _ordered_samples(top, bottom)
    x = np.arange(cols)
    for j, k in enumerate(idx):
        c, u_c = cursor[k], int(unwrapped[j])
        u = np.where(x <= c, u_c - (c - x), u_c - (c - x) - cols)
        first, second = firsts[k], seconds[k]
        ok = ~np.isnan(first)
        store_first[u[ok] - lo] = first[ok]
        store_second[u[ok] - lo] = second[ok]
    u_all = np.arange(lo, lo + len(store_first), dtype=np.float64)
    t_col = (u_all - a) / b
    return _interleave(t_col, store_first, store_second, b, "sweep")


def _shift_costs(prev: np.ndarray, cur: np.ndarray, shifts: range) -> np.ndarray:
    """Mean absolute profile difference per frame pair (rows) and leftward shift (columns);
    inf where fewer than a third of the columns overlap."""
    pairs, cols = cur.shape
    costs = np.full((pairs, len(shifts)), np.inf)
    for i, s in enumerate(shifts):
        diff = np.abs(prev[:, s:] - cur[:, : cols - s])
        ok = ~np.isnan(diff)
        count = ok.sum(axis=1)
        total = np.where(ok, diff, 0.0).sum(axis=1)
        costs[:, i] = np.where(count >= cols // 3, total / np.maximum(count, 1), np.inf)
    return costs


def _best_shifts(costs: np.ndarray, shifts: range) -> np.ndarray:
    """The minimum of each row of ``costs``, refined to sub-pixel by a parabola through its
    neighbours; NaN where no shift fits."""
    best = np.argmin(costs, axis=1)
    out = np.asarray(shifts, dtype=np.float64)[best]
    out[~np.isfinite(costs[np.arange(len(best)), best])] = np.nan
    inner = (best > 0) & (best < costs.shape[1] - 1)
    for k in np.flatnonzero(inner):
        c0, c1, c2 = costs[k, best[k] - 1 : best[k] + 2]
        denom = c0 - 2 * c1 + c2
        if np.isfinite(denom) and denom > 0:
            out[k] += 0.5 * (c0 - c2) / denom
    return out


def recover_scroll(top: np.ndarray, bottom: np.ndarray, times: np.ndarray) -> RecoveredTrace:
    """Signal from a scrolling display (newest sample at the right edge).

    Args:
        top, bottom: float (T, cols) run ends per column (NaN: empty).
        times: float (T,) frame times in seconds (frame 0 at 0).
    """
    n, cols = top.shape
    level = (top + bottom) / 2
    # the scroll speed is steady: a full search on a few frame pairs, then a narrow one on all
    wide = range(0, cols // 2 + 1)
    rough = _best_shifts(_shift_costs(level[:4], level[1:5], wide), wide)
    if np.isnan(rough).all():
        raise TraceError("the scrolling trace cannot be matched between frames")
    centre = int(round(np.nanmedian(rough)))
    narrow = range(max(0, centre - 3), min(cols // 2, centre + 4) + 1)
    shifts = _best_shifts(_shift_costs(level[:-1], level[1:], narrow), narrow)
    if np.isnan(shifts).any():
        raise TraceError("the scrolling trace cannot be matched between frames")
    if np.median(shifts) < 0.25:
        raise TraceError("the trace does not scroll between frames; no time scale can be measured")
    travelled = np.concatenate([[0.0], np.cumsum(shifts)])
    _, b = _fit_scale(travelled, times, "scrolling trace")
    x = np.arange(cols, dtype=np.float64)
    t_parts, f_parts, s_parts = [], [], []
    newest = -np.inf
    firsts, seconds = _ordered_samples(top, bottom)
    for k in range(n):
        t_col = times[k] - (cols - 1 - x) / b
        first, second = firsts[k], seconds[k]
        keep = (t_col > newest + 0.5 / b) & ~np.isnan(first)
        if keep.any():
            t_parts.append(t_col[keep])
            f_parts.append(first[keep])
            s_parts.append(second[keep])
            newest = t_col[keep].max()
    return _interleave(np.concatenate(t_parts), np.concatenate(f_parts), np.concatenate(s_parts), b,
                       "scroll")


def _interleave(t_col, first, second, px_per_s, mode) -> RecoveredTrace:
    """Two samples per column at its quarter points; empty columns are dropped."""
    ok = ~np.isnan(first)
    quarter = 0.25 / px_per_s
    times = np.stack([t_col[ok] - quarter, t_col[ok] + quarter], axis=1).ravel()
    values = np.stack([first[ok], second[ok]], axis=1).ravel()
    order = np.argsort(times, kind="stable")
    return RecoveredTrace(times_s=times[order], values=values[order], mode=mode, px_per_s=float(px_per_s))


def recover_trace(mask: np.ndarray, times: np.ndarray, mode: str | None = None) -> RecoveredTrace:
    """A trace mask over a cine -> the signal it draws, on the echo's clock.

    Args:
        mask: bool (T, rows, cols) trace pixels per frame.
        times: float (T,) frame times in seconds, frame 0 at 0.
        mode: "sweep", "scroll", or None to detect it.

    Raises:
        TraceError: flat, clipped, no steady motion, or a strip longer than the cine's time span.
    """
    top, bottom = column_runs(mask)
    check_trace(top, bottom, mask.shape[1])
    cursor = erase_gaps(~np.isnan(top))
    mode = mode or detect_mode(~np.isnan(top), cursor)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sweep":
        out = recover_sweep(top, bottom, times, cursor)
    else:
        out = recover_scroll(top, bottom, times)
    strip_s = mask.shape[2] / out.px_per_s
    cine_s = float(times[-1] - times[0]) + (times[1] - times[0] if len(times) > 1 else 0.0)
    if strip_s > cine_s:
        raise TraceError(
            f"the strip spans {strip_s:.2f} s at the measured {out.px_per_s:.0f} px/s, more than the "
            f"cine's {cine_s:.2f} s; the time scale of its history cannot be checked"
        )
    return out


def to_uniform(trace: RecoveredTrace, fs: float) -> tuple[np.ndarray, float]:
    """Resample a recovered trace onto a uniform grid.

    Returns:
        ``signal`` float (N,) and ``t0``, the time of its first sample on the echo's clock (a whole
        number of sample periods, so frame 0 falls on a sample).
    """
    t = trace.times_s
    first = np.ceil(t[0] * fs) / fs
    grid = np.arange(first, t[-1], 1.0 / fs)
    # remove duplicate times (np.interp needs increasing x)
    keep = np.concatenate([[True], np.diff(t) > 1e-9])
    return np.interp(grid, t[keep], trace.values[keep]), float(first)


def qrs_share(sig: np.ndarray, fs: float) -> float:
    """Share of a signal's variation (its whole spread, slow waves included) in the 8-20 Hz band:
    high for an ECG (QRS complexes), near zero for a respiration or pressure trace."""
    if len(sig) < int(fs):
        return 0.0
    wide = sps.detrend(np.asarray(sig, dtype=np.float64)).std()
    if wide <= 0:
        return 0.0
    from echopulse.transforms.ecg import butter_bandpass

    sos = butter_bandpass(8.0, min(20.0, 0.45 * fs), float(fs))
    return float(sps.sosfiltfilt(sos, sig).std() / wide)


def split_runs_share(mask: np.ndarray, min_gap: int = 3) -> float:
    """Share of drawn columns (frame 0) holding two or more vertical runs separated by ``min_gap``
    empty rows: two traces drawn in one colour."""
    from scipy import ndimage

    frame = mask[0]  # (rows, cols)
    drawn = frame.any(axis=0)
    if not drawn.any():
        return 0.0
    # close gaps of up to min_gap rows, then count the runs that start in each column
    closed = ndimage.binary_closing(frame, structure=np.ones((min_gap + 1, 1), dtype=bool))
    closed |= frame
    starts = closed & ~np.vstack([np.zeros((1, frame.shape[1]), dtype=bool), closed[:-1]])
    return float((starts.sum(axis=0) >= 2).sum() / drawn.sum())
