"""Generator training throughput: a plain PyTorch loop next to Ray Train with 1 and 2 workers;
and tokenize throughput with 1 and 2 tokenizer actors.

All three trainings run the same model (the recipe's generator, ``demo`` by default) on the same
data (a small ``tokens/v1`` dataset of random tokens and ECGs made here) with the same per-step
work: ``generator_train_step`` + the EMA update, global batch ``batch_size``. Ray's rate is the
training loop's own ``samples_per_s`` over its last logged window (steps ``L+1..2L``, after ``L``
warm-up steps that include Ray Data's first epoch), so Ray's fixed start-up (cluster, worker group,
dataset shards) is excluded; the plain loop is timed over the same steps after the same warm-up.

A CPU Ray Train worker runs torch on the node's cores split between its workers
(``jobs.train_common.worker_threads``): all of them with 1 worker, half each with 2. The plain loop
runs with the 1-worker count (``--threads`` overrides it); ``plain_1_thread_samples_per_s`` is the
plain loop on one thread, for reference.

    .venv/bin/python bench/train.py --json bench_train.json

Writes ``{"plain_samples_per_s", "ray1_samples_per_s", "ray2_samples_per_s", "ray1_over_plain",
"ray2_over_plain", "tokenize_1_actor_clips_per_s", "tokenize_2_actors_clips_per_s", ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from echopulse.config import replace  # noqa: E402
from jobs.recipes import get_recipe  # noqa: E402
from jobs.train_common import worker_threads  # noqa: E402

log = logging.getLogger("bench.train")


def plain_loop(recipe, tokens_dir: str, window: int, threads: int) -> float:
    """Samples/s of a single-process loop over steps window+1..2*window (the same per-step work)."""
    import torch

    from echopulse.models.generator import MaskGIT
    from echopulse.training.ema import EMA
    from echopulse.training.steps import generator_train_step, lr_at, make_optimizer
    from echopulse.training.loop import step_seed

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train = recipe.generator_train
        table = pq.read_table(Path(tokens_dir) / "tokens")
        table = table.filter(pa.compute.equal(table.column("split"), "train"))
        data = {k: torch.from_numpy(np.array(table.column(k).combine_chunks().to_numpy_ndarray()))
                for k in ("tokens", "ecg")}  # copies: Arrow's buffers are read-only
        n = len(data["tokens"])
        torch.manual_seed(train.seed)
        model = MaskGIT(recipe.generator)
        model.train()
        optimizer = make_optimizer(model, train.lr, train.weight_decay)
        ema = EMA(model, train.ema_decay) if train.ema_decay > 0 else None
        generator = torch.Generator().manual_seed(train.seed)

        def batches():
            while True:
                order = torch.randperm(n, generator=generator)
                for i in range(0, n - train.batch_size + 1, train.batch_size):
                    idx = order[i : i + train.batch_size]
                    yield {k: v[idx] for k, v in data.items()}

        it = batches()
        busy, samples = 0.0, 0
        for step in range(1, 2 * window + 1):
            lr = lr_at(step - 1, 2 * window, train.warmup_steps, train.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            batch = next(it)
            torch.manual_seed(step_seed(train.seed, step, 0))
            generator_train_step(model, batch, optimizer, grad_clip=train.grad_clip)
            if ema is not None:
                ema.update(model)
            if step > window:
                busy += time.perf_counter() - t0
                samples += len(batch["tokens"])
        return samples / busy
    finally:
        torch.set_num_threads(saved)


def ray_loop(recipe, tokens_dir: str, tokenizer: str, workers: int, work: Path) -> float:
    """Ray Train's own in-loop samples/s over its last logged window (start-up excluded)."""
    from jobs.train_generator import train_generator

    out = work / f"ray{workers}"
    result = train_generator(tokens_dir, tokenizer, str(out), recipe,
                             f"sqlite:///{work / 'mlflow.db'}", workers=workers, use_gpu=False)
    return float(result.metrics["samples_per_s"])


def write_clips(out: Path, recipe, n: int, parts: int, seed: int = 0) -> None:
    """A ``clips/v1`` dataset of ``n`` random clips in ``parts`` Parquet parts (tokenize input)."""
    from echopulse.schema import CLIPS_SCHEMA, clip_schema
    from echopulse.schema import write_dataset_info

    clip = recipe.clip
    schema = clip_schema(clip.frames, clip.size, clip.ecg_samples)
    rng = np.random.default_rng(seed)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    per = -(-n // parts)
    for p in range(parts):
        k = min(per, n - p * per)
        if k <= 0:
            break
        cols = {
            "clip_id": [f"bench-{p}-{i}" for i in range(k)], "study_key": ["s"] * k,
            "split": ["train"] * k, "view": ["A4C"] * k,
            "frames": pa.FixedShapeTensorArray.from_numpy_ndarray(
                rng.integers(0, 255, (k, clip.frames, clip.size, clip.size), dtype=np.uint8)),
            "fps": [clip.fps] * k,
            "ecg": pa.FixedShapeTensorArray.from_numpy_ndarray(
                rng.standard_normal((k, 12, clip.ecg_samples)).astype(np.float32)),
            "ecg_leads": [[True] * 12] * k, "ecg_source": ["wfdb"] * k, "ecg_sync": [True] * k,
            "heart_rate_bpm": [60.0] * k,
            "r_peaks": [[0]] * k, "t_start_s": [0.0] * k, "t_end_s": [1.0] * k, "ef": [0.6] * k,
            "source_uri": ["bench"] * k, "provenance": ["{}"] * k,
        }
        pq.write_table(pa.Table.from_pydict(cols, schema=schema), out / "clips" / f"part-{p}.parquet")
    write_dataset_info(str(out), CLIPS_SCHEMA, {"bench": True}, {"clips": n})


def tokenize_rate(clips: Path, tokenizer: str, out: Path, actors: int, batch_size: int) -> float:
    """Clips/s of ``run_tokenize`` end to end (includes the actor pool's start-up)."""
    from pipelines.tokenize import run_tokenize

    t0 = time.perf_counter()
    summary = run_tokenize(str(clips), tokenizer, str(out), actors=actors, batch_size=batch_size,
                           use_gpu=False)
    return summary.tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--window", type=int, default=16,
                        help="warm-up steps, then timed steps (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=64, help="token rows (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the plain loop (default: a 1-worker Ray Train worker's)")
    parser.add_argument("--tokenize-clips", type=int, default=64)
    parser.add_argument("--tokenize-batch-size", type=int, default=16)
    parser.add_argument("--skip-tokenize", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from echopulse.runtime import init_ray
    from bench._common import write_random_tokens

    base = get_recipe(args.recipe)
    train = replace(base.generator_train, steps=2 * args.window, log_every=args.window,
                    checkpoint_every=0, val_every=10**6, sample_every=0, warmup_steps=2)
    recipe = replace(base, generator_train=train)
    figures: dict[str, object] = {"recipe": base.name, "window_steps": args.window,
                                  "batch_size": train.batch_size, "rows": args.rows,
                                  "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        tokenizer = write_random_tokens(str(work / "tokens"), recipe, n=args.rows, seed=0,
                                        val_fraction=0.125)
        init_ray()
        threads = args.threads or worker_threads(1)
        figures["plain_threads"] = threads
        log.info("plain loop (%d torch threads)", threads)
        figures["plain_samples_per_s"] = plain_loop(recipe, str(work / "tokens"), args.window, threads)
        figures["plain_1_thread_samples_per_s"] = plain_loop(recipe, str(work / "tokens"), args.window, 1)
        for workers in (1, 2):
            log.info("Ray Train, %d worker(s)", workers)
            figures[f"ray{workers}_samples_per_s"] = ray_loop(recipe, str(work / "tokens"), tokenizer,
                                                              workers, work)
        plain = float(figures["plain_samples_per_s"])
        figures["ray1_over_plain"] = float(figures["ray1_samples_per_s"]) / plain
        figures["ray2_over_plain"] = float(figures["ray2_samples_per_s"]) / plain
        figures["ray2_over_ray1"] = (float(figures["ray2_samples_per_s"])
                                     / float(figures["ray1_samples_per_s"]))
        if not args.skip_tokenize:
            write_clips(work / "clips", recipe, args.tokenize_clips, parts=8)
            tok = write_random_tokens(str(work / "tok-unused"), recipe, n=2, seed=1)
            for actors in (1, 2):
                log.info("tokenize, %d actor(s)", actors)
                key = f"tokenize_{actors}_actor{'s' if actors > 1 else ''}_clips_per_s"
                figures[key] = tokenize_rate(work / "clips", tok, work / f"tokens{actors}", actors,
                                             args.tokenize_batch_size)
            figures["tokenize_2_over_1"] = (figures["tokenize_2_actors_clips_per_s"]
                                            / figures["tokenize_1_actor_clips_per_s"])
    figures["load_avg_end"] = list(os.getloadavg())
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in figures.items()]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
