"""Long videos from ECGs: do they keep beating with the ECG and keep their picture?

Generates ``--seconds`` (default 8 s) videos by chained windows (``EchoGenerator.generate``) from
  - held-out phantom ECGs at heart rates spanning 50-130 bpm (simulated, never trained on),
  - pydicom's real 12-lead ECG (``waveform_ecg.dcm``, about 61 bpm),
  - a single-lead Apple Health CSV made from its lead I,
and measures from the pixels alone:
  - ``hr_within_5bpm``: share of videos whose heart rate (``metrics.pixel_heart_rate``: the motion
    principal component's autocorrelation) is within 5 bpm of the ECG's (goal >= 0.9);
  - ``background_leak``: mean grey level, in the last second, of the pixels that were black
    (<= 4) throughout the first second (goal <= 4);
  - ``last_vs_first_ssim``: SSIM between the mean frame of the last window and of the first.
Ceilings (``--ceiling-studies``): the same heart rate read from the phantom's own videos and from
those videos after the model's tokenizer (``ceiling_reconstructed_hr_within_5bpm``): a generator
cannot beat better than its tokens can carry a beat.

The model: ``--generator CKPT`` (a generator checkpoint directory with its tokenizer, as written by
``echopulse train generator`` / ``make demo``), else one trained here on a phantom corpus with the
recipe (``demo``; ``--quick``: ``tiny`` and few steps). Writes ``--json FILE``.

    python bench/long_video.py --quick --json long_video.json
    python bench/long_video.py --generator runs/generator/checkpoint --json long_video.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

log = logging.getLogger("bench.long_video")

BLACK = 4  # grey level at or below which a pixel counts as black


def train_here(recipe, work: Path, studies: int, seconds: float, tok_steps: int, gen_steps: int,
               seed: int):
    """A tokenizer + generator trained on a phantom corpus (bench/quality.py's corpus, and its
    ``train_loop``: the project's one training loop)."""
    import torch

    from bench.quality import build_clips, reconstruct, train_loop
    from echopulse.generate import EchoGenerator
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.training.steps import generator_train_step, tokenizer_train_step

    data = build_clips(work, studies, seconds, seed, recipe.clip, train_stride_s=0.3, holdout=1)
    train = data["train"]
    n = len(train["frames"])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tokenizer = VideoTokenizer(recipe.tokenizer)
    train_loop("tokenizer", tokenizer, tokenizer_train_step,
               lambda _: {"frames": torch.from_numpy(train["frames"][rng.choice(n, 8)])},
               tok_steps, 2e-3, 20, 50, ("loss", "psnr"), None, seed=seed)
    ids, _ = reconstruct(tokenizer, train["frames"])
    generator = MaskGIT(recipe.generator)

    def batch(_):
        idx = rng.choice(n, 8)
        return {"tokens": ids[idx], "ecg": torch.from_numpy(train["ecg"][idx])}

    train_loop("generator", generator, generator_train_step, batch, gen_steps, 1e-3, 20, 50,
               ("loss", "masked_acc"), None, seed=seed)
    return EchoGenerator(generator.eval(), tokenizer.eval(), recipe.clip, recipe.sampling, {}, None)


def load_saved(work: Path, recipe_name: str = "demo"):
    """The tokenizer + generator ``bench/quality.py --save`` left in ``work`` (safetensors, recipe
    sizes), as an :class:`EchoGenerator` with the recipe's clip geometry and sampling."""
    from safetensors.torch import load_model

    from echopulse.generate import EchoGenerator
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer
    from jobs.recipes import get_recipe

    recipe = get_recipe(recipe_name)
    tokenizer, generator = VideoTokenizer(recipe.tokenizer), MaskGIT(recipe.generator)
    load_model(tokenizer, str(work / "tokenizer.safetensors"))
    load_model(generator, str(work / "generator.safetensors"))
    return EchoGenerator(generator.eval(), tokenizer.eval(), recipe.clip, recipe.sampling, {}, None)


def test_ecgs(seconds: float, rates: list[float], work: Path) -> list[tuple[str, object]]:
    """(name, PreparedECG) for the phantom rates, pydicom's 12-lead ECG and its lead I as an
    Apple Health CSV; each is at least ``seconds`` + one window long."""
    from pydicom.data import get_testdata_file

    from echopulse.config import ECG_LEADS
    from echopulse.generate import load_ecg_file
    from echopulse.synth.ecg_sim import simulate_ecg
    from echopulse.transforms.ecg import prepare_ecg

    out = []
    for i, bpm in enumerate(rates):
        sim = simulate_ecg(seconds + 4.0, bpm, fs=500, seed=10_000 + i)  # seeds no corpus uses
        out.append((f"phantom_{bpm:.0f}bpm", prepare_ecg(sim.signal, 500, list(ECG_LEADS))))
    dicom = get_testdata_file("waveform_ecg.dcm")
    real = load_ecg_file(dicom)
    out.append(("pydicom_12lead", real))
    from echopulse.io.ecg import read_ecg

    signal, meta = read_ecg(dicom)
    lead_i = signal[meta["leads"].index("I")]
    # resample lead I to 512 Hz, the Apple Watch rate, and write the export's layout (µV)
    t = np.arange(int(len(lead_i) / meta["fs"] * 512)) / 512
    samples = np.interp(t, np.arange(len(lead_i)) / meta["fs"], lead_i) * 1000.0
    lines = ["Name,Bench Phantom", "Recorded Date,2024-03-05 09:15:30 +0100", "Classification,Sinus Rhythm",
             "Sample Rate,512 hertz", "Lead,Lead I", "Unit,µV", "", ""] + [f"{v:.3f}" for v in samples]
    csv_path = work / "ecg_apple_health.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.append(("apple_health_lead_i", load_ecg_file(str(csv_path))))
    return out


def ceiling(clip, seconds: float, studies: int, work: Path, tokenizer=None) -> list[dict]:
    """The same pixel heart rate read from the phantom's own ``seconds``-long videos (the corpus's
    even 40-150 bpm spread, cut to the clip geometry by the ingest function): what a model that
    beats exactly like the phantom would score. With ``tokenizer``, also from those videos after
    the tokenizer (window by window): a generator can beat no better than its tokens can."""
    from echopulse.config import replace
    from echopulse.ingest import IngestOptions, make_ingest_fn
    from echopulse.metrics import pixel_heart_rate
    from echopulse.synth.phantom import write_corpus

    frames = 1 + 2 * int(seconds * clip.fps // 2)
    long_clip = replace(clip, frames=frames, stride_s=seconds)
    manifest = write_corpus(work / "ceiling", studies=studies, seed=99, duration_s=seconds + 1.0,
                            screen_trace=False)
    cut = make_ingest_fn(long_clip, str(manifest.parent), options=IngestOptions(clip_mode="window"))
    out = []
    for row in csv.DictReader(open(manifest, newline="")):
        for c in cut(row)[:1]:
            video = np.asarray(c["frames"], dtype=np.uint8).reshape(frames, clip.size, clip.size)
            hr, peak = pixel_heart_rate(video, clip.fps)
            ecg_hr = float(row["heart_rate_bpm"])
            result = {"hr_ecg": ecg_hr, "hr_video": hr, "hr_peak": peak,
                      "hr_within_5bpm": bool(np.isfinite(hr) and abs(hr - ecg_hr) <= 5.0)}
            if tokenizer is not None:
                recon_hr, _ = pixel_heart_rate(reconstruct_long(tokenizer, video, clip.frames), clip.fps)
                result.update(hr_reconstructed=recon_hr, reconstructed_within_5bpm=bool(
                    np.isfinite(recon_hr) and abs(recon_hr - ecg_hr) <= 5.0))
            out.append(result)
    return out


def reconstruct_long(tokenizer, video: np.ndarray, frames: int) -> np.ndarray:
    """``video`` through ``tokenizer`` in windows of ``frames`` that share one frame (the first
    frame kept as given); a tail shorter than a window is left out."""
    from bench.quality import reconstruct

    starts = range(0, len(video) - frames + 1, frames - 1)
    _, recon = reconstruct(tokenizer, np.stack([video[s:s + frames] for s in starts]))
    return np.concatenate([video[:1], *(r[1:] for r in recon)])


def score_video(video: np.ndarray, fps: float, ecg_bpm: float, window: int) -> dict:
    from echopulse.metrics import pixel_heart_rate, ssim

    hr, peak = pixel_heart_rate(video, fps)
    second = max(1, int(round(fps)))
    black = video[:second].max(axis=0) <= BLACK
    leak = float(video[-second:][:, black].mean()) if black.any() else float("nan")
    first_mean = video[:window].mean(axis=0) / 255.0
    last_mean = video[-window:].mean(axis=0) / 255.0
    return {"hr_video": hr, "hr_peak": peak, "hr_ecg": ecg_bpm,
            "hr_within_5bpm": bool(np.isfinite(hr) and abs(hr - ecg_bpm) <= 5.0),
            "background_leak": leak, "last_vs_first_ssim": float(ssim(first_mean[None], last_mean[None]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=None, help="generator checkpoint directory (default: train one)")
    parser.add_argument("--quality", default=None, metavar="DIR",
                        help="use the models `bench/quality.py --save` left in DIR (demo recipe sizes)")
    parser.add_argument("--guidance", type=float, default=None, help="(default: the recipe's)")
    parser.add_argument("--temperature", type=float, default=None, help="(default: the recipe's)")
    parser.add_argument("--window-candidates", type=int, default=None,
                        help="draws per chained window to keep the first window's look (default: the recipe's)")
    parser.add_argument("--negative", default=None, choices=("null", "shifted"),
                        help="what guidance pushes away from (default: the recipe's)")
    parser.add_argument("--recipe", default="demo", help="recipe to train with (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny recipe, 150 + 150 steps, 3 phantom rates")
    parser.add_argument("--studies", type=int, default=48, help="phantom training studies (default: %(default)s)")
    parser.add_argument("--tokenizer-steps", type=int, default=600, help="(default: %(default)s)")
    parser.add_argument("--generator-steps", type=int, default=600, help="(default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="video length (default: %(default)s)")
    parser.add_argument("--rates", type=int, default=5, help="phantom ECG rates in 50-130 bpm (default: %(default)s)")
    parser.add_argument("--ceiling-studies", type=int, default=8,
                        help="phantom videos read by the same pixel heart rate (0: skip; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first sampling seed (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="videos per ECG, seeds --seed, --seed + 1, ...: one seed's share can swing "
                             "by a third (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s; more spin-wait on a shared machine)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from echopulse.generate import EchoGenerator
    from jobs.recipes import get_recipe

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe_name = "tiny" if args.quick else args.recipe
    steps = (150, 150) if args.quick else (args.tokenizer_steps, args.generator_steps)
    rates = list(np.linspace(50, 130, 3 if args.quick else args.rates))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.generator:
            model = EchoGenerator.from_checkpoint(args.generator)
            source = args.generator
        elif args.quality:
            model = load_saved(Path(args.quality), args.recipe)
            source = f"bench/quality.py --save: {args.quality}"
        else:
            model = train_here(get_recipe(recipe_name), work, 4 if args.quick else args.studies,
                               6.0, steps[0], steps[1], args.seed)
            source = f"trained here: {recipe_name}, tokenizer {steps[0]} / generator {steps[1]} steps"
        from echopulse.config import replace

        if args.negative:
            model.sampling = replace(model.sampling, negative=args.negative)
        if args.window_candidates:
            model.sampling = replace(model.sampling, window_candidates=args.window_candidates)
        train_s = time.perf_counter() - started
        rows = []
        for seed in range(args.seed, args.seed + args.seeds):
            for name, ecg in test_ecgs(args.seconds, rates, work):
                t = time.perf_counter()
                video = model.generate(ecg, seconds=args.seconds, seed=seed, guidance=args.guidance,
                                       temperature=args.temperature)
                row = {"ecg": name, "seed": seed, "leads": int(np.sum(ecg.lead_mask)),
                       "seconds": round(time.perf_counter() - t, 1),
                       **score_video(video, model.clip.fps, float(ecg.heart_rate_bpm), model.clip.frames)}
                log.info("%s", row)
                rows.append(row)
        top = (ceiling(model.clip, args.seconds, args.ceiling_studies, work, model.tokenizer)
               if args.ceiling_studies else [])
    result = {
        "hr_within_5bpm": float(np.mean([r["hr_within_5bpm"] for r in rows])),
        "background_leak": float(np.nanmean([r["background_leak"] for r in rows])),
        "last_vs_first_ssim": float(np.nanmean([r["last_vs_first_ssim"] for r in rows])),
        "ceiling_hr_within_5bpm": float(np.mean([r["hr_within_5bpm"] for r in top])) if top else None,
        "ceiling_reconstructed_hr_within_5bpm": (float(np.mean([r["reconstructed_within_5bpm"] for r in top]))
                                                 if top else None),
        "ceiling_videos": top,
        "videos": rows, "seeds": list(range(args.seed, args.seed + args.seeds)), "model": source,
        "video_seconds": args.seconds, "fps": model.clip.fps,
        "size": model.clip.size,
        "guidance": model.sampling.guidance if args.guidance is None else args.guidance,
        "negative": model.sampling.negative, "window_candidates": model.sampling.window_candidates,
        "temperature": model.sampling.temperature if args.temperature is None else args.temperature,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "load_avg": [round(x, 1) for x in os.getloadavg()]},
    }
    print(f"\n{'ecg':<22}{'seed':>5}{'leads':>6}{'hr ecg':>8}{'hr video':>10}{'±5':>5}{'leak':>7}{'ssim':>7}")
    for r in rows:
        print(f"{r['ecg']:<22}{r['seed']:>5}{r['leads']:>6}{r['hr_ecg']:>8.1f}{r['hr_video']:>10.1f}"
              f"{'yes' if r['hr_within_5bpm'] else 'no':>5}{r['background_leak']:>7.2f}{r['last_vs_first_ssim']:>7.3f}")
    if top:
        print(f"ceiling (the phantom's own {args.seconds:g} s videos): hr_within_5bpm "
              f"{result['ceiling_hr_within_5bpm']:.2f} over {len(top)} videos; after the model's tokenizer "
              f"{result['ceiling_reconstructed_hr_within_5bpm']:.2f}")
    print(f"\nhr_within_5bpm {result['hr_within_5bpm']:.2f} (goal >= 0.9), background_leak "
          f"{result['background_leak']:.2f} (goal <= 4), last_vs_first_ssim {result['last_vs_first_ssim']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
