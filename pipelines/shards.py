"""Sized, deterministically named shards and the compact per-input outcome log.

An ingest run cuts the (deduplicated) manifest into **groups** of about ``inputs_per_task``
inputs, by a hash of each input's key (:mod:`pipelines.plan`; one Ray task each). A task walks its
inputs in order and writes their rows into **chunks**: a chunk closes once its rows reach about
``shard_mb``. Each chunk is one data file plus one outcome file, both named by the index of the
chunk's first input (``group * GROUP_STRIDE + rank in the group``)::

    <kind>/shard-<group>-<rank>.parquet     clips/v1 or tokens/v1 rows, row groups of ~row_group_mb
    outcomes/shard-<group>-<rank>.parquet   one row per input of the chunk (OUTCOME_SCHEMA)

The outcome file is written after the data file, so an input is done exactly when it is in the
outcome log; a data file without its outcome file (a run that died mid-chunk) is an orphan that
``--resume`` deletes before redoing those inputs. The same manifest and sizes give the same
names, so a rerun replaces files rather than adding to them.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage

log = logging.getLogger(__name__)

OUTCOMES = "outcomes"
MB = 1 << 20
GROUP_STRIDE = 1_000_000  # an input's index is group * GROUP_STRIDE + its rank in the group

OUTCOME_SCHEMA = pa.schema([
    ("_key", pa.string()),
    ("index", pa.int64()),
    ("echo", pa.string()),
    ("ecg", pa.string()),
    ("clips", pa.int64()),
    ("clips_without_ecg", pa.int64()),
    ("clips_ecg_synchronized", pa.int64()),
    ("stage", pa.string()),
    ("error", pa.string()),
    ("detail", pa.string()),
    ("tokens", pa.int64()),  # token rows written (one-pass runs); null for clips runs
])


@dataclass(frozen=True)
class ShardConfig:
    """How outputs are cut into files.

    Attributes:
        shard_mb: a data file closes once its rows reach about this many MiB.
        row_group_mb: rows per Parquet row group, in MiB (what one training read pulls in).
        inputs_per_task: manifest inputs one Ray task ingests, on average (at least one file
            per task, so this also bounds files per input).
    """

    shard_mb: float = 256.0
    row_group_mb: float = 32.0
    inputs_per_task: int = 512


def shard_name(index: int) -> str:
    return f"shard-{index // GROUP_STRIDE:06d}-{index % GROUP_STRIDE:06d}.parquet"


def shard_group(path: str) -> int:
    """The group a shard or outcome file belongs to, from its name."""
    return int(posixpath.basename(path).split("-")[1])


class ChunkWriter:
    """Writes one kind of rows (clips or tokens) of one task into sized shards, and the outcome log.

    Call :meth:`add` per input with its outcome and its rows (or ``None``); files are opened lazily,
    row groups are buffered to ``row_group_mb`` and a chunk closes at ``shard_mb``.
    """

    def __init__(self, out: str, kind: str, cfg: ShardConfig) -> None:
        self.out, self.kind, self.cfg = out, kind, cfg
        self.index: int | None = None
        self.outcomes: list[dict[str, Any]] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._written = 0
        self._writer: pq.ParquetWriter | None = None
        self._file = None
        self.files = 0

    def add_rows(self, index: int, table: pa.Table | None) -> None:
        """Rows for the open chunk (named ``index`` if it is a new one), without an outcome."""
        if self.index is None:
            self.index = index
        if table is not None and table.num_rows:
            self._buffer.append(table)
            self._buffered += table.nbytes
            if self._buffered >= self.cfg.row_group_mb * MB:
                self._flush()

    def add(self, index: int, outcome: dict[str, Any], table: pa.Table | None) -> None:
        """One input: its rows (or ``None``) and its outcome; closes the chunk at ``shard_mb``."""
        self.add_rows(index, table)
        self.outcomes.append({**outcome, "index": index})
        if self._written + self._buffered >= self.cfg.shard_mb * MB:
            self.close_chunk()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        if self._writer is None:
            fs, path = storage.filesystem(storage.join(self.out, self.kind, shard_name(self.index)))
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._file = fs.open(path, "wb")
            self._writer = pq.ParquetWriter(self._file, table.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._written += table.nbytes
        self._buffer, self._buffered = [], 0

    def close_chunk(self) -> None:
        """Finish the open chunk: its data file (if it has rows), then its outcome file."""
        if self.index is None:
            return
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self.files += 1
        write_outcomes(self.out, self.index, self.outcomes)
        self.index, self.outcomes, self._writer, self._file, self._written = None, [], None, None, 0


def run_or_explain(out: str, execute):
    """Run a Ray Data execution; a failure (a bucket that refuses writes, a lost node) becomes one
    clear error saying that ``--resume`` continues from the outcome log."""
    try:
        return execute()
    except Exception as exc:
        from echopulse.errors import EchoPulseError

        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise EchoPulseError(f"{out}: the run stopped ({type(exc).__name__}: {cause}); finished inputs are "
                             f"in {out}/outcomes, rerun with --resume to do the rest") from exc


def write_outcomes(out: str, index: int, outcomes: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist([{k: o.get(k) for k in OUTCOME_SCHEMA.names} for o in outcomes],
                                 schema=OUTCOME_SCHEMA)
    fs, path = storage.filesystem(storage.join(out, OUTCOMES, shard_name(index)))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def listing(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def iter_outcomes(out: str, columns: Iterable[str] | None = None) -> Iterator[pa.Table]:
    """The outcome log of ``out``, one outcome file (one chunk: at most a group) at a time."""
    fs, _ = storage.filesystem(out)
    for p in listing(storage.join(out, OUTCOMES)):
        with fs.open(p, "rb") as f:
            yield pq.read_table(f, columns=list(columns) if columns else None)


def read_outcomes(out: str, columns: Iterable[str] | None = None) -> pa.Table:
    """The whole outcome log of ``out`` as one table (small outputs and tests; runs stream it)."""
    tables = list(iter_outcomes(out, columns))
    return pa.concat_tables(tables) if tables else OUTCOME_SCHEMA.empty_table()


def remove_orphans(out: str, kind: str) -> int:
    """Delete data files whose outcome file is missing (a chunk a run did not finish)."""
    done = {posixpath.basename(p) for p in listing(storage.join(out, OUTCOMES))}
    fs, _ = storage.filesystem(out)
    orphans = [p for p in listing(storage.join(out, kind)) if posixpath.basename(p) not in done]
    for p in orphans:
        fs.rm(p)
    if orphans:
        log.info("resume: removed %d unfinished %s file(s)", len(orphans), kind)
    return len(orphans)
