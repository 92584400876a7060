"""Preflight: bad input fails before Ray starts, with one clear line (and CLI exit 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echopulse.config import replace
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIPS_SCHEMA, TOKENS_SCHEMA, clip_schema
from jobs import preflight
from jobs.recipes import tiny
from echopulse.schema import write_dataset_info
from bench._common import write_random_tokens


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Two small tokens datasets made by two different (untrained) tokenizers."""
    base = tmp_path_factory.mktemp("preflight")
    a = write_random_tokens(str(base / "tokens_a"), tiny(), n=4, seed=1)
    b = write_random_tokens(str(base / "tokens_b"), tiny(), n=4, seed=2)
    return {"a": (str(base / "tokens_a"), a), "b": (str(base / "tokens_b"), b)}


def _clips(path, n: int, size: int = 32) -> str:
    clip = tiny().clip
    schema = clip_schema(clip.frames, size, clip.ecg_samples)
    (path / "clips").mkdir(parents=True)
    rows = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
    if n:
        rows["frames"] = pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.zeros((n, clip.frames, size, size), np.uint8))
    pq.write_table(pa.table(rows, schema=schema), path / "clips" / "part-0.parquet")
    write_dataset_info(str(path), CLIPS_SCHEMA, {}, {"clips": n})
    return str(path)


def test_good_inputs_pass(tokens, tmp_path):
    preflight.generator_job(tokens["a"][0], tokens["a"][1], str(tmp_path / "out"), tiny())
    preflight.tokenizer_job(_clips(tmp_path / "clips", 2), str(tmp_path / "out2"), tiny())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".echopulse")]


def test_tokens_of_another_tokenizer(tokens):
    with pytest.raises(EchoPulseError, match="tokens were made by tokenizer .* but .* is tokenizer"):
        preflight.check_tokens(tokens["a"][0], tiny(), tokens["b"][1])


def test_rows_of_another_tokenizer_even_when_dataset_json_agrees(tokens, tmp_path):
    # dataset.json claims tokenizer b, the rows say a: still refused
    import shutil

    copy = tmp_path / "mixed"
    shutil.copytree(tokens["a"][0], copy)
    info = json.loads((copy / "dataset.json").read_text())
    info["tokenizer_id"] = preflight.tokenizer_model_id(tokens["b"][1])
    (copy / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(EchoPulseError, match="made by tokenizer"):
        preflight.check_tokens(str(copy), tiny(), tokens["b"][1])


def test_empty_datasets(tmp_path):
    empty = tmp_path / "empty_clips"
    empty.mkdir()
    write_dataset_info(str(empty), CLIPS_SCHEMA, {}, {"clips": 0})
    with pytest.raises(EchoPulseError, match="the dataset is empty"):
        preflight.check_clips(str(empty), tiny())
    zero_rows = _clips(tmp_path / "zero", 0)
    with pytest.raises(EchoPulseError, match="the dataset is empty"):
        preflight.check_clips(zero_rows, tiny())


def test_wrong_schema(tokens, tmp_path):
    with pytest.raises(EchoPulseError, match="dataset schema is 'tokens/v1', expected 'clips/v1'"):
        preflight.check_clips(tokens["a"][0], tiny())
    with pytest.raises(EchoPulseError, match=r"clips of shape \(5, 16, 16\)"):
        preflight.check_clips(_clips(tmp_path / "small", 2, size=16), tiny())
    # parts that lack the tokens columns
    bad = tmp_path / "bad_tokens"
    (bad / "tokens").mkdir(parents=True)
    pq.write_table(pa.table({"clip_id": ["x"]}), bad / "tokens" / "part-0.parquet")
    write_dataset_info(str(bad), TOKENS_SCHEMA, {}, {"tokens": 1})
    with pytest.raises(EchoPulseError, match="lacks column"):
        preflight.check_tokens(str(bad), tiny(), tokens["a"][1])
    # a recipe of another token grid
    other = replace(tiny(), generator=replace(tiny().generator, token_grid=(3, 8, 8)))
    with pytest.raises(EchoPulseError, match="token grid"):
        preflight.check_tokens(tokens["a"][0], other, tokens["a"][1])


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(EchoPulseError, match="cannot write there"):
        preflight.check_writable(str(blocker / "out"))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(EchoPulseError, match="cannot write there"):
            preflight.check_writable(str(ro / "out"))


def test_cli_exits_2_with_one_line(tokens, tmp_path, capsys):
    from echopulse.cli import main

    code = main(["train", "generator", "--tokens", tokens["a"][0], "--tokenizer", tokens["b"][1],
                 "--out", str(tmp_path / "gen"), "--recipe", "tiny",
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "made by tokenizer" in err[0]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", "generator", "--tokens", tokens["a"][0], "--tokenizer", tokens["a"][1],
                 "--out", str(blocker / "gen"), "--recipe", "tiny",
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write there" in err[0]


def test_a_bad_ecg_encoder_checkpoint_is_refused_before_training(tokens, tmp_path, capsys):
    import torch

    from echopulse.cli import main

    base = ["train", "generator", "--tokens", tokens["a"][0], "--tokenizer", tokens["a"][1],
            "--out", str(tmp_path / "gen"), "--recipe", "tiny",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    code = main(base + ["--ecg-checkpoint", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.pth" in err[0]
    wrong = tmp_path / "encoder.pth"  # an ST-MEM-like file of another size than the tiny encoder
    torch.save({"model": {"to_patch_embedding.1.weight": torch.zeros(384, 75)}}, wrong)
    code = main(base + ["--ecg-checkpoint", str(wrong), "--freeze-ecg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ECG encoder checkpoint" in err[0]
    assert not (tmp_path / "gen" / "checkpoint").exists()
