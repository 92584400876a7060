"""Ray Jobs: submit an ``echopulse`` command to a cluster's job server, follow it, list/stop jobs.

The job server is the Ray dashboard's HTTP API (``http://HEAD:8265``; it needs ``ray[default]`` on
the head). Ray 2.59+ turns on token authentication for local clusters, and the job API has no
other authentication: every request carries ``Authorization: Bearer <token>``, found the way Ray
itself looks for it (``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``).

The job runs ``python -m echopulse.cli ARGS`` in the cluster's Python, with a runtime env made of
the working directory (uploaded; the code version you submit is the code that runs), optional pip
requirements or an image, and a short, named list of settings copied from this environment
(MLflow and S3 settings, the study salt). Nothing else from the local environment is sent.

Every wait is bounded: the connection probe, each HTTP request, and (with ``timeout``) the job.
Ray is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlparse

from echopulse.errors import EchoPulseError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: seconds for connecting to the job server and for each HTTP request to it
REQUEST_TIMEOUT_S = 30.0

#: Settings a job needs from the submitter's environment, copied by name when set (never the
#: whole environment). ``--env NAME[=VALUE]`` adds others.
PASSTHROUGH_ENV: tuple[str, ...] = (
    # MLflow
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    # S3 (on AWS prefer an instance role: then none of the credentials is set or sent)
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    # EchoPulse
    "ECHOPULSE_STUDY_SALT", "ECHOPULSE_LOG_LEVEL", "ECHOPULSE_WORKER_LOGS", "ECHOPULSE_SHARD_CACHE_MB",
)

#: Never uploaded with the working directory (virtualenvs, outputs, VCS, local stores).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv", "venv", ".git", "demo", "*.db", "mlruns", "__pycache__", ".pytest_cache",
    "*.egg-info", "bench/results", "build",
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_TIMEOUT = 124


class SubmitError(EchoPulseError):
    """The job server cannot be used as asked: unreachable, no token, a bad working dir or job id."""


@dataclass(frozen=True)
class JobResult:
    """How a job ended, and the exit status ``echopulse submit`` returns for it."""

    submission_id: str
    status: str
    exit_code: int
    message: str = ""
    timed_out: bool = False


# ---------------------------------------------------------------------------------------------
# token and address


def find_auth_token(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The cluster token and where it came from, in Ray's own order of precedence.

    Returns ``(token, source)``; ``token`` is ``None`` when none is set (``source`` then lists
    the places looked at). A ``RAY_AUTH_TOKEN_PATH`` that cannot be read is an error, as in Ray.
    """
    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_value = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_value:
        path = Path(path_value).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token "
                              f"({exc.strerror or exc})") from exc
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    try:
        token = default.read_text().strip()
    except OSError:
        token = ""
    if token:
        return token, str(default)
    return None, f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, {default}"


def _missing_token_message(address: str, looked: str) -> str:
    return (f"the Ray job server at {address} requires a token and none was found (looked at "
            f"{looked}); on the head run `ray get-auth-token` and export RAY_AUTH_TOKEN, or copy "
            f"the head's ~/.ray/auth_token and point RAY_AUTH_TOKEN_PATH at it")


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The job server's HTTP address: ``--address``, ``RAY_API_SERVER_ADDRESS``, an ``http(s)://``
    ``RAY_ADDRESS``, or ``http://127.0.0.1:8265``. A bare ``host:port`` gets ``http://``."""
    env = os.environ if environ is None else environ
    if not address:
        address = env.get("RAY_API_SERVER_ADDRESS") or ""
        ray_address = env.get("RAY_ADDRESS", "")
        if not address and ray_address.startswith(("http://", "https://")):
            address = ray_address
        address = address or DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise SubmitError(f"--address {address}: job submission uses the dashboard's HTTP address "
                          f"(e.g. http://HEAD:8265), not a Ray Client ray:// address")
    if "://" not in address:
        address = "http://" + address
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(f"--address {address}: expected http://HOST:PORT of the Ray job server")
    return address.rstrip("/")


def probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast, with one line, when nothing listens at ``address`` (bounded by ``timeout``)."""
    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except socket.timeout as exc:
        raise SubmitError(f"cannot reach the Ray job server at {address}: no answer within "
                          f"{timeout:.0f} s") from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SubmitError(f"cannot reach the Ray job server at {address} ({reason}); start a head "
                          f"with `cluster/local.sh start` or pass --address http://HEAD:8265") from exc


def _quiet_sdk_logs() -> None:
    """Ray's SDK logs every packaging step at INFO; keep them for ``--debug``."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str | None = None, timeout: float = REQUEST_TIMEOUT_S,
            environ: Mapping[str, str] | None = None):
    """A ``JobSubmissionClient`` for the job server, authenticated with the cluster token.

    Raises:
        SubmitError: the server is unreachable, needs a token that is missing, or rejects it.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_sdk_logs()
    address = resolve_address(address, environ)
    probe(address, timeout=min(timeout, 10.0))
    token, source = find_auth_token(environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token:
        log.debug("Ray token from %s", source)
    try:
        client = JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        if token is None:
            raise SubmitError(_missing_token_message(address, source)) from exc
        raise SubmitError(f"the Ray job server at {address} rejected the token from {source}: "
                          f"it is not this cluster's token") from exc
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {exc}") from exc
    except RuntimeError as exc:  # version mismatch, HTTP errors while checking the version
        raise SubmitError(f"the Ray job server at {address} is not usable: {exc}") from exc
    # The SDK sends requests without a timeout; bound each one (keyword arguments of
    # ``_do_request`` are passed on to ``requests.request``).
    do_request = getattr(client, "_do_request", None)
    if callable(do_request):
        client._do_request = functools.partial(do_request, timeout=timeout)
    return client


# ---------------------------------------------------------------------------------------------
# runtime env and entrypoint


def parse_env(items: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--env NAME=VALUE`` or ``--env NAME`` (copied from this environment; must be set)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name or not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise SubmitError(f"--env {item}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in env:
                raise SubmitError(f"--env {name}: not set in this environment")
            value = env[name]
        out[name] = value
    return out


def passthrough_env(environ: Mapping[str, str] | None = None,
                    names: Iterable[str] = PASSTHROUGH_ENV) -> dict[str, str]:
    """The named settings that are set here (only those; never the whole environment)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in names if env.get(name)}


def load_runtime_env_file(path: str | os.PathLike) -> dict[str, Any]:
    """A Ray runtime env YAML (``cluster/runtime_env.yaml``) as a dict."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SubmitError(f"--runtime-env {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SubmitError(f"--runtime-env {p}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {p}: expected a mapping of runtime env fields")
    return data


def build_runtime_env(
    working_dir: str | os.PathLike | None = ".",
    env_vars: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    image_uri: str | None = None,
    excludes: Iterable[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The job's runtime env: ``base`` (a runtime env file) + working dir + excludes + env vars.

    A relative ``working_dir`` in ``base`` and a ``pip`` requirements-file path are resolved
    against ``working_dir``. ``working_dir=None`` sends no code (the cluster's installed
    ``echopulse`` runs).
    """
    runtime_env: dict[str, Any] = dict(base or {})
    runtime_env.pop("working_dir", None)  # the flag decides; the file's "." means "this checkout"
    if working_dir is not None:
        wd = Path(working_dir).expanduser()
        if not wd.exists():
            raise SubmitError(f"--working-dir {wd}: no such directory")
        if not wd.is_dir():
            raise SubmitError(f"--working-dir {wd}: not a directory")
        wd = wd.resolve()
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = sorted(set(runtime_env.get("excludes") or []) | set(excludes))
        if not (wd / "echopulse" / "cli.py").is_file():
            log.debug("%s has no echopulse/ package: the cluster's installed echopulse will run", wd)
        pip = runtime_env.get("pip")
        if isinstance(pip, str) and not Path(pip).is_absolute():
            runtime_env["pip"] = str(wd / pip)
    if isinstance(runtime_env.get("pip"), str) and not Path(runtime_env["pip"]).is_file():
        raise SubmitError(f"runtime env pip requirements {runtime_env['pip']}: no such file")
    if image_uri:
        runtime_env["image_uri"] = image_uri
    merged = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    merged.update(env_vars or {})
    if merged:
        runtime_env["env_vars"] = merged
    else:
        runtime_env.pop("env_vars", None)
    return runtime_env


def entrypoint_for(argv: list[str], python: str = "python") -> str:
    """The shell command the job runs: ``python -m echopulse.cli ARGS`` (quoted)."""
    if not argv:
        raise SubmitError("nothing to submit: give an echopulse command after --, e.g. "
                          "`echopulse submit -- ingest --manifest m.csv --out s3://b/clips`")
    return " ".join([shlex.quote(python), "-m", "echopulse.cli", shlex.join(argv)])


# ---------------------------------------------------------------------------------------------
# submitting and following


def submit_job(client, entrypoint: str, runtime_env: Mapping[str, Any],
               submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
               entrypoint_num_gpus: float | None = None, metadata: Mapping[str, str] | None = None) -> str:
    """Submit and return the submission id (the working dir is zipped and uploaded first)."""
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=dict(runtime_env),
                                 submission_id=submission_id,
                                 entrypoint_num_cpus=entrypoint_num_cpus,
                                 entrypoint_num_gpus=entrypoint_num_gpus,
                                 metadata=dict(metadata or {}))
    except (ValueError, RuntimeError) as exc:
        raise SubmitError(f"the job server refused the job: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def job_info(client, submission_id: str):
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise SubmitError(f"no job {submission_id} on this cluster") from exc
        raise


def exit_code_for(info) -> int:
    """The exit status for a finished job: 0 on success, the driver's own exit code on failure
    (``echopulse`` uses 1 for a failed run and 2 for bad input), 1 when it has none (e.g. the
    runtime env could not be set up), 128+N when the driver died of signal N."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if isinstance(code, int) and code > 0:
        return code
    if isinstance(code, int) and code < 0:
        return 128 - code
    return 1


async def _stream(client, submission_id: str, on_output: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        on_output(chunk)


def follow(client, submission_id: str, on_output: Callable[[str], None] | None = None,
           timeout: float | None = None, poll_s: float = 1.0,
           stop_on_timeout: bool = True) -> JobResult:
    """Stream the job's logs until it ends and return how it ended.

    Args:
        on_output: called with each chunk of the driver's output (the CLI writes it to stdout).
        timeout: seconds to wait for the job to end; then it is stopped (``stop_on_timeout``)
            and the result says ``timed_out`` with exit code 124. ``None`` waits for the job.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    sink = on_output or (lambda chunk: log.info("%s", chunk.rstrip()))
    streamed = False
    try:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.01)
        asyncio.run(asyncio.wait_for(_stream(client, submission_id, sink), remaining))
        streamed = True
    except asyncio.TimeoutError:
        pass
    except Exception as exc:  # the log stream broke; fall back to polling the status
        log.warning("log stream for %s ended early (%s); polling its status", submission_id,
                    _first_line(exc))
    # the stream ends when the job does; the status can lag by a moment
    while True:
        info = job_info(client, submission_id)
        status = str(info.status)
        if status in TERMINAL:
            if not streamed and on_output is not None:
                try:
                    on_output(client.get_job_logs(submission_id))
                except Exception as exc:  # logs are a courtesy here; the status is the answer
                    log.warning("could not fetch the logs of %s: %s", submission_id, _first_line(exc))
            return JobResult(submission_id, status, exit_code_for(info), info.message or "")
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(poll_s if deadline is None else min(poll_s, max(deadline - time.monotonic(), 0)))
    message = f"still {status} after {timeout:.0f} s"
    if stop_on_timeout:
        stop_job(client, submission_id, wait_s=30.0)
        message += "; stopped"
    return JobResult(submission_id, status, EXIT_TIMEOUT, message, timed_out=True)


def stop_job(client, submission_id: str, wait_s: float = 30.0) -> str:
    """Ask the job to stop and wait (bounded) until it has; returns the final status."""
    job_info(client, submission_id)  # a clear error for an unknown id
    client.stop_job(submission_id)
    deadline = time.monotonic() + wait_s
    while True:
        status = str(job_info(client, submission_id).status)
        if status in TERMINAL or time.monotonic() >= deadline:
            return status
        time.sleep(0.5)


def list_jobs(client) -> list[dict[str, Any]]:
    """Every job the cluster knows, newest first, as plain dicts."""
    rows = []
    for job in client.list_jobs():
        rows.append({
            "submission_id": job.submission_id or job.job_id,
            "status": str(job.status),
            "start_time": job.start_time,
            "end_time": job.end_time,
            "exit_code": getattr(job, "driver_exit_code", None),
            "entrypoint": job.entrypoint,
        })
    rows.sort(key=lambda r: r["start_time"] or 0, reverse=True)
    return rows


def format_jobs(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_jobs` rows."""
    if not rows:
        return "no jobs"
    lines = [f"{'SUBMISSION ID':<30} {'STATUS':<10} {'EXIT':>4}  {'STARTED':<19}  ENTRYPOINT"]
    for r in rows:
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"] / 1000))
                   if r["start_time"] else "-")
        code = "-" if r["exit_code"] is None else str(r["exit_code"])
        entry = r["entrypoint"] or ""
        entry = entry if len(entry) <= 80 else entry[:77] + "..."
        lines.append(f"{r['submission_id'] or '-':<30} {r['status']:<10} {code:>4}  {started:<19}  {entry}")
    return "\n".join(lines)


def job_logs(client, submission_id: str) -> str:
    """Everything the job's driver has written so far."""
    job_info(client, submission_id)
    return client.get_job_logs(submission_id)
