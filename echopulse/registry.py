"""Generators in the MLflow Model Registry: log, register, alias, and load by ``models:/`` URI.

A logged generator is an MLflow ``python_function`` model whose loader is this module
(``loader_module="echopulse.registry"``) and whose data is the checkpoint directory itself
(safetensors weights, ``config.json``, the bundled ``tokenizer/``). Loading it never unpickles
anything: MLflow imports this (installed) module and calls :func:`_load_pyfunc`, which reads the
weights with safetensors. A ``python_model`` object would instead be a cloudpickle from the store.

Every command that takes ``--checkpoint`` accepts, besides a directory or URI of a checkpoint,
``models:/NAME@alias``, ``models:/NAME/VERSION`` and ``runs:/RUN_ID/model``:
:func:`echopulse.model_uri.local_checkpoint` is the one resolver.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any

import numpy as np

from echopulse.errors import EchoPulseError
from echopulse.model_uri import checkpoint_in, is_model_uri, local_checkpoint, mlflow_error

__all__ = ["checkpoint_in", "is_model_uri", "local_checkpoint", "log_generator_model", "register_model",
           "set_alias", "register_checkpoint", "publish_training_run"]

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # where a generator model is logged in its run
DEFAULT_ECG_FS = 500.0
# what a logged model needs to load and run; pinned to the versions it was logged with
MODEL_REQUIREMENTS = ("mlflow", "torch", "numpy", "scipy", "safetensors", "einops", "pydicom",
                      "wfdb", "pillow", "imageio", "imageio-ffmpeg")


# ---- the pyfunc model ----------------------------------------------------------------------


class GeneratorPyfunc:
    """What ``mlflow.pyfunc.load_model`` returns the inside of: ECG arrays in, frames out.

    ``predict(model_input, params)``: ``model_input`` is a float array (12, L) or (B, 12, L) of
    12-lead ECGs in mV in the standard order (I, II, III, aVR, aVL, aVF, V1-V6; zero rows for
    missing leads) at ``params["ecg_fs"]`` Hz, or a dict ``{"ecg": array}``. Each ECG is prepared
    exactly like an ECG file (resampled, filtered, standardized) and generated from with
    :meth:`~echopulse.generate.EchoGenerator.generate`. Returns uint8 frames (B, T, H, W).
    """

    def __init__(self, model) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        from echopulse.config import ECG_LEADS
        from echopulse.transforms.ecg import ECGError, prepare_ecg

        params = dict(params or {})
        if isinstance(model_input, dict):
            model_input = model_input["ecg"]
        ecgs = np.asarray(model_input, dtype=np.float32)
        if ecgs.ndim == 2:
            ecgs = ecgs[None]
        if ecgs.ndim != 3 or ecgs.shape[1] != 12:
            raise EchoPulseError(f"expected ECGs of shape (12, L) or (B, 12, L), got {ecgs.shape}")
        fs = float(params.get("ecg_fs") or DEFAULT_ECG_FS)
        options = {k: params.get(k) for k in ("seconds", "fps", "steps", "guidance", "temperature")}
        options = {k: v for k, v in options.items() if v is not None and v != -1}
        seed = int(params.get("seed") or 0)
        videos = []
        for i, ecg in enumerate(ecgs):
            try:
                prepared = prepare_ecg(ecg, fs, list(ECG_LEADS))
            except ECGError as exc:
                raise EchoPulseError(f"ECG {i}: {exc}") from None
            videos.append(self.model.generate(prepared, seed=seed, **options))
        return np.stack(videos)


def _load_pyfunc(data_path: str) -> GeneratorPyfunc:
    """MLflow's entry point for ``loader_module`` models: the checkpoint directory -> the model."""
    from echopulse.generate import EchoGenerator

    return GeneratorPyfunc(EchoGenerator.from_checkpoint(data_path))


def model_signature():
    """Input: ECGs (B, 12, L) float32; params: sampling and video options; output: frames."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 12, -1), "ecg")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1), "frames")]),
        params=ParamSchema([
            ParamSpec("ecg_fs", "double", DEFAULT_ECG_FS),
            ParamSpec("seconds", "double", -1.0),  # -1: the checkpoint's default
            ParamSpec("fps", "double", -1.0),
            ParamSpec("seed", "long", 0),
            ParamSpec("steps", "long", -1),
            ParamSpec("guidance", "double", -1.0),
        ]),
    )


def pinned_requirements() -> list[str]:
    """``name==version`` of what the model needs, as installed here (local version labels such
    as ``+cpu`` dropped, so a CUDA build of the same torch satisfies it)."""
    from importlib.metadata import PackageNotFoundError, version

    from echopulse import __version__

    pins = [f"echopulse=={__version__}"]
    for name in MODEL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            log.warning("%s is not installed; left out of the model's requirements", name)
    return pins


def log_generator_model(checkpoint: str, tracking_uri: str, run_id: str,
                        artifact_path: str = MODEL_ARTIFACT) -> str:
    """Log a generator checkpoint (tokenizer bundled) as a pyfunc model of run ``run_id``.

    Returns:
        The model's ``runs:/RUN_ID/ARTIFACT_PATH`` URI.

    Raises:
        EchoPulseError: not a generator checkpoint, or its tokenizer is missing or another one.
    """
    import mlflow.pyfunc

    from echopulse.generate import EchoGenerator
    from echopulse.tracking import client_for

    with tempfile.TemporaryDirectory() as tmp:
        local = local_checkpoint(checkpoint, os.path.join(tmp, "download"), tracking_uri)
        model = EchoGenerator.from_checkpoint(local)  # refuses anything that would not load
        extra = model.info.get("extra", {})
        metadata = {"model_id": model.info.get("model_id"), "tokenizer_id": extra.get("tokenizer_id"),
                    "clip": extra.get("clip"), "checkpoint": str(checkpoint)}
        path = os.path.join(tmp, "model")
        with warnings.catch_warnings():  # "no input example": the signature says it all
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(path, loader_module=__name__, data_path=local,
                                     signature=model_signature(),
                                     pip_requirements=pinned_requirements(), metadata=metadata)
        client_for(tracking_uri).log_artifacts(run_id, path, artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def register_model(tracking_uri: str, run_id: str, name: str,
                   artifact_path: str = MODEL_ARTIFACT, description: str | None = None) -> str:
    """Register the model logged at ``runs:/RUN_ID/ARTIFACT_PATH`` as a new version of ``name``.

    Returns:
        The new version (a string, as MLflow gives it).
    """
    from mlflow.exceptions import MlflowException

    from echopulse.tracking import client_for

    client = client_for(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="ECG-conditioned echo video generator "
                                                         "(EchoPulse)")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        version = client.create_model_version(name, source, run_id=run_id, description=description,
                                              tags={"echopulse.model_uri": f"runs:/{run_id}/{artifact_path}"})
    except MlflowException as exc:
        raise mlflow_error(f"models:/{name}", exc) from None
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def set_alias(tracking_uri: str, name: str, version: str, alias: str) -> None:
    """Point ``models:/NAME@ALIAS`` at ``version`` (moving it from any other version)."""
    from mlflow.exceptions import MlflowException

    from echopulse.tracking import client_for

    client = client_for(tracking_uri)
    try:
        client.get_model_version(name, str(version))
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise mlflow_error(f"models:/{name}/{version}", exc) from None


def register_checkpoint(checkpoint: str, name: str, tracking_uri: str, run_id: str | None = None,
                        alias: str | None = None) -> dict[str, str]:
    """``echopulse register``: log ``checkpoint`` as a model (in ``run_id``, else a new run that
    records where it came from) and register a version of ``name``; optionally alias it."""
    from echopulse.tracking import create_run, end_run

    own_run = run_id is None
    if own_run:
        run_id = create_run(tracking_uri, f"register-{name}", {"checkpoint": str(checkpoint)},
                            tags={"echopulse.stage": "register", "checkpoint_uri": str(checkpoint)})
    try:
        model_uri = log_generator_model(checkpoint, tracking_uri, run_id)
        version = register_model(tracking_uri, run_id, name)
        if alias:
            set_alias(tracking_uri, name, version, alias)
    except BaseException:
        if own_run:
            end_run(tracking_uri, run_id, "FAILED")
        raise
    if own_run:
        end_run(tracking_uri, run_id)
    out = {"name": name, "version": version, "run_id": run_id, "model_uri": model_uri,
           "registered_uri": f"models:/{name}/{version}"}
    if alias:
        out["alias_uri"] = f"models:/{name}@{alias}"
    return out


def publish_training_run(tracking_uri: str, run_id: str | None, result, checkpoint: str,
                         kind: str = "generator", register: str | None = None) -> dict[str, str]:
    """What a finished training run records besides its metrics: the loss curves (``log_figure``),
    and the exported checkpoint as an artifact of the run, a pyfunc model for a generator
    (``runs:/RUN_ID/model``, registered as a new version of ``register`` when given) and the plain
    checkpoint directory for a tokenizer (``checkpoint/``)."""
    from echopulse.tracking import client_for, log_training_figure

    if not run_id:
        return {}
    out: dict[str, str] = {}
    try:
        figure = log_training_figure(tracking_uri, run_id, getattr(result, "metrics_dataframe", None), kind)
        if figure:
            out["figure"] = figure
    except Exception as exc:  # a figure is a nicety: never fail a finished training for it
        log.warning("no training figure for run %s: %s", run_id, exc)
    if kind == "generator":
        out["model_uri"] = log_generator_model(checkpoint, tracking_uri, run_id)
        if register:
            out["version"] = register_model(tracking_uri, run_id, register)
            out["registered_uri"] = f"models:/{register}/{out['version']}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            client_for(tracking_uri).log_artifacts(run_id, local_checkpoint(checkpoint, tmp),
                                                   "checkpoint")
    return out
