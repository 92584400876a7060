"""The benches' corpus cache keeps the real cine's clips, so a machine without pydicom-data scores it."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import load_clips, save_clips  # noqa: E402


def _data(real):
    split = {"frames": np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4),
             "study": np.asarray([0, 1])}
    return {"train": split, "heldout": {k: v[:1] for k, v in split.items()}, "held_studies": [1],
            "real_cine": real}


def test_clips_cache_round_trip_with_and_without_the_real_cine(tmp_path):
    real = np.full((3, 3, 4, 4), 7, dtype=np.uint8)
    save_clips(tmp_path / "with.npz", _data(real))
    back = load_clips(tmp_path / "with.npz")
    assert np.array_equal(back["real_cine"], real) and back["real_cine"].dtype == np.uint8
    assert np.array_equal(back["train"]["frames"], _data(real)["train"]["frames"])
    assert back["held_studies"] == [1]
    save_clips(tmp_path / "without.npz", _data(None))
    assert load_clips(tmp_path / "without.npz")["real_cine"] is None
