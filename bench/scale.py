"""Archive-scale ingest: one streaming pass (manifest -> token shards) at two sizes, local and S3.

Inputs are tiny phantom studies (the ``tiny`` recipe's geometry): a few real DICOM + WFDB pairs
written once and hard-linked under distinct names, so every manifest row is a distinct input that
is decoded in full, without spending minutes writing thousands of phantoms.

For each size (1,000 and 4,000 inputs; ``--quick`` scales both down) the one-pass ingest runs on
local disk while a sampler thread records the driver's peak RSS and the Ray object store's peak
use. At the smaller size it also runs ingest-then-tokenize (the two-stage path) ``--repeats`` times,
each followed by the one pass again, and takes the ratio of the two paths' median walls as the
fused speedup (one run of either moves the ratio by +-0.2 on a shared machine); and the one pass
against a moto S3 server (loopback), counting the requests it serves (every HTTP request: the
input reads, the output writes and listings; ``runs.s3`` splits them).

    .venv/bin/python bench/scale.py --quick --json bench_scale.json

Prints a table and writes ``{"inputs_per_s_per_core", "driver_rss_ratio_4k_vs_1k",
"object_store_ratio_4k_vs_1k", "files_per_1k_inputs", "s3_requests_per_input", "fused_speedup",
...}`` (the raw figures per run too).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench.scale")
BUCKET = "scale"


def make_manifest(root: Path, inputs: int, base: int = 8) -> Path:
    """``inputs`` distinct manifest rows over ``base`` phantom studies (hard links, distinct names)."""
    from echopulse.synth.phantom import write_corpus

    src = root / "base"
    if not (src / "manifest.csv").exists():
        write_corpus(src, studies=base, seed=5, duration_s=2.5)
    rows = list(csv.DictReader(open(src / "manifest.csv", newline="")))
    (root / "echo").mkdir(exist_ok=True)
    (root / "ecg").mkdir(exist_ok=True)
    out = []
    for i in range(inputs):
        r = rows[i % len(rows)]
        echo, hea = Path(r["echo"]), Path(r["ecg"])
        names = {"echo": f"echo/in_{i:06d}.dcm", "ecg": f"ecg/in_{i:06d}.hea"}
        for rel, dst in ((echo, names["echo"]), (hea.with_suffix(".dat"), f"ecg/in_{i:06d}.dat")):
            if not (root / dst).exists():
                os.link(src / rel, root / dst)
        # the WFDB header names its .dat record: each copy gets its own header text
        if not (root / names["ecg"]).exists():
            (root / names["ecg"]).write_text((src / hea).read_text().replace(hea.stem, f"in_{i:06d}"))
        out.append({**r, **names})
    manifest = root / f"manifest_{inputs}.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    return manifest


class Peaks:
    """Samples the driver's RSS and the Ray object store's used bytes every ``period`` seconds."""

    def __init__(self, period: float = 0.2) -> None:
        import psutil

        self.proc, self.period = psutil.Process(), period
        self.rss = self.store = 0
        self.samples: list[int] = []  # the object store's bytes at each sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stats = None
        while not self._stop.is_set():
            self.rss = max(self.rss, self.proc.memory_info().rss)
            try:
                if stats is None:
                    stats = plasma_bytes_used()
                used = stats()
                self.samples.append(used)
                self.store = max(self.store, used)
            except Exception:  # Ray not up yet
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plasma_bytes_used():
    """A function giving the bytes the cluster's object stores hold now (what ``ray memory
    --stats-only`` prints; Ray's private API, the only place that reports it)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return lambda: int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def count_files(out: str) -> int:
    from echopulse import storage

    fs, path = storage.filesystem(out)
    return sum(1 for p in fs.find(path))


def s3_server():
    """A moto S3 server on loopback recording every request it serves, and the AWS variables for it."""
    from bench._common import CountingS3Server

    server = CountingS3Server()
    os.environ.update({"AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    return server


def actors_scan(work: Path, recipe, tokenizer: str, inputs: int) -> dict:
    """Tokenize clips/s with 1 and then 2 actors over the same clips (each actor's torch threads =
    its one CPU), with the load average around each run: a shared machine makes this noisy."""
    from pipelines.ingest import run_ingest
    from pipelines.shards import ShardConfig
    from pipelines.tokenize import run_tokenize

    clips = str(work / "scan_clips")
    run_ingest(str(make_manifest(work, inputs)), clips, recipe.clip, shards=ShardConfig(shard_mb=1.0))
    runs = {}
    for actors in (1, 2, 1, 2):  # twice each, interleaved, against drifting load
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        tok = run_tokenize(clips, tokenizer, str(work / f"scan_tokens_{actors}"), actors=actors)
        rate = tok.tokens / (time.perf_counter() - t0)
        runs.setdefault(actors, []).append({"clips_per_s": round(rate, 2), "load_before": round(load, 2),
                                            "load_after": round(os.getloadavg()[0], 2)})
        log.info("actors=%d: %.2f clips/s", actors, rate)
    best = {a: max(r["clips_per_s"] for r in rs) for a, rs in runs.items()}
    return {"tokenize_clips_per_s_1_actor": best[1], "tokenize_clips_per_s_2_actors": best[2],
            "actor_speedup": round(best[2] / best[1], 2), "runs": runs, "cpu_count": os.cpu_count()}


def speedup_runs(work: Path, inputs: int, recipe, tokenizer: str, shards, repeats: int, fused) -> dict[str, dict]:
    """Ingest-then-tokenize ``repeats`` times over the ``inputs``-row manifest, each followed by a
    one-pass run of it (``fused(name, manifest, out)``), so both paths see the same machine in turn;
    ``{"two_stage", "fused_paired"}`` with the median wall of each."""
    import shutil
    import statistics

    manifest = work / f"manifest_{inputs}.csv"
    two, one, tokens = [], [], 0
    for k in range(max(1, repeats)):
        t0 = time.perf_counter()
        tokens = two_stage(work, manifest, recipe, tokenizer, shards).tokens
        two.append(round(time.perf_counter() - t0, 2))
        log.info("two_stage %d: %.2f s", k, two[-1])
        shutil.rmtree(work / f"out_paired_{k}", ignore_errors=True)
        one.append(fused(f"fused_paired_{k}", manifest, str(work / f"out_paired_{k}"))["wall_s"])
    t, f = statistics.median(two), statistics.median(one)
    return {"two_stage": {"inputs": inputs, "tokens": tokens, "wall_s": t, "inputs_per_s": round(inputs / t, 2),
                          "walls_s": two},
            "fused_paired": {"inputs": inputs, "wall_s": f, "inputs_per_s": round(inputs / f, 2), "walls_s": one}}


def two_stage(work: Path, manifest: Path, recipe, tokenizer: str, shards):
    """Ingest ``manifest`` into clips, then tokenize them (the two-stage path); the tokenize summary."""
    import shutil

    from pipelines.ingest import run_ingest
    from pipelines.tokenize import run_tokenize

    for name in ("two_clips", "two_tokens"):
        shutil.rmtree(work / name, ignore_errors=True)
    run_ingest(str(manifest), str(work / "two_clips"), recipe.clip, shards=shards)
    return run_tokenize(str(work / "two_clips"), tokenizer, str(work / "two_tokens"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(1000, 4000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--quick", action="store_true", help="sizes 100 and 400 (a shared machine)")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=0,
                        help="Ray GPUs (default: %(default)s: encoders on CPU even where a GPU exists, "
                             "so the actor scan measures cores)")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 run")
    parser.add_argument("--no-two-stage", action="store_true", help="skip ingest-then-tokenize")
    parser.add_argument("--repeats", type=int, default=3,
                        help="ingest-then-tokenize and one-pass runs at the smaller size, alternated, for "
                             "fused_speedup (the median of each; one run of either moves +-0.2 on a shared "
                             "machine) (default: %(default)s)")
    parser.add_argument("--inputs-per-task", type=int, default=512,
                        help="inputs per decode task (smaller: the chunk cap is reached at small sizes)")
    parser.add_argument("--actors-scan", type=int, default=0, metavar="INPUTS",
                        help="only measure tokenize clips/s at 1 and 2 actors over INPUTS inputs "
                             "(clips in ~1 MiB shards so both actors get parts)")
    parser.add_argument("--actors", type=int, default=1, help="encoder actors in the one pass")
    parser.add_argument("--chunk-mb", type=float, default=None,
                        help="clip MiB per encode call (default: pipelines.fused.DECODE_CHUNK_MB)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    small, large = (100, 400) if args.quick else args.sizes

    import ray

    from bench._common import write_random_tokens
    from jobs.recipes import tiny
    from pipelines.fused import DECODE_CHUNK_MB, run_ingest_tokens
    args.chunk_mb = args.chunk_mb or DECODE_CHUNK_MB

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = tiny()
    tokenizer = write_random_tokens(str(work / "unused"), recipe, n=2)
    from echopulse.runtime import local_cluster_env

    with local_cluster_env():  # as the CLI's local cluster
        ray.init(num_cpus=args.cpus, num_gpus=args.gpus, object_store_memory=512 << 20,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    cores = args.cpus
    from pipelines.shards import ShardConfig

    shards = ShardConfig(inputs_per_task=args.inputs_per_task)
    results: dict[str, dict] = {}

    import numpy as np

    def fused(name: str, manifest: Path, out: str) -> dict:
        with Peaks() as peaks:
            t0 = time.perf_counter()
            summary = run_ingest_tokens(str(manifest), out, recipe.clip, tokenizer, shards=shards,
                                        actors=args.actors, chunk_mb=args.chunk_mb)
            wall = time.perf_counter() - t0
        r = {"inputs": summary.inputs, "tokens": summary.tokens, "wall_s": round(wall, 2),
             "inputs_per_s": round(summary.inputs / wall, 2), "driver_rss_mb": round(peaks.rss / 2**20, 1),
             "object_store_peak_mb": round(peaks.store / 2**20, 1),
             "object_store_p90_mb": round(float(np.percentile(peaks.samples, 90)) / 2**20, 1) if peaks.samples else None,
             "files": count_files(out)}
        results[name] = r
        log.info("%s: %s", name, r)
        return r

    if args.actors_scan:
        figures = actors_scan(work, recipe, tokenizer, args.actors_scan)
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        ray.shutdown()
        return 0

    # warm-up (workers, imports, both paths' stages) so the first timed runs do not pay for them
    warm = make_manifest(work, 16)
    fused("warm", warm, str(work / "out_warm"))
    if not args.no_two_stage:
        two_stage(work, warm, recipe, tokenizer, shards)
    a = fused(f"fused_{small}", make_manifest(work, small), str(work / f"out_{small}"))
    b = fused(f"fused_{large}", make_manifest(work, large), str(work / f"out_{large}"))

    if not args.no_two_stage:
        results.update(speedup_runs(work, small, recipe, tokenizer, shards, args.repeats, fused))

    s3_per_input = None
    if not args.no_s3:
        import boto3

        server = s3_server()
        client = boto3.client("s3", endpoint_url=server.endpoint)
        client.create_bucket(Bucket=BUCKET)
        manifest = work / f"manifest_{small}.csv"
        rows = list(csv.DictReader(open(manifest, newline="")))
        for r in rows:
            for rel in (r["echo"], r["ecg"], r["ecg"].replace(".hea", ".dat")):
                client.upload_file(str(work / rel), BUCKET, f"in/{rel}")
        client.upload_file(str(manifest), BUCKET, "in/manifest.csv")
        first = len(server.requests)
        t0 = time.perf_counter()
        summary = run_ingest_tokens(f"s3://{BUCKET}/in/manifest.csv", f"s3://{BUCKET}/out", recipe.clip,
                                    tokenizer, shards=shards)
        wall = time.perf_counter() - t0
        served = server.requests[first:]
        s3_per_input = round(len(served) / summary.inputs, 2)
        # output side: writes of OUT's files and listings of the bucket
        output = [r for r in served if r[2].startswith("out/") or r[1] == "list"]
        results["s3"] = {"inputs": summary.inputs, "wall_s": round(wall, 2), "requests": server.counts(first),
                         "requests_per_input": s3_per_input,
                         "output_requests": len(output),
                         "output_requests_per_input": round(len(output) / summary.inputs, 3),
                         "objects_written": len({r[2] for r in served if r[1] == "put" and r[2].startswith("out/")})}
        log.info("s3: %s", results["s3"])
        server.stop()

    figures = {
        "inputs_per_s_per_core": round(b["inputs_per_s"] / cores, 2),
        "driver_rss_ratio_4k_vs_1k": round(b["driver_rss_mb"] / a["driver_rss_mb"], 3),
        "object_store_ratio_4k_vs_1k": round(b["object_store_peak_mb"] / max(a["object_store_peak_mb"], 1e-9), 3),
        "files_per_1k_inputs": round(1000 * b["files"] / b["inputs"], 2),
        "s3_requests_per_input": s3_per_input,
        "s3_output_requests_per_input": results.get("s3", {}).get("output_requests_per_input"),
        "fused_speedup": (round(results["two_stage"]["wall_s"] / results["fused_paired"]["wall_s"], 2)
                          if "two_stage" in results else None),
        "sizes": [small, large], "ray_cpus": cores, "ray_gpus": args.gpus,
        "inputs_per_task": args.inputs_per_task, "actors": args.actors, "chunk_mb": args.chunk_mb,
        "runs": results,
        "load_avg": os.getloadavg(),
    }
    print(f"\n{'run':<14}{'inputs':>8}{'wall s':>9}{'inputs/s':>10}{'driver MB':>11}{'store MB':>10}{'files':>7}")
    for name, r in results.items():
        print(f"{name:<14}{r['inputs']:>8}{r['wall_s']:>9}{r['inputs_per_s'] if 'inputs_per_s' in r else '':>10}"
              f"{r.get('driver_rss_mb', ''):>11}{r.get('object_store_peak_mb', ''):>10}{r.get('files', ''):>7}")
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
