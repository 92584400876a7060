"""Every file in cluster/ parses, and carries the fields the docs rely on. No servers needed."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def _ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def _load(path: str):
    return yaml.safe_load((CLUSTER / path).read_text())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


CHECKED = {"README.md", "local.sh", "runtime_env.yaml", "aws.yaml", "Dockerfile",
           "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml", "mlflow/start.sh",
           "mlflow/mlflow.env"}


def test_every_cluster_file_is_checked_here():
    files = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file()}
    assert files == CHECKED, "a new file in cluster/ needs a check in this module"


@pytest.mark.parametrize("script", ["local.sh", "mlflow/start.sh"])
def test_scripts_are_valid_bash(script):
    path = CLUSTER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_local_head_is_loopback_and_stops_only_itself():
    text = (CLUSTER / "local.sh").read_text()
    assert "--node-ip-address=127.0.0.1" in text and "--dashboard-host=127.0.0.1" in text
    assert "--block" in text and "RAY_AUTH_MODE" in text
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r'"\$RAY"\s+stop', line) for line in commands), "never `ray stop`"
    usage = subprocess.run([str(CLUSTER / "local.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "start|stop" in usage.stderr


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    from echopulse.submit import build_runtime_env, load_runtime_env_file

    base = load_runtime_env_file(CLUSTER / "runtime_env.yaml")
    assert base["working_dir"] == "." and base["pip"] == "requirements.lock"
    assert {".venv", ".git", "demo", "*.db"} <= set(base["excludes"])
    env = build_runtime_env(ROOT, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, base=base)
    assert env["working_dir"] == str(ROOT) and env["pip"] == str(ROOT / "requirements.lock")
    assert env["env_vars"] == {"ECHOPULSE_LOG_LEVEL": "INFO",
                               "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    parsed = RuntimeEnv(**env)  # Ray's own validation; reads the requirements file
    assert any(p.startswith("mlflow==") for p in parsed["pip"]["packages"])


def test_aws_launcher_config():
    cfg = _load("aws.yaml")
    schema = json.loads((Path(__import__("ray").__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    import jsonschema

    jsonschema.validate(cfg, schema)  # Ray's own schema for cluster launcher configs
    assert cfg["provider"]["type"] == "aws"
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    types = {name: n["node_config"]["InstanceType"] for name, n in nodes.items()}
    gpu = [n for n, t in types.items() if t.split(".")[0][0] in "gp"]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and n not in gpu]
    assert gpu and cpu, types
    for name in gpu + cpu:
        assert nodes[name]["min_workers"] <= nodes[name]["max_workers"] <= cfg["max_workers"]
    # S3 by instance role on every node, never keys in the file
    for node in nodes.values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = (CLUSTER / "aws.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("requirements.lock" in c for c in cfg["setup_commands"])


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == _ray_pin()
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the job API is never exposed by a LoadBalancer
    templates = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for t in templates for c in _containers(t)}
    assert len(images) == 1
    for t in templates:
        for c in _containers(t):
            env = _env(c)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))]
    assert gpu_groups
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_kuberay_raycluster():
    cfg = _load("kuberay/raycluster.yaml")
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayCluster"
    _check_ray_cluster_spec(cfg["spec"])
    groups = {g["groupName"] for g in cfg["spec"]["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= groups
    assert cfg["spec"]["workerGroupSpecs"][0]["maxReplicas"] > 0


def test_kuberay_rayjob_runs_a_valid_echopulse_command():
    from echopulse.cli import build_parser

    cfg = _load("kuberay/rayjob.yaml")
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayJob"
    spec = cfg["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "echopulse.cli"]
    args = build_parser().parse_args(argv[3:])  # the entrypoint is a command the CLI accepts
    assert args.command == "train" and args.out.startswith("s3://")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"} and "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    assert spec["shutdownAfterJobFinishes"] is True
    submitter = _env(_containers(spec["submitterPodTemplate"])[0])
    assert "RAY_AUTH_TOKEN" in submitter
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_kuberay_rayservice_deploys_the_serve_app_of_echopulse_serve():
    from pipelines.serve import build_app

    cfg = _load("kuberay/rayservice.yaml")
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayService"
    serve_config = yaml.safe_load(cfg["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pipelines.serve:build_app"
    assert app["args"]["checkpoint"].startswith("models:/")
    bound = build_app(app["args"])  # the args are ones the app accepts (binding loads no model)
    assert bound is not None
    with pytest.raises(ValueError, match="unknown serve args"):
        build_app({**app["args"], "replica": 3})
    _check_ray_cluster_spec(cfg["spec"]["rayClusterConfig"])


def test_mlflow_server_settings_are_postgres_s3_loopback():
    settings = dict(line.split("=", 1) for line in (CLUSTER / "mlflow" / "mlflow.env").read_text()
                    .splitlines() if line and not line.startswith("#"))
    assert settings["MLFLOW_HOST"] == "127.0.0.1"
    assert settings["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert ":" not in settings["MLFLOW_BACKEND_STORE_URI"].split("//")[1].split("@")[0]  # no password
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    script = (CLUSTER / "mlflow" / "start.sh").read_text()
    assert "--artifacts-destination" in script and "--backend-store-uri" in script


def test_dockerfile_uses_the_pinned_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{_ray_pin()}-")
    assert "requirements.lock" in text


def test_docs_describe_scaling_and_the_job_api_security():
    readme = (ROOT / "README.md").read_text()
    assert "## Scaling" in readme and "echopulse submit" in readme
    for text in (readme, (CLUSTER / "README.md").read_text()):
        assert "no authentication" in text and "token" in text
    for name in ("aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "mlflow/start.sh",
                 "local.sh", "runtime_env.yaml"):
        assert f"cluster/{name}" in readme or name in (CLUSTER / "README.md").read_text(), name
