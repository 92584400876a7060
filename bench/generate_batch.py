"""Batch generation throughput: ``generate-batch`` (Ray Data actor pool) next to a plain loop.

Writes a manifest of phantom ECGs (WFDB), saves a randomly initialised generator checkpoint of the
chosen recipe's size (tokenizer bundled; the weights do not change the cost of sampling), then
generates one video per manifest row three ways over the same rows, in one run:

- a plain single-process loop over :func:`echopulse.generate.make_generate_fn` (the per-row function
  the pipeline's actors call),
- :func:`pipelines.generate.run_generate_batch` with 1 actor,
- the same with ``--actors`` actors (default 2).

Each pool pays a fixed start (actor processes, imports, model load) per job; the script also times a
``--short`` manifest, and the steady rate is (extra videos) / (extra seconds). End-to-end rates are
printed too.

    .venv/bin/python bench/generate_batch.py --rows 24 --recipe demo --json bench_generate_batch.json

Prints a side-by-side table and writes ``{"serial_videos_per_s", "ray1_videos_per_s",
"rayN_videos_per_s", ...}``. Each actor reserves ``cores // actors`` CPUs and runs torch on that
many threads (``--cpus-per-actor``), so the serial loop and the pools use the same cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echopulse.config import to_dict  # noqa: E402
from jobs.recipes import get_recipe  # noqa: E402

log = logging.getLogger("bench.generate_batch")


def write_manifest(root: Path, rows: int, unique: int, seconds: float) -> Path:
    """``rows`` manifest rows over ``unique`` phantom ECG records (WFDB), seeds 0..rows-1."""
    from echopulse.synth.phantom import write_corpus

    corpus_manifest = write_corpus(root / "corpus", studies=unique, seed=0, duration_s=seconds)
    corpus = list(csv.DictReader(open(corpus_manifest, newline="")))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "ecg", "seed"])
        writer.writeheader()
        for i in range(rows):
            writer.writerow({"id": f"row{i:04d}", "ecg": f"corpus/{corpus[i % unique]['ecg']}", "seed": i})
    return manifest


def random_checkpoint(root: Path, recipe_name: str) -> Path:
    """A generator checkpoint of the recipe's size with random weights and its tokenizer bundled."""
    import torch

    from echopulse.models.checkpoint import save_checkpoint
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer

    recipe = get_recipe(recipe_name)
    torch.manual_seed(0)
    tok_dir = root / "tokenizer"
    tok_id = save_checkpoint(VideoTokenizer(recipe.tokenizer), recipe.tokenizer, tok_dir, "tokenizer")
    ckpt = root / "checkpoint"
    save_checkpoint(MaskGIT(recipe.generator), recipe.generator, ckpt, "generator",
                    extra={"clip": to_dict(recipe.clip), "sampling": to_dict(recipe.sampling),
                           "tokenizer_id": tok_id})
    shutil.copytree(tok_dir, ckpt / "tokenizer")
    return ckpt


def serial_loop(manifest: Path, checkpoint: Path, out: Path, suffix: str) -> tuple[float, int]:
    from echopulse.generate import EchoGenerator, make_generate_fn
    from pipelines.generate import read_generate_manifest

    rows = read_generate_manifest(str(manifest))
    model = EchoGenerator.from_checkpoint(str(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    fn = make_generate_fn(model, str(out), str(manifest.parent), suffix)
    fn(dict(rows[0]))  # warm-up, not counted (the actors load and warm up too)
    t0 = time.perf_counter()
    ok = sum(fn(dict(row))["status"] == "ok" for row in rows)
    return time.perf_counter() - t0, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24, help="manifest rows = videos (default: %(default)s)")
    parser.add_argument("--unique", type=int, default=4, help="distinct phantom ECGs (default: %(default)s)")
    parser.add_argument("--recipe", default="demo", help="model size (default: %(default)s)")
    parser.add_argument("--format", default="gif", choices=["gif", "mp4", "dcm"], help="video format")
    parser.add_argument("--actors", type=int, default=2, help="actors in the second Ray run (default: %(default)s)")
    parser.add_argument("--short", type=int, default=4,
                        help="rows of the short run that measures a pool's fixed cost (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per actor batch (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.short < args.rows:
        parser.error("--short must be >= 1 and smaller than --rows")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "echopulse", "pipelines"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    cores = os.cpu_count() or 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-batch-"))
    recipe = get_recipe(args.recipe)
    manifest = write_manifest(work, args.rows, args.unique, seconds=recipe.clip.seconds + 1.0)
    checkpoint = random_checkpoint(work / "model", args.recipe)
    suffix = "." + args.format

    torch.set_num_threads(cores)
    serial_s, serial_ok = serial_loop(manifest, checkpoint, work / "out_serial", suffix)
    log.info("serial loop: %d videos in %.1f s", serial_ok, serial_s)

    from echopulse.runtime import init_ray
    from pipelines.generate import run_generate_batch

    init_ray()
    results = {}
    for actors in (1, args.actors):
        cpus = max(1, cores // actors)
        # every run starts its own actor pool (process start, imports, model load): time a short
        # manifest too, so the steady rate (extra videos / extra seconds) leaves that fixed cost out
        short = work / f"short{actors}.csv"
        with open(manifest) as src, open(short, "w") as dst:
            dst.writelines(line for i, line in enumerate(src) if i <= args.short)
        timings = []
        for name, path in (("short", short), ("full", manifest)):
            t0 = time.perf_counter()
            summary = run_generate_batch(str(path), str(checkpoint), str(work / f"out_{name}{actors}"),
                                         fmt=args.format, actors=actors, batch_size=args.batch_size,
                                         cpus_per_actor=cpus)
            timings.append((time.perf_counter() - t0, summary.ok))
        results[actors] = timings
        log.info("Ray, %d actor(s): %d videos in %.1f s, %d in %.1f s", actors, timings[0][1],
                 timings[0][0], timings[1][1], timings[1][0])
    import ray

    ray.shutdown()

    made = [serial_ok] + [r[1][1] for r in results.values()]
    if any(m != args.rows for m in made):
        log.error("not every video was made: %s of %d", made, args.rows)
        return 1
    extra = args.rows - args.short

    def steady(actors: int) -> float:
        (short_s, _), (full_s, _) = results[actors]
        return extra / max(full_s - short_s, 1e-9)

    n = args.actors
    result = {
        "recipe": args.recipe, "rows": args.rows, "short_rows": args.short, "format": args.format,
        "cores": cores, "frames_per_video": recipe.clip.frames, "size": recipe.clip.size,
        "sampling_steps": recipe.sampling.steps, "guidance": recipe.sampling.guidance,
        "serial_s": round(serial_s, 2),
        "ray1_s": round(results[1][1][0], 2), f"ray{n}_s": round(results[n][1][0], 2),
        "serial_videos_per_s": round(args.rows / serial_s, 3),
        "ray1_videos_per_s": round(steady(1), 3),
        f"ray{n}_videos_per_s": round(steady(n), 3),
        "ray1_end_to_end_videos_per_s": round(args.rows / results[1][1][0], 3),
        f"ray{n}_end_to_end_videos_per_s": round(args.rows / results[n][1][0], 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    result["ray1_over_serial"] = round(result["ray1_videos_per_s"] / result["serial_videos_per_s"], 2)
    result[f"ray{n}_over_serial"] = round(result[f"ray{n}_videos_per_s"] / result["serial_videos_per_s"], 2)
    print(f"\ngenerate-batch: {args.rows} videos ({args.recipe}: {recipe.clip.frames} frames "
          f"{recipe.clip.size}x{recipe.clip.size}, {recipe.sampling.steps} steps, guidance "
          f"{recipe.sampling.guidance:g}, {args.format}); {cores} cores; load {result['load_average']}")
    print(f"{'':<26}{'serial loop':>14}{'Ray 1 actor':>14}{f'Ray {n} actors':>16}")
    print(f"{'seconds, end to end':<26}{serial_s:>14.1f}{results[1][1][0]:>14.1f}{results[n][1][0]:>16.1f}")
    print(f"{'videos/s, end to end':<26}{result['serial_videos_per_s']:>14.3f}"
          f"{result['ray1_end_to_end_videos_per_s']:>14.3f}{result[f'ray{n}_end_to_end_videos_per_s']:>16.3f}")
    print(f"{'videos/s, steady':<26}{result['serial_videos_per_s']:>14.3f}{result['ray1_videos_per_s']:>14.3f}"
          f"{result[f'ray{n}_videos_per_s']:>16.3f}")
    print(f"{'steady vs serial':<26}{1.0:>14.2f}{result['ray1_over_serial']:>14.2f}"
          f"{result[f'ray{n}_over_serial']:>16.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
