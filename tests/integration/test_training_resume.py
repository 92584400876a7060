"""Training resumes: across commands into the same --out, and after a worker crash mid-run."""

from __future__ import annotations

import pytest

from echopulse.config import replace
from jobs.recipes import tiny
from jobs.train_common import FAIL_ENV

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ray_session):
    from echopulse.synth.phantom import write_corpus
    from pipelines.ingest import run_ingest

    work = tmp_path_factory.mktemp("resume-data")
    manifest = write_corpus(work / "synth", studies=2, seed=2, duration_s=2.5)
    run_ingest(str(manifest), str(work / "clips"), tiny().clip)
    return work / "clips"


def _logged_steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(int(m.step) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))


def test_resume_across_commands_and_after_a_crash(clips, tmp_path, monkeypatch):
    import json

    from mlflow import MlflowClient

    import jobs.train_tokenizer
    from echopulse.models.checkpoint import load_checkpoint
    from jobs.train_tokenizer import train_tokenizer

    # rank checkpoints by the earliest step, keeping 1: the best kept is then never the latest,
    # so resuming from the best instead of the latest would show in the logged steps
    monkeypatch.setattr(jobs.train_tokenizer, "SCORE", ("step", "min"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # undone after the test (mlflow exports it)
    out = tmp_path / "tokenizer"
    train = replace(tiny().tokenizer_train, steps=10, log_every=5, checkpoint_every=5,
                    keep_checkpoints=1, ema_decay=0.9)
    first = train_tokenizer(str(clips), str(out), replace(tiny(), tokenizer_train=train), uri)
    assert _logged_steps(uri, first.run_id) == [5, 10]

    # the same command with more steps continues at step 10 (the latest, not the best: step 5);
    # a crash at step 17 restarts the worker group from this run's step-16 checkpoint (the
    # latest; the best kept is step 12), so steps 12-16 are logged once
    monkeypatch.setenv(FAIL_ENV, "17")
    longer = replace(train, steps=20, log_every=2, checkpoint_every=2)
    second = train_tokenizer(str(clips), str(out), replace(tiny(), tokenizer_train=longer), uri)
    assert _logged_steps(uri, second.run_id) == [12, 14, 16, 18, 20]
    markers = list((out / "ray").glob("*/fail_once.marker"))
    assert len(markers) == 1, "the injected failure did not happen"
    assert second.metrics["step"] == 20
    model, _, _ = load_checkpoint(second.checkpoint, expected_kind="tokenizer")
    assert model is not None
    exported = {p.name for p in (out / "checkpoint").iterdir()}
    assert not exported & {"optimizer.pt", "train_state.json", "train_weights.safetensors"}

    # EMA: Ray's checkpoints hold the raw training weights beside the EMA model.safetensors
    run_dir = out / "ray" / MlflowClient(tracking_uri=uri).get_run(second.run_id).info.run_name
    kept = sorted(c for c in run_dir.glob("checkpoint_*") if c.is_dir())
    steps = sorted(json.loads((c / "train_state.json").read_text())["step"] for c in kept)
    assert steps == [12, 20]  # best K = 1 by the score, plus the latest
    assert all((c / "train_weights.safetensors").exists() for c in kept)

    # MLflow: validation metrics, the config, a reconstruction GIF, the checkpoint URIs
    client = MlflowClient(tracking_uri=uri)
    assert {"val_psnr", "val_ssim", "val_mse", "codebook_usage", "grad_norm", "lr",
            "samples_per_s"} <= set(client.get_run(second.run_id).data.metrics)
    assert sorted(int(m.step) for m in client.get_metric_history(second.run_id, "val_psnr")) == [
        12, 14, 16, 18, 20]
    artifacts = {a.path for d in ("config", "samples")
                 for a in client.list_artifacts(second.run_id, d)}
    assert "config/config.json" in artifacts and "samples/reconstruction_step0000020.gif" in artifacts
    tags = client.get_run(second.run_id).data.tags
    assert tags["checkpoint_uri"] == second.checkpoint
    assert tags["best_checkpoint_uri"].endswith(kept[0].name) and tags["best_checkpoint_step"] == "12"


def test_other_model_config_in_out_is_refused(clips, tmp_path):
    import torch

    from echopulse.errors import EchoPulseError
    from echopulse.models.checkpoint import save_checkpoint
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.training.state import save_train_state
    from jobs.train_tokenizer import train_tokenizer

    # an earlier run's checkpoint, laid out the way Ray Train stores them under OUT/ray/
    out = tmp_path / "tokenizer"
    earlier = out / "ray" / "tokenizer-earlier" / "checkpoint_000000"
    earlier.mkdir(parents=True)
    cfg = tiny().tokenizer
    model = VideoTokenizer(cfg)
    save_checkpoint(model, cfg, earlier, kind="tokenizer")
    save_train_state(str(earlier), torch.optim.AdamW(model.parameters()), step=5)

    wider = replace(tiny(), tokenizer=replace(cfg, dim=32))
    with pytest.raises(EchoPulseError, match="another model configuration"):
        train_tokenizer(str(clips), str(out), wider, f"sqlite:///{tmp_path}/mlflow.db")
