"""The one resolver of ``--checkpoint``: a checkpoint directory or URI, or an MLflow model URI.

``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and ``runs:/RUN_ID/model`` are downloaded from
the MLflow store; the checkpoint directory inside the model (its pyfunc data) is what loads. Kept
apart from :mod:`echopulse.registry` so that :mod:`echopulse.generate` can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from echopulse import storage
from echopulse.errors import EchoPulseError

MODEL_SCHEMES = ("models:/", "runs:/")
LOADER_MODULE = "echopulse.registry"  # the pyfunc loader of every EchoPulse generator model


def is_model_uri(uri: Any) -> bool:
    """Whether ``uri`` names an MLflow model (``models:/…``, ``runs:/…``) rather than a checkpoint."""
    return isinstance(uri, str) and uri.startswith(MODEL_SCHEMES)


def mlflow_error(uri: str, exc: Exception) -> EchoPulseError:
    message = getattr(exc, "message", None) or str(exc)
    return EchoPulseError(f"{uri}: {message.strip().splitlines()[0] if message.strip() else type(exc).__name__}")


def checkpoint_in(local: str | os.PathLike, uri: str) -> str:
    """The checkpoint directory inside a downloaded MLflow model (or the directory itself)."""
    local = Path(local)
    if (local / "MLmodel").is_file():
        from mlflow.models import Model

        flavor = Model.load(str(local)).flavors.get("python_function", {})
        if flavor.get("loader_module") != LOADER_MODULE or "data" not in flavor:
            raise EchoPulseError(f"{uri}: not an EchoPulse generator model (its pyfunc loader is "
                                 f"{flavor.get('loader_module')!r})")
        return str(local / flavor["data"])
    if (local / "config.json").is_file():
        return str(local)
    raise EchoPulseError(f"{uri}: neither an MLflow model (no MLmodel) nor a checkpoint (no config.json)")


def local_checkpoint(checkpoint: str, dest: str, tracking_uri: str | None = None) -> str:
    """A local directory holding the checkpoint ``checkpoint`` names (downloaded into ``dest``).

    Args:
        checkpoint: a checkpoint directory or URI (``s3://…``), an MLflow model URI
            (``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``), or the
            ``runs:/`` URI of a checkpoint logged as a plain artifact.
        dest: an existing directory to download into.
        tracking_uri: MLflow tracking/registry URI (default: ``MLFLOW_TRACKING_URI``, else
            ``./mlflow.db``).

    Raises:
        EchoPulseError: an unknown model, alias or run, or something that is not a generator.
    """
    if not is_model_uri(checkpoint):
        return storage.local_copy(checkpoint, dest)
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from echopulse.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(None, tracking_uri)
    try:
        local = download_artifacts(artifact_uri=checkpoint, dst_path=dest, tracking_uri=uri,
                                   registry_uri=uri)
    except MlflowException as exc:
        raise mlflow_error(checkpoint, exc) from None
    except OSError as exc:  # e.g. a runs:/ path that the run does not have
        raise EchoPulseError(f"{checkpoint}: cannot download ({exc})") from None
    return checkpoint_in(local, checkpoint)
