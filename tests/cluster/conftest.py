"""Real servers on loopback for the cluster tests: a Ray head started by ``cluster/local.sh``,
PostgreSQL (initdb/pg_ctl), an S3 server (moto) and the MLflow server of ``cluster/mlflow/``.

Every server is started with bounded waits and stopped in a finalizer, also when a test fails.
Nothing here touches a developer's own cluster: its own ports, token, state and temp dirs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
BIN = Path(sys.executable).parent
# settings that must never leak into these tests from the developer's shell
SCRUB_PREFIXES = ("RAY_", "MLFLOW_", "AWS_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB_PREFIXES)}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers (any HTTP status), the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM a server started in its own session, then SIGKILL its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class Cli:
    """Runs ``echopulse`` as a user would, in a controlled environment, with a deadline."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None,
                 cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "echopulse.cli", *args], cwd=cwd,
                              env=env or self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_for():
    """``cli_for(**env)``: an ``echopulse`` runner in a scrubbed environment plus ``env``."""
    return lambda **env: Cli(clean_env(**env))


@pytest.fixture
def unused_port():
    return free_port()


# ---------------------------------------------------------------------------------------------
# Ray head


@pytest.fixture(scope="session")
def ray_head(request):
    """A Ray head on 127.0.0.1 via ``cluster/local.sh start``, with its own token file."""
    base = Path(tempfile.mkdtemp(prefix="epray"))  # short: Ray's socket paths must fit 107 bytes
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ports = {"RAY_PORT": 6390, "RAY_DASHBOARD_PORT": 8270, "RAY_CLIENT_PORT": 6391,
             "RAY_AGENT_PORT": 8271}
    for key, port in ports.items():  # the fixed range, unless something else holds it
        if not port_free(port):
            ports[key] = free_port()
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_NUM_CPUS="4",
                    RAY_STATE_DIR=str(base / "state"), RAY_TEMP_DIR=str(base / "tmp"),
                    RAY=str(BIN / "ray"), **{k: str(v) for k, v in ports.items()})

    def stop() -> None:
        subprocess.run([str(CLUSTER / "local.sh"), "stop"], env=env, capture_output=True, timeout=60)
        pidfile = base / "state" / f"ray-head-{ports['RAY_PORT']}.pid"
        if pidfile.exists():  # local.sh could not stop it: kill its process group ourselves
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(base, ignore_errors=True)

    request.addfinalizer(stop)
    started = subprocess.run([str(CLUSTER / "local.sh"), "start"], env=env, capture_output=True,
                             text=True, timeout=90)
    assert started.returncode == 0, started.stdout + started.stderr
    address = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
    wait_http(f"{address}/api/version", 30)
    cli_env = clean_env(RAY_AUTH_TOKEN_PATH=str(token), RAY_API_SERVER_ADDRESS=address)
    return {"address": address, "token": token, "env": cli_env, "cli": Cli(cli_env), "base": base,
            "gcs_port": ports["RAY_PORT"]}


# ---------------------------------------------------------------------------------------------
# PostgreSQL, S3, MLflow


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="session")
def postgres(request):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl), database ``mlflow``."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("ECHOPULSE_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is not installed (initdb/pg_ctl); .ci/run installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; CI installs it)")
    base = Path(tempfile.mkdtemp(prefix="eppg"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root and there is no postgres user to run PostgreSQL as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = base / "data", base / "server.log"
    env = clean_env(LC_ALL="C.UTF-8", LANG="C.UTF-8")

    def pg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, *args], env=env, cwd=base, capture_output=True, text=True,
                              timeout=timeout)

    def stop() -> None:
        if (data / "postmaster.pid").exists():
            pg(pg_ctl, "-D", str(data), "stop", "-m", "immediate", "-w", "-t", "20")
        shutil.rmtree(base, ignore_errors=True)

    request.addfinalizer(stop)
    made = pg(initdb, "-D", str(data), "-U", "mlflow", "-A", "trust", "-E", "UTF8", "--no-sync")
    assert made.returncode == 0, made.stderr
    started = pg(pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "30", "start", "-o",
                 f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off")
    assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")
    createdb = _pg_bin("createdb")
    made = pg(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
    assert made.returncode == 0, made.stderr
    return {"uri": f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow", "port": port}


@pytest.fixture(scope="session")
def s3_server(request):
    """moto's S3 server on 127.0.0.1 with one bucket; fake credentials."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    request.addfinalizer(server.stop)
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="echopulse-mlflow")
    return {"endpoint": endpoint, "bucket": "echopulse-mlflow", "creds": creds, "client": s3}


@pytest.fixture(scope="session")
def mlflow_server(request, postgres, s3_server):
    """``cluster/mlflow/start.sh`` against the PostgreSQL and S3 servers above."""
    port = free_port()
    base = Path(tempfile.mkdtemp(prefix="epmlflow"))
    env = clean_env(MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
                    MLFLOW_BACKEND_STORE_URI=postgres["uri"],
                    MLFLOW_ARTIFACTS_DESTINATION=f"s3://{s3_server['bucket']}/artifacts",
                    MLFLOW_S3_ENDPOINT_URL=s3_server["endpoint"], MLFLOW=str(BIN / "mlflow"),
                    **s3_server["creds"])
    log = (base / "server.log").open("w")
    proc = subprocess.Popen([str(CLUSTER / "mlflow" / "start.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=base)

    def stop() -> None:
        stop_group(proc, grace=5)
        log.close()
        shutil.rmtree(base, ignore_errors=True)

    request.addfinalizer(stop)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 90, proc)
    except (TimeoutError, RuntimeError) as exc:
        log.flush()
        pytest.fail(f"{exc}\n{(base / 'server.log').read_text()[-3000:]}")
    return {"uri": uri, "log": base / "server.log"}


# ---------------------------------------------------------------------------------------------
# A second Ray node


def ray_nodes(ray_head) -> list[dict]:
    """The ALIVE nodes of the ``ray_head`` cluster (Ray's state API, in a subprocess)."""
    code = ("import json; from ray.util.state import list_nodes; "
            f"print(json.dumps([n.__dict__ for n in list_nodes(address={ray_head['address']!r})]))")
    done = subprocess.run([sys.executable, "-c", code], env=ray_state_env(ray_head),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return [n for n in json.loads(done.stdout.strip().splitlines()[-1]) if n["state"] == "ALIVE"]


def ray_state_env(ray_head) -> dict[str, str]:
    """The environment for Ray's own clients (state API, ``ray start``) of the ``ray_head``."""
    return dict(ray_head["env"], RAY_AUTH_MODE="token")


@pytest.fixture(scope="module")
def ray_worker_node(ray_head):
    """A second Ray node on this machine (``ray start --address`` the ``ray_head``'s GCS; 2 CPUs,
    custom resource ``second_node``, its own temp dir and agent ports), stopped afterwards."""
    base = ray_head["base"] / "w"
    base.mkdir(exist_ok=True)
    env = dict(ray_state_env(ray_head), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5")
    before = {n["node_id"] for n in ray_nodes(ray_head)}
    log = (base / "node.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{ray_head['gcs_port']}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"second_node": 1}',
         f"--temp-dir={base / 't'}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            added = [n for n in ray_nodes(ray_head) if n["node_id"] not in before]
            if added:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the worker node did not join:\n{(base / 'node.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"node_id": added[0]["node_id"], "head_node_ids": before}
    finally:
        stop_group(proc, grace=15)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
