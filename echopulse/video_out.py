"""Writing generated videos: GIF (Pillow) and MP4 (ffmpeg shipped by imageio-ffmpeg).

Writes go to a temporary file renamed into place, so a failure never leaves a partial output.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from echopulse.errors import EchoPulseError

VIDEO_SUFFIXES = (".gif", ".mp4")


def check_video_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise EchoPulseError(f"{path}: unsupported output extension {out.suffix or '(none)'!r}; "
                             f"use one of {', '.join(VIDEO_SUFFIXES)}")
    return out


def write_video(frames: np.ndarray, fps: float, path: str, upscale: int = 1) -> Path:
    """Write grayscale uint8 frames (T, H, W) as .gif or .mp4.

    Args:
        frames: uint8 (T, H, W).
        fps: frames per second of the output.
        path: output file; its suffix picks the format.
        upscale: integer nearest-neighbour upscaling for viewing small videos.
    """
    out = check_video_path(path)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W), got {frames.dtype} {frames.shape}")
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        if out.suffix.lower() == ".gif":
            _write_gif(frames, fps, tmp)
        else:
            _write_mp4(frames, fps, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _write_gif(frames: np.ndarray, fps: float, path: str) -> None:
    from PIL import Image

    images = [Image.fromarray(f, mode="L") for f in frames]
    duration_ms = int(round(1000.0 / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def _write_mp4(frames: np.ndarray, fps: float, path: str) -> None:
    import imageio.v2 as imageio

    # H.264 with yuv420p needs even sizes
    t, h, w = frames.shape
    padded = np.zeros((t, h + h % 2, w + w % 2), dtype=np.uint8)
    padded[:, :h, :w] = frames
    rgb = np.repeat(padded[..., None], 3, axis=-1)
    writer = imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1)
    try:
        for frame in rgb:
            writer.append_data(frame)
    finally:
        writer.close()
