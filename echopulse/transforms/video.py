"""Video transforms on uint8 (T, H, W) cines: crop to the imaging region, sector mask, resize, resample."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def crop_region(frames: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """Crop to a pixel box; ``region`` is (x0, y0, x1, y1) with inclusive maxima (DICOM convention).

    Args:
        frames: (T, H, W) cine.
        region: the box, clipped to the frame.

    Raises:
        ValueError: when the box is empty after clipping.
    """
    _, h, w = frames.shape
    x0, y0, x1, y1 = (int(v) for v in region)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(w - 1, x1), min(h - 1, y1)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"region {region} is empty for frames of {h}x{w}")
    return frames[:, y0 : y1 + 1, x0 : x1 + 1]


def estimate_region(frames: np.ndarray, threshold: float = 2.0) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the pixels that change over time (the moving sector).

    Static overlays (burned-in text, scales) do not change, so they fall outside the box unless they
    sit inside the sector. For files without SequenceOfUltrasoundRegions.

    Args:
        frames: (T, H, W) cine with T >= 2.
        threshold: minimum temporal std (grey levels) of a moving pixel.
    """
    moving = frames.astype(np.float32).std(axis=0) > threshold  # (H, W)
    moving = ndimage.binary_opening(moving, iterations=1)
    labels, n = ndimage.label(moving)
    if n == 0:
        return (0, 0, frames.shape[2] - 1, frames.shape[1] - 1)
    largest = 1 + int(np.argmax(ndimage.sum(moving, labels, index=range(1, n + 1))))
    ys, xs = np.nonzero(labels == largest)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def mask_outside_sector(frames: np.ndarray, threshold: float = 1.0, max_frames: int = 30) -> np.ndarray:
    """Zero every pixel outside the imaging sector: the convex hull of the moving region.

    The moving region is where the temporal std exceeds ``threshold`` grey levels, over at most
    ``max_frames`` frames spread evenly over the cine (every phase of the beat is still seen),
    opened to drop specks, largest connected part. Its convex hull is the sector: a phased-array
    fan (apex, two straight edges, an arc) and a linear probe's rectangle are convex, while the
    moving region alone is not: the fan's far corners, where little tissue echoes, barely change,
    and filling holes left them out (an oval blob instead of the fan). Static burned-in text and
    markers beside the fan stay outside the hull.

    Args:
        frames: (T, H, W) cine.
        threshold: minimum temporal std (grey levels) of a moving pixel.
        max_frames: frames the std is computed over.
    """
    picks = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int))
    moving = frames[picks].astype(np.float32).std(axis=0) > threshold  # (H, W)
    moving = ndimage.binary_opening(moving, iterations=2)
    labels, n = ndimage.label(moving)
    if n == 0:
        return frames.copy()
    largest = labels == 1 + int(np.argmax(ndimage.sum(moving, labels, index=range(1, n + 1))))
    mask = _convex_hull_mask(largest)
    return frames * mask[None].astype(frames.dtype)  # (T, H, W)


def _convex_hull_mask(region: np.ndarray) -> np.ndarray:
    """The filled convex hull of a boolean (H, W) region (the region itself, holes filled, when it is
    too thin for a hull)."""
    from PIL import Image, ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(region & ~ndimage.binary_erosion(region))  # the boundary is enough
    try:
        hull = ConvexHull(np.stack([xs, ys], axis=1).astype(np.float64))
    except (QhullError, ValueError):
        return ndimage.binary_fill_holes(region)
    corners = [(float(xs[i]), float(ys[i])) for i in hull.vertices]
    canvas = Image.new("1", (region.shape[1], region.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(corners, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool) | region


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize to (T, size, size), keeping the aspect ratio by zero-padding to a centred square first.

    Padding (not cropping) keeps the whole sector; the pad is black like the outside of the sector.
    Pillow's bilinear filter widens with the reduction factor, so downscaling is antialiased.

    Args:
        frames: uint8 (T, H, W).
        size: output side in pixels.
    """
    from PIL import Image

    t, h, w = frames.shape
    side = max(h, w)
    square = np.zeros((t, side, side), dtype=np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[:, y0 : y0 + h, x0 : x0 + w] = frames
    if side == size:
        return square
    out = np.empty((t, size, size), dtype=np.uint8)
    for i in range(t):
        out[i] = np.asarray(Image.fromarray(square[i]).resize((size, size), Image.Resampling.BILINEAR))
    return out


def sample_frames(frames: np.ndarray, fps: float, times_s: np.ndarray) -> np.ndarray:
    """Frames at arbitrary times by linear interpolation between neighbouring frames.

    Frame ``i`` is at time ``i / fps``. Times up to one frame past the last frame hold the last frame.

    Args:
        frames: uint8 (T, H, W).
        fps: frame rate of ``frames``.
        times_s: (n,) times in seconds.

    Raises:
        ValueError: for times before 0 or more than one frame interval after the last frame.
    """
    times_s = np.asarray(times_s, dtype=np.float64)
    n = frames.shape[0]
    pos = times_s * fps  # (n,) fractional frame index
    if pos.size and (pos.min() < -1e-6 or pos.max() > n + 1e-6):
        span = f"{times_s.min():.3f}-{times_s.max():.3f} s"
        raise ValueError(f"times {span} outside the cine (0-{n / fps:.3f} s)")
    pos = np.clip(pos, 0, n - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (pos - i0)[:, None, None]
    out = (1 - w) * frames[i0].astype(np.float32) + w * frames[i1].astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
