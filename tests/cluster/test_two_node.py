"""A two-node Ray cluster on this machine: the loopback head of ``cluster/local.sh`` plus a worker
node (a second ``ray start`` joining it), and a 2-worker generator training submitted with
``echopulse submit`` that puts one Ray Train worker on each node (``STRICT_SPREAD``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _train_workers(ray_head, submission_id: str) -> list[dict]:
    """The Ray Train worker actors of one submitted job (state API, in a subprocess)."""
    code = ("import json; from ray.job_submission import JobSubmissionClient; "
            "from ray.util.state import list_actors; "
            f"job = JobSubmissionClient({ray_head['address']!r}).get_job_info({submission_id!r}).job_id; "
            f"a = list_actors(address={ray_head['address']!r}, filters=[('class_name', '=', "
            "'RayTrainWorker'), ('job_id', '=', job)], detail=True, limit=1000); "
            "print(json.dumps([{'node_id': x.node_id, 'state': x.state, 'pid': x.pid} for x in a]))")
    env = dict(ray_head["env"], RAY_AUTH_MODE="token")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_training_worker_per_node(ray_head, ray_worker_node, tmp_path):
    from echopulse.config import replace, to_dict
    from jobs.recipes import tiny
    from bench._common import write_random_tokens

    tokens = tmp_path / "tokens"
    tokenizer = write_random_tokens(str(tokens), tiny(), n=16, seed=5)
    recipe = replace(tiny(), generator_train=replace(tiny().generator_train, steps=4, log_every=2,
                                                     warmup_steps=1))
    (tmp_path / "recipe.json").write_text(json.dumps(to_dict(recipe)))
    out = tmp_path / "generator"
    proc = ray_head["cli"](
        "submit", "--timeout", "240", "--env", "ECHOPULSE_PLACEMENT_STRATEGY=STRICT_SPREAD", "--",
        "train", "generator", "--tokens", str(tokens), "--tokenizer", tokenizer, "--out", str(out),
        "--recipe", str(tmp_path / "recipe.json"), "--workers", "2",
        "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoint" / "model.safetensors").is_file()

    submission_id = proc.stderr.split("submitted ", 1)[1].split()[0]
    workers = _train_workers(ray_head, submission_id)
    assert len(workers) == 2, workers
    nodes = {w["node_id"] for w in workers}
    assert len(nodes) == 2, f"both training workers ran on one node: {workers}"
    assert ray_worker_node["node_id"] in nodes  # one on the second node, one on the head
