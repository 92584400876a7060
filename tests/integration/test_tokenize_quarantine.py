"""Tokenize quarantines clips it cannot encode (bad shape, NaN ECG, undecodable rows or files)
instead of failing the run, and accounts for every clip (tokens + quarantine)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench._common import write_random_tokens
from echopulse.schema import CLIPS_SCHEMA, clip_schema, write_dataset_info
from echopulse.tokenize import ERROR, STAGE, make_tokenize_fn
from jobs.recipes import tiny
from pipelines.tokenize import run_tokenize

pytestmark = pytest.mark.integration


def _clips_table(n: int, frames: int, size: int, samples: int, seed: int, prefix: str,
                 nan_ecg_row: int | None = None, null_frames_row: int | None = None) -> pa.Table:
    rng = np.random.default_rng(seed)
    schema = clip_schema(frames, size, samples)
    video = rng.integers(0, 255, size=(n, frames, size, size), dtype=np.uint8)
    ecg = rng.standard_normal((n, 12, samples)).astype(np.float32)
    if nan_ecg_row is not None:
        ecg[nan_ecg_row, 3, 10] = np.nan
    frames_col = pa.FixedShapeTensorArray.from_numpy_ndarray(video)
    if null_frames_row is not None:  # a row whose frames are missing (undecodable)
        storage_arr = frames_col.storage
        mask = np.zeros(n, dtype=bool)
        mask[null_frames_row] = True
        values = pa.FixedSizeListArray.from_arrays(storage_arr.values, storage_arr.type.list_size,
                                                   mask=pa.array(mask))
        frames_col = pa.ExtensionArray.from_storage(schema.field("frames").type, values)
    cols = {
        "clip_id": [f"{prefix}-{i}" for i in range(n)],
        "study_key": ["s"] * n, "split": ["train" if i % 3 else "val" for i in range(n)],
        "view": ["A4C"] * n, "frames": frames_col, "fps": [5.0] * n,
        "ecg": pa.FixedShapeTensorArray.from_numpy_ndarray(ecg),
        "ecg_leads": [[True] * 12] * n, "ecg_source": ["wfdb"] * n, "ecg_sync": [True] * n,
        "heart_rate_bpm": [60.0] * n,
        "r_peaks": [[0]] * n, "t_start_s": [0.0] * n, "t_end_s": [1.0] * n, "ef": [0.6] * n,
        "source_uri": ["x"] * n, "provenance": ["{}"] * n,
    }
    return pa.Table.from_pydict(cols, schema=schema)


def test_bad_rows_and_parts_are_quarantined(tmp_path, ray_session):
    recipe = tiny()
    clip = recipe.clip
    clips = tmp_path / "clips"
    (clips / "clips").mkdir(parents=True)
    good = _clips_table(6, clip.frames, clip.size, clip.ecg_samples, 1, "good", nan_ecg_row=2)
    pq.write_table(good, clips / "clips" / "part-good.parquet")
    # a null inside a fixed-shape tensor column: Parquet writes it, Arrow cannot read it back
    nulls = _clips_table(2, clip.frames, clip.size, clip.ecg_samples, 3, "null", null_frames_row=1)
    pq.write_table(nulls, clips / "clips" / "part-null.parquet")
    wrong = _clips_table(2, clip.frames, clip.size // 2, clip.ecg_samples, 2, "small")
    pq.write_table(wrong, clips / "clips" / "part-small.parquet")
    (clips / "clips" / "part-corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    write_dataset_info(str(clips), CLIPS_SCHEMA, {}, {"clips": 11})
    tokenizer = write_random_tokens(str(tmp_path / "unused"), recipe, n=2)  # an untrained tokenizer

    out = tmp_path / "tokens"
    summary = run_tokenize(str(clips), tokenizer, str(out), batch_size=4)

    quarantine = pq.read_table(out / "quarantine" / "quarantine.parquet").to_pylist()
    by_stage: dict[str, list[str]] = {}
    for row in quarantine:
        by_stage.setdefault(row["stage"], []).append(row["clip_id"] or row["source_uri"])
    assert sorted(by_stage["schema"]) == ["small-0", "small-1"]
    assert by_stage["ecg"] == ["good-2"]
    decode = sorted(by_stage["decode"])
    assert decode[0].endswith("part-corrupt.parquet") and decode[1:] == ["null-0", "null-1"]
    assert (summary.clips, summary.tokens, summary.quarantined) == (11, 5, 6)

    tokens = pq.read_table(out / "tokens")
    assert sorted(tokens.column("clip_id").to_pylist()) == ["good-0", "good-1", "good-3", "good-4",
                                                            "good-5"]
    assert tuple(tokens.column("tokens").type.shape) == tuple(recipe.tokenizer.token_grid)
    assert not {"_error", "_stage", "_source"} & set(tokens.column_names)
    assert json.loads((out / "summary.json").read_text()) == {"clips": 11, "tokens": 5, "quarantined": 6}
    info = json.loads((out / "dataset.json").read_text())
    assert info["split_counts"] == {"train": 3, "val": 2} and info["counts"]["quarantined"] == 6


def test_tokenize_fn_flags_bad_rows_without_ray(tmp_path):
    """The stage function alone: a part row in, token rows out, the NaN-ECG row flagged, the good
    rows encoded exactly as the model encodes them; a part Arrow cannot read comes back flagged."""
    import torch

    from echopulse.models.tokenizer import VideoTokenizer

    recipe = tiny()
    clip = recipe.clip
    torch.manual_seed(0)
    model = VideoTokenizer(recipe.tokenizer).eval()
    part = tmp_path / "part.parquet"
    pq.write_table(_clips_table(3, clip.frames, clip.size, clip.ecg_samples, 7, "c", nan_ecg_row=1), part)
    fn = make_tokenize_fn(model, "tok-1", batch_size=2, ecg_samples=clip.ecg_samples)
    rows = {}
    for batch in fn({"path": str(part)}):
        for i, cid in enumerate(batch["clip_id"]):
            rows[cid] = {k: v[i] for k, v in batch.items()}
    assert sorted(rows) == ["c-0", "c-1", "c-2"] and rows["c-1"][STAGE] == "ecg"
    assert not rows["c-0"][ERROR] and rows["c-0"]["tokenizer_id"] == "tok-1"
    frames = pq.read_table(part).slice(0, 1).column("frames").combine_chunks().to_numpy_ndarray()
    with torch.inference_mode():
        expected = model.encode(torch.as_tensor(frames).float() / 255.0).numpy()[0]
    np.testing.assert_array_equal(rows["c-0"]["tokens"], expected)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(_clips_table(2, clip.frames, clip.size, clip.ecg_samples, 8, "n", null_frames_row=1), nulls)
    flagged = [(c, st) for b in fn({"path": str(nulls)}) for c, st in zip(b["clip_id"], b[STAGE])]
    assert sorted(flagged) == [("n-0", "decode"), ("n-1", "decode")]
