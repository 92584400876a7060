"""Local paths and remote URIs (``s3://…``) through one fsspec-based surface.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the usual AWS variables),
so a loopback S3-protocol server works the same as AWS.
"""

from __future__ import annotations

import os
import posixpath
import shutil
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
