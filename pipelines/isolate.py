"""Each input decoded in a child process with resource limits, so one input cannot take its task down.

A decoder can die on a bad input: a segfault in a C codec, the kernel's OOM killer when a
codestream declares frames far larger than its DICOM header says (the header check against
``max_decoded_bytes`` cannot see that), a decoder that never finishes. Inside a Ray task that kills
the worker; Ray retries the task, which dies again on the same input, and the run aborts with every
other input of the group.

So a task runs its inputs through one forked child process, one input at a time over a pipe
(``fork``: the task's imports are already loaded, a child costs milliseconds). The child's address
space is limited (``RLIMIT_AS``: what it had when forked plus ``MEMORY_FACTOR x max_decoded_bytes``
plus 1 GiB), so an allocation beyond that fails inside the decoder and the input is quarantined with
the decoder's error instead of the node running out of memory; each input gets a CPU-time budget
(``RLIMIT_CPU``, ``IngestOptions.max_input_cpu_s``) after which the kernel stops the child. When the
child dies anyway, the input it held is quarantined with stage ``worker`` and the reason
(``worker died: signal 24 (SIGXCPU)``), a fresh child starts, and the group goes on: the task never
sees the crash, so Ray's task retries stay for lost nodes. A child is also replaced after any input
that failed: a codec that ran out of memory can keep what it allocated (seen with libjpeg: the next
input then failed with a MemoryError).
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import signal
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from echopulse.ingest import IngestOptions

log = logging.getLogger(__name__)

MEMORY_FACTOR = 4  # peak bytes while cutting clips, per decoded byte (frames, crops, resized copies)
GIB = 1 << 30
WORKER_STAGE = "worker"
InputFn = Callable[[dict[str, Any]], tuple[dict[str, Any], Any]]


def _address_space() -> int:
    """This process's virtual memory size (bytes), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _serve(conn, make_fn: Callable[[], InputFn], options: IngestOptions) -> None:
    """The child: set the memory limit, then answer ``(outcome, table)`` per row until ``None``."""
    limit = _address_space() + MEMORY_FACTOR * options.max_decoded_bytes + GIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    process = make_fn()
    while True:
        row = conn.recv()
        if row is None:
            break
        if options.max_input_cpu_s:
            used = resource.getrusage(resource.RUSAGE_SELF)
            budget = int(used.ru_utime + used.ru_stime + options.max_input_cpu_s) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (budget, resource.RLIM_INFINITY))
        conn.send(process(row))
    conn.close()


def death_reason(exitcode: int | None) -> str:
    """``worker died: signal 11 (SIGSEGV)`` / ``worker died: exit code 1``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown"
        return f"worker died: signal {-exitcode} ({name})"
    return f"worker died: exit code {exitcode}"


class DecoderProcess:
    """One child process decoding inputs for a task; replaced when an input kills it."""

    def __init__(self, make_fn: Callable[[], InputFn], options: IngestOptions) -> None:
        self._args = (make_fn, options)
        self._ctx = multiprocessing.get_context("fork")
        self._proc = self._conn = None
        self.deaths = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, *self._args), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def __call__(self, row: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if self._proc is None:
            self._start()
        try:
            self._conn.send(row)
            outcome, table = self._conn.recv()
        except (EOFError, OSError):  # the child died on this input
            self._proc.join(timeout=30)
            reason = death_reason(self._proc.exitcode)
            self._conn.close()
            self._proc = self._conn = None
            self.deaths += 1
            log.warning("decoder child died on input %s (%s); it is quarantined", row.get("_key"), reason)
            return died_outcome(row, reason), None
        if outcome["stage"]:
            # a failed decode can leave its allocations behind (a codec that ran out of memory
            # leaks it): the next input gets a fresh child
            self.close()
        return outcome, table

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = self._conn = None


def died_outcome(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """The outcome of an input whose decoder died (the shape of :func:`pipelines.ingest.make_input_fn`'s)."""
    return {"_key": row["_key"], "echo": str(row.get("echo")), "ecg": str(row.get("ecg")), "clips": 0,
            "clips_without_ecg": 0, "clips_ecg_synchronized": 0, "stage": WORKER_STAGE, "error": reason,
            "detail": f"{reason}; the input was skipped, the rest of its task went on"}


@contextmanager
def isolated_inputs(make_fn: Callable[[], InputFn], options: IngestOptions | None):
    """``make_fn()``'s function ``row -> (outcome, clips table or None)`` (:func:`pipelines.ingest.
    make_input_fn`), run in a limited child process (forked: ``make_fn`` is not pickled)."""
    decoder = DecoderProcess(make_fn, options or IngestOptions())
    try:
        yield decoder
    finally:
        decoder.close()
