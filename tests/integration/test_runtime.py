"""The local cluster that ``init_ray`` starts."""

import os
import time


def test_the_local_cluster_keeps_idle_workers_between_stages(ray_session):
    """Ray stops idle workers beyond the CPU count after 1 s by default, and each Ray Data stage
    then started a fresh worker (~1 s each); the local cluster keeps them, so work that comes a few
    seconds later runs on the same worker processes."""
    ray = ray_session
    cpus = int(ray.cluster_resources()["CPU"])
    n = 2 * cpus  # more workers than the cluster's CPUs: the ones Ray would stop after 1 s idle

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self) -> None:
            self.arrived = 0

        def arrive(self) -> None:
            self.arrived += 1

        def count(self) -> int:
            return self.arrived

    free = ray.available_resources().get("CPU", 0.0)  # what earlier tests left free: n tasks fit in it

    @ray.remote(num_cpus=free / n)
    def pid(barrier) -> int:
        barrier.arrive.remote()
        deadline = time.monotonic() + 120
        while ray.get(barrier.count.remote()) < n and time.monotonic() < deadline:
            time.sleep(0.05)  # all n at once: n distinct worker processes
        return os.getpid()

    def round_of_workers() -> set[int]:
        barrier = Barrier.remote()
        return set(ray.get([pid.remote(barrier) for _ in range(n)]))

    first = round_of_workers()
    assert len(first) == n
    time.sleep(3)
    again = round_of_workers()
    assert again <= first, f"{len(again - first)} of {n} workers were started again"
    from echopulse.runtime import IDLE_WORKER_ENV

    assert IDLE_WORKER_ENV not in os.environ  # the setting went to Ray's processes, not this one's
