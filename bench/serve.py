"""Online generation throughput of ``echopulse serve`` on loopback: the same N requests one at a
time, then all at once (bounded concurrency), against one replica with dynamic batching.

    python bench/serve.py --json serve.json                     # tiny random-weight model
    python bench/serve.py --checkpoint generator/checkpoint --requests 32 --concurrency 32

Latency and throughput depend on the model, not its training, so without ``--checkpoint`` a
tiny-recipe generator with random weights (tokenizer bundled) is written to a temporary folder.
Every request posts the same WFDB pair (a phantom ECG) with default options (one model window,
seed 0) and asks for a GIF; requests with equal options are the ones that can share a forward.

Keys written with ``--json``: p50_s, p99_s (concurrent latency), videos_per_s (concurrent),
sequential_videos_per_s, batching_gain (concurrent / sequential videos per second), errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_checkpoint(root: Path) -> Path:
    """A tiny-recipe generator with its tokenizer bundled (random weights: speed only)."""
    import torch

    from echopulse.config import to_dict
    from echopulse.models.checkpoint import save_checkpoint
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer
    from jobs.recipes import tiny

    recipe = tiny()
    torch.manual_seed(0)
    tok_id = save_checkpoint(VideoTokenizer(recipe.tokenizer), recipe.tokenizer, root / "tokenizer", "tokenizer")
    ckpt = root / "checkpoint"
    save_checkpoint(MaskGIT(recipe.generator), recipe.generator, ckpt, "generator",
                    extra={"clip": to_dict(recipe.clip), "sampling": to_dict(recipe.sampling),
                           "tokenizer_id": tok_id})
    shutil.copytree(root / "tokenizer", ckpt / "tokenizer")
    return ckpt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="generator checkpoint or models:/ URI (default: a tiny random one)")
    parser.add_argument("--requests", type=int, default=32, help="requests per phase (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight at once (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="serve batch size (default: %(default)s)")
    parser.add_argument("--batch-wait-s", type=float, default=0.05,
                        help="serve batch wait (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="loopback port (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import requests
    from ray import serve

    from echopulse.runtime import init_ray
    from echopulse.synth.phantom import write_corpus
    from pipelines.serve import ServeConfig, start

    work = Path(tempfile.mkdtemp(prefix="epsb"))
    try:
        checkpoint = args.checkpoint or str(tiny_checkpoint(work / "model"))
        write_corpus(work / "synth", studies=1, seed=0, duration_s=4.0)
        hea = work / "synth" / "ecg" / "study_0000.hea"
        files = [("ecg", (hea.name, hea.read_bytes())),
                 ("ecg", (hea.with_suffix(".dat").name, hea.with_suffix(".dat").read_bytes()))]
        init_ray(num_cpus=2)
        url = start(ServeConfig(checkpoint=checkpoint, port=args.port, max_batch_size=args.max_batch_size,
                                batch_wait_s=args.batch_wait_s), blocking=False)
        session = requests.Session()

        def one(i: int) -> tuple[float, bool]:
            t0 = time.perf_counter()
            try:
                # default options (seed 0), as most clients send: concurrent ones can share forwards
                r = requests.post(url + "/generate", files=files, data={"format": "gif"}, timeout=600)
                ok = r.status_code == 200 and r.content[:3] == b"GIF"
            except requests.RequestException:
                ok = False
            return time.perf_counter() - t0, ok

        session.get(url + "/health", timeout=60)
        one(0)  # warm-up: first forward, JIT caches
        t0 = time.perf_counter()
        sequential = [one(i) for i in range(args.requests)]
        seq_s = time.perf_counter() - t0
        before = session.get(url + "/health", timeout=60).json().get("batches", 0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, min(args.concurrency, args.requests))) as pool:
            concurrent = list(pool.map(one, range(args.requests)))
        conc_s = time.perf_counter() - t0
        batches = session.get(url + "/health", timeout=60).json().get("batches", 0) - before
        serve.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    latencies = np.array([t for t, _ in concurrent])
    errors = sum(not ok for _, ok in sequential + concurrent)
    seq_rate, conc_rate = args.requests / seq_s, args.requests / conc_s
    result = {
        "p50_s": round(float(np.percentile(latencies, 50)), 4),
        "p99_s": round(float(np.percentile(latencies, 99)), 4),
        "videos_per_s": round(conc_rate, 3),
        "sequential_videos_per_s": round(seq_rate, 3),
        "sequential_p50_s": round(float(np.median([t for t, _ in sequential])), 4),
        "batching_gain": round(conc_rate / seq_rate, 3),
        "errors": int(errors),
        "requests": args.requests, "concurrency": args.concurrency,
        "max_batch_size": args.max_batch_size, "concurrent_batches": batches,
        "checkpoint": "tiny (random weights)" if not args.checkpoint else args.checkpoint,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
    }
    print(f"{'phase':<12}{'videos/s':>10}{'p50 s':>9}{'p99 s':>9}")
    print(f"{'sequential':<12}{seq_rate:>10.2f}{result['sequential_p50_s']:>9.3f}"
          f"{np.percentile([t for t, _ in sequential], 99):>9.3f}")
    print(f"{'concurrent':<12}{conc_rate:>10.2f}{result['p50_s']:>9.3f}{result['p99_s']:>9.3f}")
    print(f"batching gain {result['batching_gain']:.2f}x, errors {errors}, {args.requests} concurrent requests in {batches} batches")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
