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


def test_window_spans_with_ecg_offset_and_without_ecg():
    from echopulse.transforms.clips import window_spans as spans_of

    clip = ClipConfig(frames=5, size=16, fps=5.0, ecg_samples=250)  # 1 s video, 1 s ECG
    # ECG started 0.5 s before echo frame 0: 4 s of ECG covers echo times -0.5..3.5
    assert [s.t_start_s for s in spans_of(4.0, 4.0, clip, ecg_offset_s=0.5)] == [0.0, 1.0, 2.0]
    # ECG started 1.5 s after echo frame 0: the first window starts there
    assert [s.t_start_s for s in spans_of(4.0, 4.0, clip, ecg_offset_s=-1.5)] == [1.5, 2.5]
    assert len(spans_of(4.0, None, clip)) == 4  # an ECG-less cine: video only


def test_cycle_spans_one_rr_interval_each():
    from echopulse.transforms.clips import cycle_spans

    clip = ClipConfig(frames=5, size=16, fps=5.0, ecg_samples=250)
    # 500->520: an extra beat (too short); 750->1000 ends after the 3.9 s cine; 1000->1800 too long
    peaks = np.array([50, 250, 500, 520, 750, 1000, 1800])
    spans = cycle_spans(peaks, video_duration_s=3.9, ecg_duration_s=8.0, clip=clip)
    assert [(s.t_start_s, s.t_end_s) for s in spans] == [(0.2, 1.0), (1.0, 2.0), (2.08, 3.0)]
    shifted = cycle_spans(peaks, 3.9, 8.0, clip, ecg_offset_s=0.2)  # echo frame 0 = ECG 0.2 s
    assert shifted[0].t_start_s == 0.0 and shifted[0].t_end_s == pytest.approx(0.8)


def test_cut_clip_cycle_span_and_no_ecg():
    frames = np.repeat(np.arange(100, dtype=np.uint8)[:, None, None], 4, axis=1).repeat(4, axis=2)
    clip = ClipConfig(frames=5, size=4, fps=5.0, ecg_samples=100)
    video, ecg, peaks = cut_clip(frames, 50.0, None, ClipSpan(0.2, 1.0), clip)  # 0.8 s cycle, 5 frames
    assert video[:, 0, 0].tolist() == [10, 18, 26, 34, 42]  # evenly over the R-R interval
    assert ecg.shape == (12, 100) and not ecg.any() and peaks.size == 0
