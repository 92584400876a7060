"""Fixtures for generation and evaluation: a phantom corpus, a clips/v1 dataset made from it, and a
tiny generator checkpoint (tokenizer bundled) trained in-process in a few seconds. No Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from echopulse.config import to_dict


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Two phantom studies (4 s): DICOM echoes, WFDB ECGs, manifest.csv."""
    from echopulse.synth.phantom import write_corpus

    out = tmp_path_factory.mktemp("synth")
    write_corpus(out, studies=2, seed=11, duration_s=4.0)
    return out


@pytest.fixture(scope="session")
def clips_dataset(tmp_path_factory, corpus) -> Path:
    """A clips/v1 dataset of the corpus with the tiny recipe's clip geometry (every split = val)."""
    import csv

    import pyarrow.parquet as pq

    from echopulse.ingest import make_ingest_fn
    from echopulse.schema import CLIPS_SCHEMA
    from jobs.recipes import tiny
    from echopulse.schema import write_dataset_info
    from pipelines.ingest import clips_to_table

    clip = tiny().clip
    ingest = make_ingest_fn(clip, str(corpus))
    with open(corpus / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    clips = [c for row in rows for c in ingest({**row, "split": "val"})]
    out = tmp_path_factory.mktemp("clips")
    (out / "clips").mkdir()
    pq.write_table(clips_to_table(clips, clip), out / "clips" / "part-0.parquet")
    write_dataset_info(str(out), CLIPS_SCHEMA, {"clip": to_dict(clip)}, {"clips": len(clips)})
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, clips_dataset) -> Path:
    """A tiny generator checkpoint with its tokenizer bundled, trained on the phantom clips:
    tokenizer 40 steps, generator 40 steps (a few seconds on 2 cores)."""
    import pyarrow.parquet as pq

    from echopulse.models.checkpoint import save_checkpoint
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.schema import tensor_column_to_numpy
    from echopulse.training.steps import generator_train_step, make_optimizer, tokenizer_train_step
    from jobs.recipes import tiny

    recipe = tiny()
    table = pq.read_table(clips_dataset / "clips" / "part-0.parquet")
    frames = torch.as_tensor(np.array(tensor_column_to_numpy(table.column("frames"))))
    ecg = torch.as_tensor(np.array(tensor_column_to_numpy(table.column("ecg"))))
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(recipe.tokenizer)
    optimizer = make_optimizer(tokenizer, lr=3e-3)
    for _ in range(40):
        tokenizer_train_step(tokenizer, {"frames": frames}, optimizer)
    tokenizer.eval()
    with torch.no_grad():
        tokens = tokenizer.encode(frames)
    generator = MaskGIT(recipe.generator)
    optimizer = make_optimizer(generator, lr=2e-3)
    for _ in range(40):
        generator_train_step(generator, {"tokens": tokens, "ecg": ecg}, optimizer)

    root = tmp_path_factory.mktemp("generator")
    tok_dir = root / "tokenizer"
    tok_id = save_checkpoint(tokenizer, recipe.tokenizer, tok_dir, "tokenizer")
    ckpt = root / "checkpoint"
    save_checkpoint(generator, recipe.generator, ckpt, "generator",
                    extra={"clip": to_dict(recipe.clip), "sampling": to_dict(recipe.sampling),
                           "tokenizer_id": tok_id})
    shutil.copytree(tok_dir, ckpt / "tokenizer")
    assert json.loads((ckpt / "config.json").read_text())["kind"] == "generator"
    return ckpt


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
    import echopulse

    return echopulse.load(str(tiny_checkpoint))
