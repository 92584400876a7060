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

Storage requests (S3): a data file is one PUT, or a multipart upload in parts of ``part_mb`` when it
is larger; an outcome file is one PUT; the outcome log is read with one listing (per 1,000 files)
and one GET per file; a resumed run lists ``OUT`` once for its orphans and its finished inputs.
"""

from __future__ import annotations

import contextlib
import io
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
        part_mb: multipart part size on object stores (a shard above it is uploaded in parts as
            its row groups are written; memory holds one part).
    """

    shard_mb: float = 256.0
    row_group_mb: float = 32.0
    inputs_per_task: int = 512
    part_mb: float = storage.PART_MB


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

    def add(self, index: int, outcome: dict[str, Any], table: pa.Table | None, close: bool = True) -> None:
        """One input: its rows (or ``None``) and its outcome; closes the chunk at ``shard_mb``
        (``close=False``: the caller closes it, see :attr:`full`)."""
        self.add_rows(index, table)
        self.outcomes.append({**outcome, "index": index})
        if close and self.full:
            self.close_chunk()

    @property
    def full(self) -> bool:
        """The open chunk has reached ``shard_mb``."""
        return self._written + self._buffered >= self.cfg.shard_mb * MB

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write aborts the open data file (its multipart upload) and names it."""
        try:
            with storage.writing(storage.join(self.out, self.kind, shard_name(self.index))):
                yield
        except BaseException:
            if self._file is not None:
                storage.abort_output(self._file)
            self._writer = self._file = None
            raise

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        with self._writing():
            if self._writer is None:
                self._file = storage.open_output(storage.join(self.out, self.kind, shard_name(self.index)),
                                                 self.cfg.part_mb)
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
            with self._writing():
                self._writer.close()
                self._file.close()
            self.files += 1
        write_outcomes(self.out, self.index, self.outcomes)
        self.index, self.outcomes, self._writer, self._file, self._written = None, [], None, None, 0


def run_or_explain(out: str, execute):
    """Run a Ray Data execution; a failure (a bucket that refuses writes, a lost node) becomes one
    :class:`~echopulse.errors.RunStopped` naming what failed and saying that ``--resume`` continues
    from the outcome log."""
    try:
        return execute()
    except Exception as exc:
        from echopulse.errors import RunStopped

        raise RunStopped(f"{out}: the run stopped ({_cause(exc)}); finished inputs are kept "
                         f"(outcome log {storage.join(out, OUTCOMES)}), rerun with --resume to do the rest") from exc


def _cause(exc: BaseException) -> str:
    """One line for what stopped a run: the write error naming the refused file when there is one.

    Ray sends a task's error to the driver as text (its traceback; the exception chain does not
    survive pickling), so the write error is found in that text.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or getattr(exc, "cause", None)
    for e in chain:
        for line in str(e).splitlines():
            if "OutputWriteError: " in line:
                return "OutputWriteError: " + line.split("OutputWriteError: ", 1)[1].strip()[:300]
    # otherwise the last line that is not Ray Data's advice about retries
    lines = [ln.strip() for ln in str(chain[-1]).splitlines()
             if ln.strip() and "DataContext" not in ln and not ln.startswith("To change retry")]
    return f"{type(chain[-1]).__name__}: {lines[-1][:300]}" if lines else type(chain[-1]).__name__


def write_outcomes(out: str, index: int, outcomes: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist([{k: o.get(k) for k in OUTCOME_SCHEMA.names} for o in outcomes],
                                 schema=OUTCOME_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(out, OUTCOMES, shard_name(index)), buf.getvalue())  # one PUT


def list_out(out: str) -> dict[str, list[str]]:
    """The Parquet files under ``out`` by first-level folder (``outcomes``, ``clips``, ...), in one
    listing (one request per 1,000 files on S3); paths are inside ``out``'s filesystem."""
    fs, root = storage.filesystem(out)
    root = root.rstrip("/")
    fs.invalidate_cache()  # other processes (the Ray tasks) wrote here: no cached listing below root either
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    by_folder: dict[str, list[str]] = {}
    for p in sorted(found):
        rel = p[len(root) + 1:] if p.startswith(root + "/") else ""
        if "/" in rel and p.endswith(".parquet"):
            by_folder.setdefault(rel.split("/", 1)[0], []).append(p)
    return by_folder


def iter_outcomes(out: str, columns: Iterable[str] | None = None,
                  listing: dict[str, list[str]] | None = None) -> Iterator[pa.Table]:
    """The outcome log of ``out``, one outcome file at a time: one listing (or ``listing``, from
    :func:`list_out`) and one GET per file, fetched 256 at a time concurrently."""
    files = (listing if listing is not None else list_out(out)).get(OUTCOMES, [])
    fs, _ = storage.filesystem(out)
    cols = list(columns) if columns else None
    for start in range(0, len(files), 256):
        batch = files[start:start + 256]
        blobs = fs.cat(batch)
        for p in batch:
            yield pq.read_table(io.BytesIO(blobs[p]), columns=cols)


def read_outcomes(out: str, columns: Iterable[str] | None = None,
                  listing: dict[str, list[str]] | None = None) -> pa.Table:
    """The whole outcome log of ``out`` as one table (:func:`iter_outcomes`)."""
    tables = list(iter_outcomes(out, columns, listing))
    return pa.concat_tables(tables) if tables else OUTCOME_SCHEMA.empty_table()


def remove_orphans(out: str, kind: str, listing: dict[str, list[str]] | None = None) -> int:
    """Delete data files whose outcome file is missing (a chunk a run did not finish); ``listing``
    from :func:`list_out` saves the listing."""
    listing = listing if listing is not None else list_out(out)
    done = {posixpath.basename(p) for p in listing.get(OUTCOMES, [])}
    orphans = [p for p in listing.get(kind, []) if posixpath.basename(p) not in done]
    if orphans:
        fs, _ = storage.filesystem(out)
        fs.rm(orphans)  # one DeleteObjects request per 1,000 keys on S3
        log.info("resume: removed %d unfinished %s file(s)", len(orphans), kind)
    return len(orphans)


def clear_out(out: str, folders: Iterable[str]) -> None:
    """Delete what ``folders`` of ``out`` hold (a fresh run): one listing, bulk deletes."""
    fs, root = storage.filesystem(out)
    root = root.rstrip("/")
    fs.invalidate_cache()
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return
    prefixes = tuple(f"{root}/{folder}/" for folder in folders)
    paths = [p for p in found if p.startswith(prefixes)]
    if paths:
        fs.rm(paths)
