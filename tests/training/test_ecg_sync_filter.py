"""Generator training takes synchronized clips only, unless told otherwise."""

import json

import numpy as np
import pyarrow as pa
import pytest

from echopulse.errors import EchoPulseError
from echopulse.tokenize import _ecg_sync
from jobs.datasets import _ecg_flags, _with_ecg, tokens_datasets
from jobs.recipes import tiny


def _batch():
    ecg = np.zeros((4, 12, 10), dtype=np.float32)
    ecg[1:, 1, 3] = 1.0  # row 0 has no ECG
    return {"tokens": np.arange(4), "ecg": ecg, "split": np.array(["train"] * 4),
            "ecg_source": np.array(["none", "screen", "wfdb", "wfdb"]),
            "ecg_sync": np.array([False, True, True, False])}


def test_unsynchronized_clips_are_dropped_unless_allowed():
    assert _with_ecg(_batch())["tokens"].tolist() == [1, 2]
    assert _with_ecg(_batch(), allow_unsynchronized=True)["tokens"].tolist() == [1, 2, 3]
    old = {k: v for k, v in _batch().items() if k != "ecg_sync"}  # tokens made before ecg_sync
    assert _with_ecg(old)["tokens"].tolist() == [1, 2, 3]
    flags = _ecg_flags(_batch())
    assert flags["has_ecg"].tolist() == [False, True, True, True]
    assert flags["sync"].tolist() == [False, True, True, False]


def test_tokenize_carries_ecg_sync_and_derives_it_for_older_clips():
    ecg = np.zeros((3, 12, 10), dtype=np.float32)
    ecg[0, 0, 0] = 1.0
    table = pa.table({"ecg_sync": [True, False, False]})
    assert _ecg_sync(table, ecg).tolist() == [True, False, False]
    assert _ecg_sync(pa.table({"view": ["a", "b", "c"]}), ecg).tolist() == [True, False, False]


def test_generator_refuses_a_train_split_of_only_unsynchronized_clips(tmp_path):
    recipe = tiny()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "schema": "tokens/v1", "token_grid": list(recipe.generator.token_grid),
        "codebook_size": recipe.generator.vocab_size, "split_counts": {"train": 3, "val": 1}}))
    counts = {"train": {"with_ecg": 3, "without_ecg": 0, "unsynchronized": 3},
              "val": {"with_ecg": 1, "without_ecg": 0, "unsynchronized": 0}}
    with pytest.raises(EchoPulseError, match="no train clip has an ECG recorded with its echo "
                                             r"\(3 paired only by patient and time skipped\); "
                                             "--allow-unsynchronized"):
        tokens_datasets(str(tmp_path), recipe, counts)


def _write_tokens(root, columns: dict) -> str:
    import pyarrow.parquet as pq

    (root / "tokens").mkdir(parents=True)
    table = pa.table(columns)
    pq.write_table(table.slice(0, 2), root / "tokens" / "shard-0.parquet")
    pq.write_table(table.slice(2), root / "tokens" / "shard-1.parquet")
    (root / "tokens" / "notes.txt").write_text("not a shard")
    return str(root)


def test_ecg_counts_read_the_flag_columns_without_ray(tmp_path):
    from jobs.datasets import ecg_counts

    b = _batch()
    split = ["train", "train", "val", "train"]
    new = _write_tokens(tmp_path / "new", {"split": split, "ecg_source": b["ecg_source"].tolist(),
                                           "ecg_sync": b["ecg_sync"].tolist(), "ecg": b["ecg"].reshape(4, -1).tolist()})
    assert ecg_counts(new) == {"train": {"with_ecg": 2, "without_ecg": 1, "unsynchronized": 1},
                               "val": {"with_ecg": 1, "without_ecg": 0, "unsynchronized": 0}}
    # tokens made before the flag columns: the ECG's own values say which rows have one
    old = _write_tokens(tmp_path / "old", {"split": split, "ecg": b["ecg"].reshape(4, -1).tolist()})
    assert ecg_counts(old) == {"train": {"with_ecg": 2, "without_ecg": 1, "unsynchronized": 0},
                               "val": {"with_ecg": 1, "without_ecg": 0, "unsynchronized": 0}}


def test_clip_split_counts_read_the_split_column(tmp_path):
    import pyarrow.parquet as pq

    from jobs.train_tokenizer import split_counts

    (tmp_path / "clips").mkdir()
    assert split_counts(str(tmp_path)) == {}
    pq.write_table(pa.table({"split": ["train", "val", "train"], "frames": [[1], [2], [3]]}),
                   tmp_path / "clips" / "shard-0.parquet")
    assert split_counts(str(tmp_path)) == {"train": 2, "val": 1}
