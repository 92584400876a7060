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
    from echopulse.models.checkpoint import load_checkpoint
    from jobs.train_tokenizer import train_tokenizer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "tokenizer"
    train = replace(tiny().tokenizer_train, steps=10, log_every=5, checkpoint_every=5)
    first = train_tokenizer(str(clips), str(out), replace(tiny(), tokenizer_train=train), uri)
    assert _logged_steps(uri, first.run_id) == [5, 10]

    # the same command with more steps continues at step 10; a crash at step 17 restarts the
    # worker group from the step-15 checkpoint of this run (not from step 10, not from scratch)
    monkeypatch.setenv(FAIL_ENV, "17")
    longer = replace(train, steps=20)
    second = train_tokenizer(str(clips), str(out), replace(tiny(), tokenizer_train=longer), uri)
    assert _logged_steps(uri, second.run_id) == [15, 20]
    markers = list((out / "ray").glob("*/fail_once.marker"))
    assert len(markers) == 1, "the injected failure did not happen"
    assert second.metrics["step"] == 20
    model, _, _ = load_checkpoint(second.checkpoint, expected_kind="tokenizer")
    assert model is not None
    assert not (out / "checkpoint" / "optimizer.pt").exists()  # the export is the model only


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
