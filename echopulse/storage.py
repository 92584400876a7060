"""Local paths and remote URIs (``s3://…``) through one fsspec-based surface.

The S3 endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the usual AWS variables;
the CLI's ``--s3-endpoint`` sets the first), so a loopback S3-protocol server works the same as AWS.
Credentials come from botocore's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and ``~/.aws``, an instance role); nothing here handles keys.

A process holds one filesystem object per storage (and per endpoint and credentials in its
environment), made on first use and reused by every read, write and listing of a run. Object
stores have no folders: writing never creates a "directory" (nor, as s3fs's ``makedirs`` would, a
bucket), a small file is one PUT and a file above :data:`PART_MB` a multipart upload in parts of
that size; a failed write aborts its upload and raises :class:`OutputWriteError` naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import fsspec
import pyarrow.fs as pafs

from echopulse.errors import EchoPulseError, OutputWriteError

log = logging.getLogger(__name__)

MB = 1 << 20
PART_MB = 64.0  # multipart part size on object stores (S3 allows 5 MiB to 5 GiB, 10,000 parts)
OBJECT_STORES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://")
_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _storage_options(uri: str) -> dict:
    if str(uri).startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def is_object_store(uri: str) -> bool:
    return str(uri).startswith(OBJECT_STORES)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    One object per process, protocol, endpoint and AWS settings (reused by every call, so a run
    resolves its storage and credentials once; a changed ``AWS_*`` variable gets a new one).
    """
    uri = str(uri)
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    # per process: an fsspec async filesystem refuses use in a forked child (the isolated decoder)
    key = (os.getpid(), protocol, *(os.environ.get(k) for k in AWS_ENV_VARS)) if "::" not in uri else None
    fs = _FILESYSTEMS.get(key) if key else None
    if fs is None:
        try:
            fs, _ = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **_storage_options(uri))
        except (ImportError, ValueError) as exc:
            raise EchoPulseError(f"{uri}: unsupported storage URI ({exc})") from exc
        if key:
            _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(uri)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """A pyarrow filesystem (for Ray Data / Ray Train) and path; ``None`` for local paths.

    It travels to Ray's workers pickled, and Ray Data runs steps (its file listing) that take no
    ``runtime_env``: so on S3 it carries the AWS keys this process has in its environment, as
    :func:`aws_env` does for our tasks; without such variables the workers' own credential chain
    applies (profiles, instance roles).
    """
    if not is_remote(uri):
        return None, str(Path(uri).resolve())
    fs, path = filesystem(uri)
    if str(uri).startswith("s3://") and os.environ.get("AWS_ACCESS_KEY_ID"):
        opts = _storage_options(uri)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
        fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True, key=os.environ["AWS_ACCESS_KEY_ID"],
                                         secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                                         token=os.environ.get("AWS_SESSION_TOKEN"), **opts)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(str(uri), *parts)
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    """Create the folder ``uri`` (nothing on an object store: keys need no folders)."""
    if is_object_store(uri):
        return
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def writing(uri: str) -> Iterator[None]:
    """Turn a failed write under ``uri`` (refused, missing bucket, full disk) into :class:`OutputWriteError`."""
    try:
        yield
    except OSError as exc:  # s3fs turns S3's errors into OSErrors (PermissionError for AccessDenied)
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no detail"
        raise OutputWriteError(f"{uri}: cannot write ({type(exc).__name__}: {detail})") from exc


def open_output(uri: str, part_mb: float = PART_MB):
    """A binary file open for writing at ``uri`` (close it to finish; :func:`abort_output` on failure).

    On an object store the file uploads in parts of ``part_mb`` MiB as they fill (a multipart
    upload; one PUT if it stays smaller), so memory holds one part, not the file.
    """
    fs, path = filesystem(uri)
    with writing(uri):
        if not is_object_store(uri):
            fs.makedirs(parent(uri), exist_ok=True)
            return fs.open(path, "wb")
        return fs.open(path, "wb", block_size=max(5 * MB, int(part_mb * MB)))


def abort_output(f) -> None:
    """Drop a file :func:`open_output` gave that will not be finished (aborts a multipart upload)."""
    try:
        if hasattr(f, "discard"):
            f.discard()  # fsspec's buffered files: s3fs aborts the multipart upload
        else:
            f.close()
    except Exception:  # best effort: the write already failed; S3 lifecycle rules clear the rest
        log.debug("could not abort the upload of %s", getattr(f, "path", f), exc_info=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` in one request (a multipart upload above :data:`PART_MB`)."""
    fs, path = filesystem(uri)
    with writing(uri):
        if not is_object_store(uri):
            fs.makedirs(parent(uri), exist_ok=True)
        fs.pipe_file(path, data)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


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


AWS_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def aws_env() -> dict[str, str]:
    """The AWS variables set in this process (for Ray workers on a cluster that lacks them)."""
    return {k: os.environ[k] for k in AWS_ENV_VARS if os.environ.get(k)}


def aws_settings() -> dict[str, str]:
    """The AWS variables of this process that are not secret (endpoint, region, profile): what may
    travel in a Ray ``runtime_env``, which Ray prints (Ray Data's plan on failure, task listings)."""
    return {k: v for k, v in aws_env().items() if k not in AWS_SECRET_VARS}


class Credentials:
    """This process's AWS keys for Ray workers, never printed: ``repr`` names the variables only.

    Ray prints a stage's ``runtime_env`` and constructor arguments when a Ray Data run fails, so
    keys never go there; a task or actor gets this object (in its closure or arguments) and calls
    :meth:`apply` before touching storage. Workers of a cluster started elsewhere do not share the
    driver's environment.
    """

    def __init__(self, env: dict[str, str]) -> None:
        self._env = dict(env)

    @classmethod
    def from_env(cls) -> "Credentials | None":
        env = {k: v for k, v in aws_env().items() if k in AWS_SECRET_VARS}
        return cls(env) if env else None

    def apply(self) -> None:
        """Set the keys in this process (the storage helpers read them from the environment)."""
        os.environ.update(self._env)

    def __repr__(self) -> str:
        return f"Credentials({', '.join(sorted(self._env))}: hidden)"

    __str__ = __repr__


def apply_credentials(credentials: "Credentials | None") -> None:
    """:meth:`Credentials.apply` when there are any."""
    if credentials is not None:
        credentials.apply()


def parent(uri: str) -> str:
    """The folder holding ``uri`` (a URI stays a URI; a local path becomes absolute)."""
    if is_remote(uri):
        return str(uri).rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri).resolve().parent)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


class NotFound(FileNotFoundError):
    """:func:`local_path`'s file does not exist (raised on entering, before the body runs)."""


@contextlib.contextmanager
def local_path(uri: str | Path, companions: Sequence[str] | Callable[[Path], Sequence[str]] = ()
               ) -> Iterator[Path]:
    """A local path for ``uri``: itself when local, else a download into a temporary folder.

    Readers that need real files (pydicom's deferred reads, WFDB's header + signal files, ffmpeg)
    use this, so every reader takes ``s3://`` as well as a path. The download is removed on exit.
    A remote file costs one GET (no HEAD or listing first), each companion one more.

    Args:
        uri: a local path or a remote URI.
        companions: names of sibling files to fetch too (a WFDB record's ``.dat`` files), or a
            function of the downloaded file giving them; missing companions are skipped (the
            reader reports them).

    Raises:
        NotFound: ``uri`` does not exist.
    """
    if not is_remote(str(uri)):
        if not Path(uri).exists():
            raise NotFound(str(uri))
        yield Path(uri)
        return
    fs, path = filesystem(str(uri))
    with tempfile.TemporaryDirectory(prefix="echopulse-") as tmp:
        target = Path(tmp) / posixpath.basename(path)
        try:
            fs.get_file(path, str(target))
        except FileNotFoundError:
            raise NotFound(str(uri)) from None
        for companion in (companions(target) if callable(companions) else companions):
            if posixpath.basename(companion) != companion:  # a sibling, never a path elsewhere
                continue
            try:
                fs.get_file(posixpath.join(posixpath.dirname(path), companion), str(Path(tmp) / companion))
            except FileNotFoundError:
                pass
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
