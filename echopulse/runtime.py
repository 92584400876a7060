"""Starting or joining Ray: the embedded default is a local cluster started in-process."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)
_joined: list[str] = []  # the address init_ray connected to, if any

# Ray stops idle workers beyond the CPU count after 1 s, so every Ray Data stage of a run (a plan
# has five) and the next run in the same process started a fresh worker (~1 s each: 4-5 s of a
# 20 s one pass at 1,000 inputs, BENCHMARKS stop 33). The local cluster is this process's own.
IDLE_WORKER_ENV = "RAY_idle_worker_killing_time_threshold_ms"
IDLE_WORKER_MS = 60_000


@contextmanager
def local_cluster_env():
    """The environment a local cluster is started in (wrap ``ray.init``): idle workers kept for
    ``IDLE_WORKER_MS`` unless the user set ``IDLE_WORKER_ENV``. Ray's processes read it at start;
    this process's environment is restored afterwards."""
    before = os.environ.get(IDLE_WORKER_ENV)
    os.environ.setdefault(IDLE_WORKER_ENV, str(IDLE_WORKER_MS))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(IDLE_WORKER_ENV, None)


def joined_cluster() -> bool:
    """Whether this process runs on a cluster started elsewhere (an address given to
    :func:`init_ray`, or ``RAY_ADDRESS``, which Ray sets for submitted jobs): one that may grow
    (an autoscaler) and other work may share, unlike the local cluster this process started."""
    return bool(_joined or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, num_cpus: int | None = None,
             worker_logs: bool | None = None) -> None:
    """Connect to Ray once per process.

    Args:
        address: a cluster address (``ray://…``, ``auto``); ``None`` reads ``RAY_ADDRESS`` and
            otherwise starts a local cluster in this process.
        num_cpus: logical CPUs for a local cluster. Defaults to at least 4 so a Tune trial and its
            Train worker can be scheduled together on a 2-core laptop.
        worker_logs: stream every worker's output to this terminal (default: when
            ``ECHOPULSE_WORKER_LOGS=1``; the CLI's ``--debug`` sets it). Errors reach the driver
            either way; the worker logs stay in Ray's session directory.
    """
    import ray

    if ray.is_initialized():
        return
    if worker_logs is None:
        worker_logs = os.environ.get("ECHOPULSE_WORKER_LOGS") == "1"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=worker_logs)
        _joined.append(address)
        return
    cpus = num_cpus or max(os.cpu_count() or 1, 4)
    log.info("starting a local Ray cluster (%d logical CPUs)", cpus)
    with local_cluster_env():
        ray.init(
            address="local",  # never join a stale cluster that /tmp/ray/ray_current_cluster points to
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=worker_logs,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    # Ray Data's own progress bars are the per-stage progress in a terminal; keep its logs quiet.
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True
