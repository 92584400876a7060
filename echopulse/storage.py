"""Local paths and remote URIs (``s3://…``) through one fsspec-based surface.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the usual AWS variables;
the CLI's ``--s3-endpoint`` sets the first), so a loopback S3-protocol server works the same as AWS.
Credentials come from the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import pyarrow.fs as pafs

from echopulse.errors import EchoPulseError


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _storage_options(uri: str) -> dict:
    if str(uri).startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **_storage_options(str(uri)))
    except (ImportError, ValueError) as exc:
        raise EchoPulseError(f"{uri}: unsupported storage URI ({exc})") from exc
    return fs, path


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """A pyarrow filesystem (for Ray Data / Ray Train) and path; ``None`` for local paths."""
    if not is_remote(uri):
        return None, str(Path(uri).resolve())
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(str(uri), *parts)
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else str(Path(path).parent)
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory's files to ``uri`` (replacing what is there)."""
    if not is_remote(uri):
        target = Path(uri)
        if target.resolve() != Path(local_dir).resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(local_dir, target)
        return
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(str(local_dir).rstrip("/") + "/", path, recursive=True)


def local_copy(uri: str, cache_dir: str) -> str:
    """A local directory holding ``uri``'s files: ``uri`` itself when local, else a download."""
    if not is_remote(uri):
        if not Path(uri).exists():
            raise EchoPulseError(f"{uri}: no such file or directory")
        return str(uri)
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise EchoPulseError(f"{uri}: not found")
    dest = Path(cache_dir)
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return str(dest)


AWS_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def aws_env() -> dict[str, str]:
    """The AWS variables set in this process (for Ray workers on a cluster that lacks them)."""
    return {k: os.environ[k] for k in AWS_ENV_VARS if os.environ.get(k)}


def parent(uri: str) -> str:
    """The folder holding ``uri`` (a URI stays a URI; a local path becomes absolute)."""
    if is_remote(uri):
        return str(uri).rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri).resolve().parent)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def local_path(uri: str | Path, companions: Sequence[str] = ()) -> Iterator[Path]:
    """A local path for ``uri``: itself when local, else a download into a temporary folder.

    Readers that need real files (pydicom's deferred reads, WFDB's header + signal files, ffmpeg)
    use this, so every reader takes ``s3://`` as well as a path. The download is removed on exit.

    Args:
        uri: a local path or a remote URI.
        companions: names of sibling files to fetch too (a WFDB record's ``.dat`` files); missing
            companions are skipped (the reader reports them).
    """
    if not is_remote(str(uri)):
        yield Path(uri)
        return
    fs, path = filesystem(str(uri))
    with tempfile.TemporaryDirectory(prefix="echopulse-") as tmp:
        name = posixpath.basename(path)
        target = Path(tmp) / name
        if fs.exists(path):
            fs.get(path, str(target))
        for companion in companions:
            sibling = posixpath.join(posixpath.dirname(path), companion)
            if posixpath.basename(companion) == companion and fs.exists(sibling):
                fs.get(sibling, str(Path(tmp) / companion))
        yield target


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def train_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's ``(storage_path, storage_filesystem)`` for a run directory ``uri``.

    A local path stays a path (no filesystem). ``s3://bucket/prefix`` becomes ``bucket/prefix``
    and a pyarrow ``S3FileSystem`` built from this process's endpoint and credentials
    (:func:`s3_endpoint`, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
    region), so Ray's controller and workers reach the same server even when they were started
    without those variables. Without explicit keys pyarrow uses its default chain (instance roles).
    Other remote schemes go through fsspec (:func:`arrow_filesystem`).
    """
    if not is_remote(uri):
        return str(Path(uri).resolve()), None
    if not str(uri).startswith("s3://"):
        fs, path = arrow_filesystem(uri)
        return path, fs
    options: dict = {}
    endpoint = s3_endpoint()
    if endpoint:
        options["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            options["scheme"] = "http"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                       secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return str(uri)[len("s3://"):].rstrip("/"), pafs.S3FileSystem(**options)


def check_writable(uri: str) -> None:
    """Raise :class:`EchoPulseError` unless a file can be created (and removed) under ``uri``.

    Writes and deletes a small probe file, so a read-only directory, a missing bucket or
    refused credentials fail here in one line rather than after training.
    """
    import uuid

    probe = join(str(uri), f".echopulse-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = filesystem(probe)
        if not is_remote(uri):  # object stores have no folders (and s3fs's makedirs makes buckets)
            fs.makedirs(str(Path(path).parent), exist_ok=True)
        with fs.open(path, "w") as f:
            f.write("probe\n")
        fs.rm(path)
    except Exception as exc:  # OSError locally; botocore/s3fs errors are not OSErrors
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise EchoPulseError(f"{uri}: cannot write there ({type(exc).__name__}: {detail})") from exc
