"""Generators in a real MLflow Model Registry (``mlflow server`` on loopback): register, alias,
load by ``models:/`` and ``runs:/`` URI, and the pyfunc model itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from echopulse.cli import EXIT_BAD_INPUT, EXIT_OK, main

pytestmark = pytest.mark.integration

NAME = "echo-gen-test"


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    # MLflow prints "View run ..." links to stdout when a run on a server ends; the JSON follows
    return code, out.out[out.out.find("{"):] if "{" in out.out else out.out, out.err


def test_register_promote_and_generate_from_the_alias(mlflow_server, tiny_checkpoint, corpus,
                                                       tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    import pydicom

    # the CLI exports the store of a models:/ checkpoint for its Ray workers: restore it afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    store = ["--tracking-uri", mlflow_server]
    code, out, err = _run(capsys, ["register", str(tiny_checkpoint), NAME, "--alias", "candidate", *store])
    assert code == EXIT_OK, err
    first = json.loads(out)
    code, out, err = _run(capsys, ["register", str(tiny_checkpoint), NAME, *store])
    second = json.loads(out)
    assert (first["version"], second["version"]) == ("1", "2")
    assert _run(capsys, ["alias", NAME, "2", "champion", *store])[0] == EXIT_OK

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"
    assert client.get_model_version_by_alias(NAME, "candidate").version == "1"
    version = client.get_model_version(NAME, "2")
    assert version.run_id == second["run_id"]  # the version traces back to the run that logged it

    ecg = str(corpus / "ecg" / "study_0000.hea")
    videos = {}
    for key, ckpt in (("path", str(tiny_checkpoint)), ("champion", f"models:/{NAME}@champion"),
                      ("run", f"runs:/{first['run_id']}/model")):
        target = tmp_path / f"{key}.dcm"  # native size, lossless: the frames themselves
        code, out, err = _run(capsys, ["generate", "--checkpoint", ckpt, "--ecg", ecg, "--out",
                                       str(target), "--seed", "5", *store])
        assert code == EXIT_OK, err
        videos[key] = pydicom.dcmread(target).pixel_array
    assert videos["path"].ndim == 3 and videos["path"].std() > 0
    assert np.array_equal(videos["path"], videos["champion"])
    assert np.array_equal(videos["path"], videos["run"])

    # an alias nobody set, and a name nobody registered: one line, exit 2
    for bad in (f"models:/{NAME}@nobody", "models:/no-such-model/1"):
        code, out, err = _run(capsys, ["generate", "--checkpoint", bad, "--ecg", ecg, "--out",
                                       str(tmp_path / "x.dcm"), *store])
        assert code == EXIT_BAD_INPUT and bad.split("@")[0] in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.dcm").exists()


def test_pyfunc_model_loads_without_pickle_and_predicts_frames(mlflow_server, tiny_checkpoint,
                                                                model, corpus, monkeypatch):
    import mlflow.pyfunc

    from echopulse.io.ecg import read_ecg
    from echopulse.registry import register_checkpoint
    from echopulse.transforms.ecg import prepare_ecg

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    info = register_checkpoint(str(tiny_checkpoint), NAME + "-pyfunc", mlflow_server)
    loaded = mlflow.pyfunc.load_model(info["registered_uri"])
    meta = loaded.metadata
    assert meta.flavors["python_function"]["loader_module"] == "echopulse.registry"
    assert "python_model" not in meta.flavors["python_function"]  # nothing cloudpickled
    assert tuple(meta.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 12, -1)
    requirements = mlflow.pyfunc.get_model_dependencies(info["registered_uri"])
    pins = open(requirements).read().split()
    assert any(p.startswith("torch==") for p in pins) and any(p.startswith("echopulse==") for p in pins)

    signal, ecg_meta = read_ecg(str(corpus / "ecg" / "study_0000.hea"))
    from echopulse.config import ECG_LEADS
    from echopulse.transforms.ecg import to_twelve_leads

    twelve, _ = to_twelve_leads(signal.astype(np.float32), ecg_meta["leads"])
    frames = loaded.predict(twelve[None].astype(np.float32),
                            params={"ecg_fs": float(ecg_meta["fs"]), "seed": 5})
    assert frames.dtype == np.uint8 and frames.shape == (1, model.clip.frames, model.size, model.size)
    expected = model.generate(prepare_ecg(twelve, ecg_meta["fs"], list(ECG_LEADS)), seed=5)
    assert np.array_equal(frames[0], expected)


def test_a_finished_training_run_publishes_its_figure_model_and_registered_version(mlflow_server,
                                                                                   tiny_checkpoint):
    """What ``train generator --register NAME`` does once Ray Train returns: the loss figure, the
    pyfunc model under the run and a new registered version pointing back at that run."""
    from types import SimpleNamespace

    import pandas as pd
    from mlflow import MlflowClient

    from echopulse.registry import publish_training_run
    from echopulse.tracking import create_run

    run_id = create_run(mlflow_server, "publish-test", {"kind": "generator"})
    steps = pd.DataFrame({"step": [10, 20, 30], "loss": [4.0, 3.1, 2.5]})
    out = publish_training_run(mlflow_server, run_id, SimpleNamespace(metrics_dataframe=steps),
                               str(tiny_checkpoint), register="echo-gen-from-training")
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version("echo-gen-from-training", out["version"])
    assert version.run_id == run_id and out["registered_uri"].endswith(f"/{out['version']}")
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "model" in artifacts and out.get("figure")
