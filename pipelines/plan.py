"""Planning an ingest run: the manifest read as a Ray dataset, cut into hash groups, deduplicated.

The driver never holds the manifest's rows. It reads the manifest's header (to check its columns)
and then Ray Data reads the file (``read_csv`` with every column typed as a string, or
``read_parquet``) and normalizes it batch by batch: EchoNet-Dynamic's ``FileList.csv`` rows become
manifest rows, every row gets its input key (a hash of its echo/ecg pair) and its **group**, the key
hashed into ``ceil(rows / inputs_per_task)`` groups. ``groupby(group).map_groups`` then brings each
group's rows together: every repeat of an input lands in the same group, so a group deduplicates
itself (a sort of a few hundred rows) and counts its duplicates, and on ``--resume`` reads only its
own outcome files to skip the inputs that are done. Each group becomes one **plan row**
``{group, rows (JSON of the inputs to do), inputs, duplicates, done}``: one Ray task downstream.

An input's index, which names the chunk files it starts (:mod:`pipelines.shards`), is
``group * GROUP_STRIDE + its rank by key within the group``. It depends only on the manifest's row
count and the input's echo/ecg pair, so a rerun over the same manifest gives the same file names.
``OUT/plan.json`` records the row count and the group size; ``--resume`` refuses an output that was
planned from another manifest, whose chunk names would collide with this one's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from echopulse import storage
from echopulse.errors import EchoPulseError
from echopulse.manifests.common import cell_text
from echopulse.manifests.echonet_dynamic import filelist_row, video_name
from pipelines.shards import GROUP_STRIDE, OUTCOMES, ShardConfig, list_out, shard_group

log = logging.getLogger(__name__)

REQUIRED_MANIFEST_COLUMNS = ("echo",)
ECHONET_COLUMNS = ("FileName", "EF", "FPS")
PLAN_FILE = "plan.json"


def echonet_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """EchoNet-Dynamic's FileList.csv rows as manifest rows (``echonet_dynamic.filelist_row``, what
    ``echopulse manifest echonet-dynamic`` writes): the videos at ``Videos/<FileName>.avi`` beside
    the list (read, not checked, here), no traced frames."""
    return [filelist_row(r, f"Videos/{video_name(cell_text(r['FileName']))}") for r in rows]


def is_echonet(columns: list[str]) -> bool:
    return all(c in columns for c in ECHONET_COLUMNS) and "echo" not in columns


def normalize_rows(rows: list[dict[str, Any]], echonet: bool) -> list[dict[str, str]]:
    """Manifest rows as string dicts (empty for a missing value), with an ``ecg`` column."""
    if echonet:
        rows = echonet_rows(rows)
    return [{"ecg": "", **{str(k): cell_text(v) for k, v in r.items()}} for r in rows]


def input_key(row: dict[str, Any]) -> str:
    """Stable name of one input (a hash, so no path or identifier leaks into file names)."""
    return hashlib.sha256(f"{row.get('echo')}|{row.get('ecg')}".encode()).hexdigest()[:20]


def group_of(key: str, n_groups: int) -> int:
    """The group of an input key: its hash spread over ``n_groups``."""
    return int(key[:12], 16) % n_groups


def manifest_format(manifest: str) -> tuple[str, list[str]]:
    """``("csv" | "parquet", column names)`` from the manifest's header alone.

    Raises:
        EchoPulseError: a missing or unreadable file, or one without the required columns.
    """
    if not storage.exists(manifest):
        raise EchoPulseError(f"{manifest}: manifest not found")
    fs, path = storage.filesystem(manifest)
    with fs.open(path, "rb") as f:
        parquet = f.read(4) == b"PAR1" or manifest.lower().endswith((".parquet", ".pq"))
        f.seek(0)
        if parquet:
            try:
                names = pq.ParquetFile(f).schema_arrow.names
            except (pa.ArrowException, OSError) as exc:
                raise EchoPulseError(f"{manifest}: not a readable Parquet manifest ({exc})") from exc
        else:
            try:
                names = next(csv.reader([f.read(1 << 20).split(b"\n", 1)[0].decode("utf-8-sig")]), [])
            except (UnicodeDecodeError, csv.Error) as exc:
                raise EchoPulseError(f"{manifest}: not a readable CSV manifest ({exc})") from exc
    names = [n.strip("\r\n") for n in names]
    if not names:
        raise EchoPulseError(f"{manifest}: manifest has no rows")
    missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in names and not is_echonet(names)]
    if missing:
        raise EchoPulseError(f"{manifest}: manifest lacks column(s) {', '.join(missing)}")
    return ("parquet" if parquet else "csv"), names


def read_manifest(manifest: str) -> list[dict[str, Any]]:
    """Rows of a small manifest (CSV, Parquet, or EchoNet-Dynamic's FileList.csv) as dicts, in the
    driver: for tools and tests. Runs read manifests with :func:`plan_dataset` instead.

    Values are strings (empty for a missing value), so a row reads the same from either format.
    """
    kind, names = manifest_format(manifest)
    data = storage.read_bytes(manifest)
    if kind == "parquet":
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    if not rows:
        raise EchoPulseError(f"{manifest}: manifest has no rows")
    return normalize_rows(rows, is_echonet(names))


def manifest_dataset(manifest: str, kind: str, names: list[str], remote_args: dict[str, Any]):
    """The manifest's raw rows as a Ray Dataset (CSV cells read as strings, never inferred)."""
    import pyarrow.csv as pacsv
    import ray

    fs, path = storage.arrow_filesystem(manifest)
    if kind == "parquet":
        return ray.data.read_parquet(path, filesystem=fs, file_extensions=None, ray_remote_args=remote_args)
    return ray.data.read_csv(
        path, filesystem=fs, file_extensions=None, ray_remote_args=remote_args,
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                             strings_can_be_null=False, quoted_strings_can_be_null=False))


def count_rows(manifest: str, kind: str, names: list[str]) -> int:
    """The manifest's row count: Parquet's footer, or a streaming CSV read (one batch in memory).

    Raises:
        EchoPulseError: a CSV that does not parse.
    """
    import pyarrow.csv as pacsv

    fs, path = storage.filesystem(manifest)
    with fs.open(path, "rb") as f:
        if kind == "parquet":
            return pq.ParquetFile(f).metadata.num_rows
        try:
            reader = pacsv.open_csv(f, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                                    convert_options=pacsv.ConvertOptions(
                                        column_types={n: pa.string() for n in names}))
            return sum(batch.num_rows for batch in reader)
        except (pa.ArrowException, OSError) as exc:
            raise EchoPulseError(f"{manifest}: not a readable CSV manifest ({exc})") from exc


@dataclass
class PlanCounts:
    """What the plan rows add up to: unique inputs, duplicate rows, inputs already done."""

    inputs: int = 0
    duplicates: int = 0
    done: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.inputs += int(row.get("plan_inputs") or 0)
        self.duplicates += int(row.get("plan_duplicates") or 0)
        self.done += int(row.get("plan_done") or 0)


def plan_counts(row: dict[str, Any]) -> dict[str, int]:
    """A plan row's counts under the names the task rows carry them to the driver."""
    return {"plan_inputs": int(row["inputs"]), "plan_duplicates": int(row["duplicates"]),
            "plan_done": int(row["done"])}


def make_normalize_fn(echonet: bool, n_groups: int):
    """Ray Data batch function: raw manifest rows -> string rows with ``_key`` and ``_group``."""

    def normalize(batch: pa.Table) -> pa.Table:
        rows = normalize_rows(batch.to_pylist(), echonet)
        for r in rows:
            r["_key"] = input_key(r)
            r["_group"] = group_of(r["_key"], n_groups)
        if not rows:
            return pa.table({"_key": pa.array([], pa.string()), "_group": pa.array([], pa.int64())})
        return pa.Table.from_pylist(rows)

    return normalize


def make_plan_fn(out: str, done_files: dict[int, list[str]], credentials: storage.Credentials | None = None):
    """Ray Data group function: one group's rows -> its plan row (each input once, done skipped)."""

    def plan(group: pa.Table) -> pa.Table:
        storage.apply_credentials(credentials)  # resuming, it reads the group's outcome files
        rows = group.to_pylist()
        g = int(rows[0]["_group"])
        rows.sort(key=lambda r: r["_key"])
        unique: list[dict[str, Any]] = []
        for r in rows:
            if not unique or unique[-1]["_key"] != r["_key"]:
                unique.append(r)
            elif json.dumps(r, sort_keys=True) < json.dumps(unique[-1], sort_keys=True):
                unique[-1] = r  # the repeat kept is the same every run, whatever order the shuffle gave
        done = done_keys(done_files.get(g, []), out)
        todo = []
        for rank, r in enumerate(unique):
            r.pop("_group")
            r["_index"] = g * GROUP_STRIDE + rank
            if r["_key"] not in done:
                todo.append(r)
        return pa.table({"group": [g], "rows": [json.dumps(todo)], "inputs": [len(unique)],
                         "duplicates": [len(rows) - len(unique)], "done": [len(unique) - len(todo)]})

    return plan


def done_keys(files: list[str], out: str) -> set[str]:
    """Input keys in some outcome files (one group's: at most a few hundred keys)."""
    if not files:
        return set()
    fs, _ = storage.filesystem(out)
    keys: set[str] = set()
    for p in files:
        with fs.open(p, "rb") as f:
            keys.update(pq.read_table(f, columns=["_key"]).column("_key").to_pylist())
    return keys


def check_plan(out: str, info: dict[str, Any], resume: bool) -> None:
    """Write ``OUT/plan.json``; resuming, first refuse an output planned from another manifest.

    Raises:
        EchoPulseError: ``--resume`` over an output made from another manifest or group size.
    """
    target = storage.join(out, PLAN_FILE)
    if resume and storage.exists(target):
        before = json.loads(storage.read_bytes(target))
        if before != info:
            raise EchoPulseError(
                f"{out}: --resume needs the manifest and --inputs-per-task of the run that made it "
                f"(it was planned for {before}, this run is {info}); rerun without --resume")
    storage.write_text(target, json.dumps(info))


PLAN_CPUS = 0.5  # not the decode tasks' CPUs (1, or 0.75): equal ones fuse planning into decoding


def plan_dataset(manifest: str, out: str, shards: ShardConfig, resume: bool,
                 remote_args: dict[str, Any] | None = None, listing: dict[str, list[str]] | None = None):
    """The plan of an ingest run over ``manifest`` into ``out``: a lazy Ray Dataset of plan rows.

    Reads the header and counts the rows (a streaming read, one record batch at a time); resuming,
    takes ``out``'s outcome file names from ``listing`` (``shards.list_out``; listed here when not
    given) so that each group reads its own files.

    Raises:
        EchoPulseError: a missing, unreadable or empty manifest, or one without the required columns.
    """
    kind, names = manifest_format(manifest)
    remote_args = remote_args or {}
    rows = count_rows(manifest, kind, names)
    if rows == 0:
        raise EchoPulseError(f"{manifest}: manifest has no rows")
    n_groups = max(1, math.ceil(rows / shards.inputs_per_task))
    check_plan(out, {"manifest_rows": rows, "groups": n_groups,
                     "inputs_per_task": shards.inputs_per_task}, resume)
    done_files: dict[int, list[str]] = {}
    if resume:
        for p in (listing if listing is not None else list_out(out)).get(OUTCOMES, []):
            done_files.setdefault(shard_group(p), []).append(p)
    from echopulse.runtime import init_ray
    from pipelines.common import worker_credentials

    init_ray()  # after the checks: a bad manifest fails without starting Ray
    raw = manifest_dataset(manifest, kind, names, remote_args)
    ds = raw.map_batches(make_normalize_fn(is_echonet(names), n_groups), batch_format="pyarrow",
                         batch_size=4096, **remote_args)
    plan = ds.groupby("_group", num_partitions=min(n_groups, 64)).map_groups(
        make_plan_fn(out, done_files, worker_credentials(out) if done_files else None), batch_format="pyarrow",
        num_cpus=PLAN_CPUS, **remote_args)
    # a hash partition can hold several groups, and so one block of plan rows: one group per
    # block instead, so that each decode task takes one group and its output stays one group's
    return plan.repartition(target_num_rows_per_block=1)
