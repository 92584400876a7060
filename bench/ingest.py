"""Ingest throughput: the Ray Data pipeline on all cores next to a plain single-process loop.

Both run the same per-input function (``pipelines.ingest.make_input_fn``: read the echo and
the ECG, prepare, cut; the clips go to sized shards) over the same phantom corpus, half stored
uncompressed and half JPEG Baseline, so the ratio measures the parallel wiring and nothing else.

    .venv/bin/python bench/ingest.py --studies 100 --json bench_ingest.json

Prints a side-by-side table and writes ``{"ray_clips_per_s", "serial_clips_per_s", "speedup", ...}``;
``--profile N`` also profiles the serial loop on N inputs with cProfile and lists where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echopulse.synth.dicom_variants import rewrite_transfer_syntax  # noqa: E402
from echopulse.synth.phantom import write_corpus  # noqa: E402
from jobs.recipes import get_recipe  # noqa: E402
from pipelines.ingest import make_input_fn, run_ingest  # noqa: E402
from pipelines.plan import read_manifest  # noqa: E402

log = logging.getLogger("bench.ingest")


def upscale_dicom(path: Path, factor: int) -> None:
    """Resize a phantom cine in place by ``factor`` (bilinear), keeping its ultrasound region true.

    The phantom renders at 128x160; archive cines are 400-800 pixels a side, and the benchmark
    should pay a realistic decode and resize cost per input.
    """
    import numpy as np
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    h, w = frames.shape[1] * factor, frames.shape[2] * factor
    big = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BILINEAR)) for f in frames])
    ds.Rows, ds.Columns, ds.PixelData = h, w, big.tobytes()
    region = ds.SequenceOfUltrasoundRegions[0]
    for key in ("RegionLocationMinX0", "RegionLocationMinY0"):
        setattr(region, key, int(getattr(region, key)) * factor)
    for key in ("RegionLocationMaxX1", "RegionLocationMaxY1"):
        setattr(region, key, (int(getattr(region, key)) + 1) * factor - 1)
    ds.save_as(path, enforce_file_format=True)


def build_corpus(root: Path, studies: int, unique: int, seconds: float, factor: int) -> Path:
    """``studies`` inputs from ``unique`` rendered phantoms: even ones uncompressed, odd ones JPEG."""
    base = root / "base"
    # grey cines without the ECG strip: the figures stay comparable with earlier runs
    base_manifest = write_corpus(base, studies=unique, seed=0, duration_s=seconds, screen_trace=False)
    base_rows = list(csv.DictReader(open(base_manifest, newline="")))
    if factor > 1:
        for r in base_rows:
            upscale_dicom(base / r["echo"], factor)
    rows = []
    (root / "echo").mkdir(parents=True, exist_ok=True)
    for i in range(studies):
        src = base_rows[i % unique]
        syntax = "explicit" if i % 2 == 0 else "jpeg_baseline"
        echo = f"echo/study_{i:04d}_{syntax}.dcm"
        rewrite_transfer_syntax(base / src["echo"], root / echo, syntax, quality=90)
        rows.append({**src, "echo": echo, "ecg": f"base/{src['ecg']}"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def input_megabytes(root: Path, rows: list[dict]) -> float:
    total = 0
    for r in rows:
        total += (root / r["echo"]).stat().st_size
        hea = root / r["ecg"]
        total += hea.stat().st_size + hea.with_suffix(".dat").stat().st_size
    return total / 1e6


def serial_loop(manifest: Path, rows: list[dict], out: Path, clip) -> tuple[float, int]:
    from pipelines.plan import input_key

    from pipelines.shards import ChunkWriter, ShardConfig

    process = make_input_fn(clip, str(manifest.parent), salt=None)
    writer = ChunkWriter(str(out), "clips", ShardConfig())
    t0 = time.perf_counter()
    clips = 0
    for i, row in enumerate(rows):
        outcome, table = process({**row, "_key": input_key(row)})
        writer.add(i, outcome, table)
        clips += outcome["clips"]
    writer.close_chunk()
    return time.perf_counter() - t0, clips


def profile_serial(manifest: Path, rows: list[dict], out: Path, clip, top: int = 14) -> list[dict]:
    profiler = cProfile.Profile()
    profiler.enable()
    serial_loop(manifest, rows, out, clip)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    total = sum(v[2] for v in stats.stats.values())  # total internal time
    rows_out = []
    for (file, line, name), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
        if len(rows_out) >= top:
            break
        short = f"{Path(file).parent.name}/{Path(file).name}:{name}"
        rows_out.append({"function": short, "cumulative_s": round(ct, 3), "own_s": round(tt, 3),
                         "calls": nc})
    log.info("profiled %.1f s of internal time", total)
    return rows_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100, help="inputs (default: %(default)s)")
    parser.add_argument("--unique", type=int, default=10, help="distinct rendered phantoms (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="study length (default: %(default)s)")
    parser.add_argument("--upscale", type=int, default=3,
                        help="enlarge the 128x160 phantom frames by this factor (default: %(default)s)")
    parser.add_argument("--recipe", default="demo", help="clip geometry from this recipe (default: %(default)s)")
    parser.add_argument("--inputs-per-task", type=int, default=0,
                        help="inputs per Ray decode task (default: two tasks per Ray CPU)")
    parser.add_argument("--profile", type=int, default=20, help="inputs to profile serially (0: skip)")
    parser.add_argument("--workdir", default=None, help="where the corpus goes (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "echopulse", "pipelines"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    clip = get_recipe(args.recipe).clip
    t = time.perf_counter()
    manifest = build_corpus(work / "corpus", args.studies, args.unique, args.seconds, args.upscale)
    rows = read_manifest(str(manifest))
    mb = input_megabytes(manifest.parent, rows)
    log.info("corpus: %d inputs, %.1f MB, written in %.0f s", len(rows), mb, time.perf_counter() - t)

    from echopulse.runtime import init_ray

    init_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    # warm-up: workers import the libraries once; not counted (the serial loop's process has them)
    warm = manifest.parent / "warm.csv"  # paths in a manifest are relative to its folder
    with open(manifest) as src, open(warm, "w") as dst:
        dst.writelines(line for i, line in enumerate(src) if i <= 2 * cpus)
    from pipelines.shards import ShardConfig

    # two decode tasks per CPU: at the CLI's 512 inputs per task, 100 inputs were one task
    per_task = args.inputs_per_task or max(1, -(-len(rows) // (2 * cpus)))
    shards = ShardConfig(inputs_per_task=per_task)
    run_ingest(str(warm), str(work / "out_warm"), clip, shards=shards)

    t0 = time.perf_counter()
    summary = run_ingest(str(manifest), str(work / "out_ray"), clip, shards=shards)
    ray_s = time.perf_counter() - t0
    ray.shutdown()

    serial_s, serial_clips = serial_loop(manifest, rows, work / "out_serial", clip)
    assert serial_clips == summary.clips, (serial_clips, summary.clips)

    profile = profile_serial(manifest, rows[: args.profile], work / "out_profile", clip) if args.profile else []

    result = {
        "studies": len(rows), "clips": summary.clips, "quarantined": summary.quarantined,
        "input_mb": round(mb, 1), "recipe": args.recipe, "frame_size": [128 * args.upscale, 160 * args.upscale], "cores": os.cpu_count(), "ray_cpus": cpus,
        "inputs_per_task": per_task,
        "ray_s": round(ray_s, 2), "serial_s": round(serial_s, 2),
        "ray_clips_per_s": round(summary.clips / ray_s, 2),
        "serial_clips_per_s": round(serial_clips / serial_s, 2),
        "ray_mb_per_s": round(mb / ray_s, 2), "serial_mb_per_s": round(mb / serial_s, 2),
        "speedup": round(serial_s / ray_s, 2),
        "serial_profile": profile,
    }
    print(f"\ningest: {len(rows)} inputs (half uncompressed, half JPEG; {128 * args.upscale}x"
          f"{160 * args.upscale} px), {summary.clips} clips, {mb:.0f} MB; {os.cpu_count()} cores, "
          f"Ray {cpus} logical CPUs")
    print(f"{'':<22}{'serial loop':>14}{'Ray Data':>14}{'ratio':>8}")
    print(f"{'seconds':<22}{serial_s:>14.1f}{ray_s:>14.1f}{serial_s / ray_s:>8.2f}")
    print(f"{'clips/s':<22}{result['serial_clips_per_s']:>14.2f}{result['ray_clips_per_s']:>14.2f}"
          f"{result['speedup']:>8.2f}")
    print(f"{'MB/s':<22}{result['serial_mb_per_s']:>14.2f}{result['ray_mb_per_s']:>14.2f}"
          f"{result['speedup']:>8.2f}")
    if profile:
        print(f"\nserial loop on {args.profile} inputs, by cumulative time:")
        for p in profile:
            print(f"  {p['cumulative_s']:>8.2f} s  own {p['own_s']:>7.2f} s  {p['calls']:>7}  {p['function']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
