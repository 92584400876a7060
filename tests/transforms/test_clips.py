import numpy as np
import pytest

from echopulse.config import ECG_FS, ClipConfig
from echopulse.transforms.clips import ClipSpan, cut_clip, window_spans
from echopulse.transforms.ecg import PreparedECG


def test_window_spans_cover_both_streams():
    clip = ClipConfig(frames=5, size=16, fps=5.0, ecg_samples=300)  # 1.0 s video, 1.2 s ECG
    spans = window_spans(4.0, 4.0, clip)
    assert [s.t_start_s for s in spans] == [0.0, 1.0, 2.0]  # a start at 3.0 lacks ECG
    assert all(s.t_end_s == pytest.approx(s.t_start_s + 1.0) for s in spans)
    assert len(window_spans(4.0, 2.3, clip)) == 2
    assert len(window_spans(1.5, 10.0, clip)) == 1
    assert window_spans(0.9, 10.0, clip) == []
    strided = window_spans(4.0, 4.0, ClipConfig(frames=5, size=16, fps=5.0, ecg_samples=300, stride_s=0.5))
    assert [s.t_start_s for s in strided] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_cut_clip_times_ecg_window_and_peaks():
    fps = 30.0
    frames = np.repeat(np.arange(120, dtype=np.uint8)[:, None, None], 8, axis=1).repeat(8, axis=2)
    ecg = np.tile(np.arange(1000, dtype=np.float32), (12, 1))
    prepared = PreparedECG(ecg=ecg, lead_mask=np.ones(12, bool), r_peaks=np.array([100, 300, 520, 700]),
                           heart_rate_bpm=70.0)
    clip = ClipConfig(frames=5, size=4, fps=5.0, ecg_samples=300)
    video, window, peaks = cut_clip(frames, fps, prepared, ClipSpan(1.0, 2.0), clip)
    assert video.shape == (5, 4, 4) and video.dtype == np.uint8
    assert video[:, 0, 0].tolist() == [30, 36, 42, 48, 54]  # frame i at t_start + i / clip.fps
    assert window.shape == (12, 300) and window.dtype == np.float32 and window[0, 0] == ECG_FS
    assert peaks.dtype == np.int32 and peaks.tolist() == [50, 270]
    with pytest.raises(ValueError):
        cut_clip(frames, fps, prepared, ClipSpan(3.0, 4.0), clip)
