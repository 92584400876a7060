"""The quickstart tells whether its video beats with its ECG, from the pixels alone."""

import numpy as np

from jobs.quickstart import beat_report, describe_beat


def _disc_video(bpm: float, seconds: float = 6.0, fps: float = 10.0) -> np.ndarray:
    t = np.arange(int(seconds * fps)) / fps
    yy, xx = np.mgrid[:32, :32]
    radius = 8 + 4 * np.sin(2 * np.pi * bpm / 60 * t)
    inside = (yy - 16) ** 2 + (xx - 16) ** 2 < radius[:, None, None] ** 2
    return np.where(inside, 200, 20).astype(np.uint8)


def test_beat_report_reads_the_heart_rate_from_the_pixels():
    beat = beat_report(_disc_video(72), 10.0, 72.0)
    assert abs(beat["video_bpm"] - 72) <= 5 and beat["within_5bpm"]
    assert "beats with its ECG" in describe_beat(beat)
    other = beat_report(_disc_video(72), 10.0, 110.0)  # the same video against another ECG
    assert not other["within_5bpm"] and "does not beat" in describe_beat(other)
    still = beat_report(np.full((60, 32, 32), 90, np.uint8), 10.0, 72.0)
    assert np.isnan(still["video_bpm"]) and not still["within_5bpm"]
    assert describe_beat(still).startswith("no beat")
