"""Quality of the demo-size models on held-out phantom studies: tokenizer reconstruction and ECG control.

Everything runs in this process, on the CPU in fp32, with no Ray: an echo-phantom corpus
(``echopulse.synth``: DICOM + WFDB studies with ground truth) is cut into window-mode clips by the
ingest stage's per-input function (``echopulse.ingest.make_ingest_fn``), whole studies are held
out, and the ``demo`` recipe's tokenizer and generator are trained by the project's one training
loop (``echopulse.training.loop.TrainingLoop``) over its step functions. On the held-out studies
it measures

- tokenizer reconstruction: PSNR (dB, the mean of per-clip PSNR) and SSIM of decode(encode(clip));
- ECG control (``echopulse.metrics.ecg_sync_score``: correlation between the clip's LV cavity-area
  curve and the LV volume curve its ECG implies). Each held-out clip is generated twice from its
  real first frame: once with its own ECG and once with another held-out study's ECG. The scores
  (matched, shuffled, swapped, chance, real, reconstructed) and pixel fidelity come from the
  evaluation core, ``echopulse.evaluate`` (``ecg_control``, ``fidelity``), and mean what its
  ``TERMS`` say: ``ecg_sync_shuffled`` is the clip generated from the other study's ECG scored
  against the clip's own ECG (what its motion would follow if the generator ignored the ECG).
  Two phantom-free scores beside it: ``pixel_ecg_control_*`` (heart rate and phase from pixels;
  needs about two beats, so a one-window clip mostly scores 0) and ``motion_agreement_*``
  (``echopulse.metrics.motion_agreement``: the generated clip's motion against the real clip's,
  the score guidance is calibrated with; shuffled = drawn from the other study's ECG).

    .venv/bin/python bench/quality.py --json bench_quality.json
    .venv/bin/python bench/quality.py --quick             # a smoke run, under 2 minutes
    python3 bench/quality.py --device cuda --batch 32 --clips clips.npz   # on a GPU machine

``--clips FILE.npz`` caches the cut corpus (written on the first run, read afterwards), so a
machine without pydicom/wfdb (a GPU box) can rerun on clips cut elsewhere. ``--tokenizer FILE``
reuses a tokenizer saved with ``--save`` (its training is skipped), for generator ablations such as
``--no-ecg-frame-embedding`` or ``--prime-prob 0``; ``--generator FILE`` likewise reuses a saved
generator, to compare sampling settings on one model.

Prints a table against the goals (PSNR >= 25.4 dB, the paper's reconstruction MSE 2.89e-3; SSIM >=
0.75; matched >= 0.7; shuffled <= 0.3) and writes ``{"tokenizer_psnr_db", "tokenizer_ssim",
"ecg_sync_matched", "ecg_sync_shuffled", ...}`` with the steps, clips, seconds and machine. The
tokenizer is also scored on a real echo it never saw, pydicom-data's SonoSite cine
(``echopulse.real_cine``): ``real_cine_tokenizer_psnr_db`` (whole frame) and
``real_cine_tokenizer_insector_psnr_db`` / ``_insector_ssim`` (nan without pydicom-data).
``--variety`` gives each phantom study a look of its own (``echopulse synth --variety``);
``bench/tokenizer_real.py`` runs the tokenizer part alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

log = logging.getLogger("bench.quality")

GOALS = {  # key: (comparison, bound)
    "tokenizer_psnr_db": (">=", 25.4),
    "tokenizer_ssim": (">=", 0.75),
    "ecg_sync_matched": (">=", 0.7),
    "ecg_sync_shuffled": ("<=", 0.3),
}
QUICK = {"studies": 6, "holdout": 2, "seconds": 4.0, "tokenizer_steps": 30, "generator_steps": 30,
         "sampling_steps": 4}


# ---- data ---------------------------------------------------------------------------------------


def build_clips(work: Path, studies: int, seconds: float, seed: int, clip, train_stride_s: float,
                holdout: int, variety: bool = False) -> dict:
    """Write the phantom corpus and cut it into window clips with the ingest stage's function.

    Held-out studies (``holdout`` of them, drawn with ``seed``) are cut into non-overlapping
    windows; training studies every ``train_stride_s`` seconds (more phases of the cycle). With
    ``variety`` every study gets its own look (``echopulse.synth.phantom.Appearance.draw``).
    """
    from echopulse.config import replace
    from echopulse.ingest import IngestOptions, make_ingest_fn
    from echopulse.synth.phantom import write_corpus

    manifest = write_corpus(work / "corpus", studies=studies, seed=seed, duration_s=seconds, variety=variety)
    rows = list(csv.DictReader(open(manifest, newline="")))
    held = set(np.random.default_rng([seed, 7]).choice(studies, size=holdout, replace=False).tolist())
    options = IngestOptions(clip_mode="window")
    cut = {
        "train": make_ingest_fn(replace(clip, stride_s=train_stride_s), str(manifest.parent), options=options),
        "heldout": make_ingest_fn(clip, str(manifest.parent), options=options),
    }
    out = {s: {"frames": [], "ecg": [], "study": [], "heart_rate_bpm": [], "fps": []} for s in cut}
    for i, row in enumerate(rows):
        split = "heldout" if i in held else "train"
        for c in cut[split](row):  # the ingest stage's per-input function, serially
            d = out[split]
            d["frames"].append(np.asarray(c["frames"], dtype=np.uint8).reshape(clip.frames, clip.size, clip.size))
            d["ecg"].append(np.asarray(c["ecg"], dtype=np.float32).reshape(12, clip.ecg_samples))
            d["study"].append(i)
            d["heart_rate_bpm"].append(float(c["heart_rate_bpm"]))
            d["fps"].append(float(c["fps"]))
    for d in out.values():
        for k in ("frames", "ecg", "study", "heart_rate_bpm"):
            d[k] = np.stack(d[k]) if k in ("frames", "ecg") else np.asarray(d[k])
    out["held_studies"] = sorted(held)
    # the real SonoSite cine cut the same way (pydicom-data), kept with the corpus so a clips cache
    # carries it to machines without pydicom-data
    from echopulse.real_cine import real_cine_clips, vendor_cine_path

    out["real_cine"] = real_cine_clips(clip) if vendor_cine_path() else None
    return out


def save_clips(path: Path, data: dict) -> None:
    """The cut corpus as one ``.npz`` (plain arrays: read back without pickle)."""
    arrays = {f"{split}__{k}": np.asarray(v) for split in ("train", "heldout") for k, v in data[split].items()}
    if data.get("real_cine") is not None:  # so a machine without pydicom-data scores it too
        arrays["real_cine"] = np.asarray(data["real_cine"], np.uint8)
    np.savez_compressed(path, held_studies=np.asarray(data["held_studies"]), **arrays)


def load_clips(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        out: dict = {"train": {}, "heldout": {}, "held_studies": z["held_studies"].tolist(),
                     "real_cine": z["real_cine"] if "real_cine" in z.files else None}
        for key in z.files:
            if "__" in key:
                split, name = key.split("__", 1)
                out[split][name] = z[key]
    return out


# ---- training -----------------------------------------------------------------------------------


class Progress:
    """The training loop's logger here: a log line at each logged step with the window's metrics,
    seconds per step (wall and CPU) and the ETA to the loop's planned end (a deadline moves it)."""

    active = False  # no run to log artifacts to

    def __init__(self, name: str, keys: tuple[str, ...]):
        self.name, self.keys = name, keys
        self.loop = None  # the TrainingLoop, for its planned end
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        total = self.loop.total
        per = (time.perf_counter() - self.start) / step
        cpu = (time.process_time() - self.cpu_start) / step  # CPU seconds of this process
        shown = " ".join(f"{k} {metrics[k]:.4g}" for k in self.keys if k in metrics)
        log.info("%s %d/%d  %s  %.2f s/step (%.2f CPU s)  eta %.0f s", self.name, step, total, shown,
                 per, cpu, per * (total - step))


def train_loop(name: str, model, step_fn, make_batch, steps: int, lr: float, warmup: int,
               every: int, keys: tuple[str, ...], deadline: float | None, seed: int = 0,
               validate=None, val_every: int = 0) -> dict:
    """``steps`` steps of an ``echopulse.training`` step function in the project's one loop
    (:class:`echopulse.training.loop.TrainingLoop`: warmup + cosine LR, fp32, no EMA, no checkpoints).
    ``validate(step)`` (optional) runs every ``val_every`` steps and at the end; its metrics are
    logged with the training ones.

    With a ``deadline`` (``time.monotonic()``), the loop shortens the run to the steps that fit,
    judged from the pace so far, and the LR schedule with it so it still decays. ``final`` is the
    last logged window's mean metrics.
    """
    import itertools
    from functools import partial

    from tqdm import tqdm

    from echopulse.config import TrainConfig
    from echopulse.training.loop import TrainingLoop

    train = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup, log_every=every, seed=seed, ema_decay=0.0,
                        bf16=False, val_every=val_every if validate is not None else 0)
    progress = Progress(name, keys)
    loop = TrainingLoop(model=model, train=train, step_fn=step_fn, logger=progress,
                        batches=(make_batch(i) for i in itertools.count()),
                        progress=partial(tqdm, disable=True), deadline=deadline,  # the log lines show progress
                        validate=validate)
    progress.loop = loop
    t0, cpu0 = time.perf_counter(), time.process_time()
    ran = loop.run()
    return {"steps": ran, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "final": {k: v for k, v in loop.last.items() if k not in ("step", "world_size")}}


def load_trained(name: str, model, path: str) -> dict:
    """Weights saved by ``--save`` instead of training; the record ``train_loop`` would return."""
    from safetensors.torch import load_model

    load_model(model, path, device=str(next(model.parameters()).device))
    log.info("%s read from %s (not trained)", name, path)
    return {"steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "final": {}, "loaded": path}


# ---- evaluation ---------------------------------------------------------------------------------


def to_uint8(video) -> np.ndarray:
    """A [0, 1] float video tensor as uint8 frames, rounded as the clips are stored."""
    return (video.clamp(0, 1) * 255).round().byte().cpu().numpy()


def reconstruct(tokenizer, frames: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(token ids on the CPU, uint8 reconstructions)`` of uint8 clips."""
    import torch

    device = next(tokenizer.parameters()).device
    ids, recon = [], []
    tokenizer.eval()
    with torch.inference_mode():
        for k in range(0, len(frames), batch):
            x = torch.from_numpy(frames[k:k + batch]).to(device)
            i = tokenizer.encode(x)
            ids.append(i.cpu())
            recon.append(to_uint8(tokenizer.decode_from_indices(i)))
    return torch.cat(ids), np.concatenate(recon)


def generate(generator, tokenizer, ecg: np.ndarray, prime, steps: int, guidance: float,
             temperature: float, seed: int, batch: int = 16, negative: str = "null",
             heart_rate_bpm: np.ndarray | None = None, guidance_schedule: str = "constant") -> np.ndarray:
    """uint8 clips sampled for each ECG (primed with ``prime`` token frames when given); guidance
    against the null condition or (``negative="shifted"``) the same ECG half a beat later."""
    import torch

    from echopulse.models.sampling import sample
    from echopulse.transforms.ecg import shifted_ecg

    shifted = shifted_ecg(ecg, heart_rate_bpm) if negative == "shifted" and guidance else None

    device = next(tokenizer.parameters()).device
    out = []
    with torch.inference_mode():
        for k in range(0, len(ecg), batch):
            rows = range(k, min(k + batch, len(ecg)))  # a seed of its own per clip
            ids = sample(generator, torch.from_numpy(ecg[k:k + batch]), steps=steps, guidance=guidance,
                         temperature=temperature, seed=[seed + i for i in rows], guidance_schedule=guidance_schedule,
                         prime_tokens=None if prime is None else prime[k:k + batch],
                         negative_ecg=None if shifted is None else torch.from_numpy(shifted[k:k + batch]))
            out.append(to_uint8(tokenizer.decode_from_indices(ids.to(device))))
    return np.concatenate(out)


def pixel_scores(videos: np.ndarray, ecg: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """The phantom-free ECG-control score (``echopulse.metrics.pixel_ecg_control``) per clip:
    heart rate and beat phase from the pixels' motion alone. A one-window clip (about a beat)
    often shows too little motion period for a rate, so many clips score 0 here; the long-video
    bench (bench/long_video.py) is where this score has room."""
    from echopulse.metrics import pixel_ecg_control

    return np.asarray([pixel_ecg_control(v, f, e)["score"] for v, e, f in zip(videos, ecg, fps)])


def real_cine_scores(tokenizer, clip, device, clips=None) -> dict[str, float]:
    """The tokenizer on pydicom-data's real SonoSite cine (``echopulse.real_cine``), whole frame
    and in-sector; ``clips``: the cine's clips from a corpus cache; nan when neither they nor
    pydicom-data are there."""
    from echopulse.real_cine import real_cine_fidelity, vendor_cine_path

    have = clips is not None or vendor_cine_path()
    got = real_cine_fidelity(tokenizer, clip, device=device, clips=clips) if have else {}
    return {f"real_cine_tokenizer_{k}": got.get(k, float("nan"))
            for k in ("psnr_db", "insector_psnr_db", "insector_ssim")}


def nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ---- main ---------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def print_table(result: dict) -> None:
    others = ("real_cine_tokenizer_psnr_db", "real_cine_tokenizer_insector_psnr_db",
              "ecg_sync_swapped", "ecg_sync_chance", "ecg_sync_real", "ecg_sync_reconstructed",
              "pixel_ecg_control_matched", "pixel_ecg_control_shuffled",
              "motion_agreement_matched", "motion_agreement_shuffled",
              "generated_psnr_db", "generated_ssim")
    w = max(map(len, (*GOALS, *others))) + 2  # the longest name sets the column
    print()
    print(f"{'metric':<{w}}{'value':>10}  {'goal':<10}{'reached':>8}")
    for key, (op, bound) in GOALS.items():
        v = result[key]
        ok = result["goals_reached"][key]
        print(f"{key:<{w}}{v:>10.3f}  {op + ' ' + str(bound):<10}{'yes' if ok else 'no':>8}")
    for key in others:
        print(f"{key:<{w}}{result[key]:>10.3f}")
    s = result["seconds"]
    print(f"\nsteps: tokenizer {result['steps']['tokenizer']}, generator {result['steps']['generator']}; "
          f"clips: train {result['clips']['train']}, held-out {result['clips']['heldout']} "
          f"({result['clips']['heldout_studies']} studies)")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))
    print(f"load average at start {result['machine']['load_avg_start']}, end {result['machine']['load_avg']}")


def main(argv=None) -> int:
    from echopulse.models.sampling import GUIDANCE_SCHEDULES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=48, help="phantom studies (default: %(default)s)")
    parser.add_argument("--holdout", type=int, default=8, help="studies held out (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="study length (default: %(default)s)")
    parser.add_argument("--train-stride", type=float, default=0.3,
                        help="hop between training clip starts, s (held-out clips do not overlap; "
                             "default: %(default)s)")
    parser.add_argument("--tokenizer-steps", type=int, default=2500, help="(default: %(default)s)")
    parser.add_argument("--generator-steps", type=int, default=2500, help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default: %(default)s)")
    parser.add_argument("--tokenizer-lr", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--generator-lr", type=float, default=1e-3, help="(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="warmup steps (default: %(default)s)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="(default: the recipe's)")
    parser.add_argument("--guidance", type=float, default=None, help="(default: the recipe's)")
    parser.add_argument("--temperature", type=float, default=None, help="(default: the recipe's)")
    parser.add_argument("--negative", default=None, choices=("null", "shifted"),
                        help="what guidance pushes away from (default: the recipe's)")
    parser.add_argument("--guidance-schedule", default="constant", choices=GUIDANCE_SCHEDULES,
                        help="guidance weight over the decoding steps (default: %(default)s)")
    parser.add_argument("--no-prime", action="store_true", help="generate without the real first frame")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="stop training early so the whole run ends in about this many minutes "
                             "(steps actually run are reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s; fp32, TF32 "
                                                          "matmuls on CUDA)")
    parser.add_argument("--clips", default=None,
                        help="cache of the cut corpus (.npz): read when it exists (the corpus flags are then "
                             "ignored), else written")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer saved by --save (tokenizer.safetensors): skip its training")
    parser.add_argument("--generator", default=None,
                        help="a generator saved by --save (generator.safetensors, same flags): skip its "
                             "training, e.g. to compare --guidance/--temperature on one model")
    parser.add_argument("--no-ecg-frame-embedding", action="store_true",
                        help="ablation: the generator sees the ECG through cross-attention only")
    parser.add_argument("--prime-prob", type=float, default=None,
                        help="fraction of training samples with the first token frame given "
                             "(default: the recipe's)")
    parser.add_argument("--cond-dropout", type=float, default=None,
                        help="fraction of training samples with the null condition: what guidance "
                             "pushes away from (default: the recipe's)")
    parser.add_argument("--variety", action="store_true",
                        help="a phantom corpus with a look of its own per study (echopulse synth --variety)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=25, help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--workdir", default=None, help="where the corpus goes (default: a temp dir)")
    parser.add_argument("--save", action="store_true", help="keep the trained weights in the workdir")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.log_every = 10
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("echopulse").setLevel(logging.WARNING)
    if args.holdout < 2 or args.holdout >= args.studies:
        parser.error("--holdout must be at least 2 and fewer than --studies")

    import torch

    from echopulse.evaluate import ecg_control, fidelity, partners
    from echopulse.metrics import motion_agreement
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.training.steps import generator_train_step, tokenizer_train_step
    from echopulse.config import replace
    from jobs.recipes import demo

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    deadline_total = None if args.budget_min is None else time.monotonic() + 60 * args.budget_min
    recipe = demo()
    gen_cfg = recipe.generator
    if args.no_ecg_frame_embedding:
        gen_cfg = replace(gen_cfg, ecg_frame_embedding=False)
    if args.prime_prob is not None:
        gen_cfg = replace(gen_cfg, prime_prob=args.prime_prob)
    if args.cond_dropout is not None:
        gen_cfg = replace(gen_cfg, cond_dropout=args.cond_dropout)
    sampling = recipe.sampling
    s_steps = args.sampling_steps or sampling.steps
    guidance = sampling.guidance if args.guidance is None else args.guidance
    temperature = sampling.temperature if args.temperature is None else args.temperature
    seconds: dict[str, float] = {}

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)  # --save writes here even when the clips come from --clips
    t = time.perf_counter()
    if args.clips and Path(args.clips).exists():
        data = load_clips(Path(args.clips))
        log.info("clips read from %s", args.clips)
    else:
        data = build_clips(work, args.studies, args.seconds, args.seed, recipe.clip, args.train_stride,
                           args.holdout, variety=args.variety)
        if args.clips:
            save_clips(Path(args.clips), data)
    train, held = data["train"], data["heldout"]
    seconds["data"] = time.perf_counter() - t
    log.info("corpus: %d studies (%d held out), %d training clips, %d held-out clips, %.0f s",
             args.studies, args.holdout, len(train["frames"]), len(held["frames"]), seconds["data"])

    def budget_for(share: float) -> float | None:
        if deadline_total is None:
            return None
        return time.monotonic() + share * max(0.0, deadline_total - time.monotonic())

    # tokenizer
    rng = np.random.default_rng(args.seed)
    tokenizer = VideoTokenizer(recipe.tokenizer).to(device)
    n_train = len(train["frames"])

    def tokenizer_batch(step: int) -> dict:
        return {"frames": torch.from_numpy(train["frames"][rng.choice(n_train, args.batch, replace=False)])}

    if args.tokenizer:
        tok = load_trained("tokenizer", tokenizer, args.tokenizer)
    else:
        tok = train_loop("tokenizer", tokenizer, tokenizer_train_step, tokenizer_batch, args.tokenizer_steps,
                         args.tokenizer_lr, args.warmup, args.log_every, ("loss", "psnr", "codebook_usage"),
                         budget_for(0.45), seed=args.seed)
    seconds["tokenizer_train"] = tok["seconds"]

    t = time.perf_counter()
    held_ids, recon = reconstruct(tokenizer, held["frames"])
    train_ids, _ = reconstruct(tokenizer, train["frames"])
    tok_scores = fidelity(recon, held["frames"], device=device)
    tok_psnr, tok_ssim = nanmean(tok_scores["psnr"]), nanmean(tok_scores["ssim"])
    seconds["tokenize"] = time.perf_counter() - t
    log.info("tokenizer on held-out clips: PSNR %.2f dB, SSIM %.3f", tok_psnr, tok_ssim)
    real_cine = real_cine_scores(tokenizer, recipe.clip, device, data.get("real_cine"))

    # generator
    generator = MaskGIT(gen_cfg).to(device)

    def generator_batch(step: int) -> dict:
        idx = rng.choice(n_train, args.batch, replace=False)
        return {"tokens": train_ids[idx], "ecg": torch.from_numpy(train["ecg"][idx])}

    if args.generator:
        gen = load_trained("generator", generator, args.generator)
    else:
        gen = train_loop("generator", generator, generator_train_step, generator_batch, args.generator_steps,
                         args.generator_lr, args.warmup, args.log_every, ("loss", "masked_acc"),
                         budget_for(0.8), seed=args.seed)
    seconds["generator_train"] = gen["seconds"]

    if args.save:
        from safetensors.torch import save_model

        save_model(tokenizer, str(work / "tokenizer.safetensors"))
        save_model(generator, str(work / "generator.safetensors"))
        log.info("models saved in %s", work)

    # ECG control on held-out studies
    t = time.perf_counter()
    generator.eval()
    partner = partners(held["study"])
    prime = None if args.no_prime else held_ids[:, :1]
    own_ecg, other_ecg = held["ecg"], held["ecg"][partner]
    own_hr, fps = held["heart_rate_bpm"], np.asarray(held["fps"])
    negative = args.negative or sampling.negative
    matched = generate(generator, tokenizer, own_ecg, prime, s_steps, guidance, temperature, args.seed,
                       negative=negative, heart_rate_bpm=own_hr, guidance_schedule=args.guidance_schedule)
    swapped = generate(generator, tokenizer, other_ecg, prime, s_steps, guidance, temperature, args.seed,
                       negative=negative, heart_rate_bpm=own_hr[partner],
                       guidance_schedule=args.guidance_schedule)
    control = ecg_control(matched, own_ecg, partner, fps, own_hr, swapped=swapped, real=held["frames"],
                          reconstructed=recon)
    scores = {f"ecg_sync_{k}": v for k, v in control.items()}
    # phantom-free: rate and phase from the pixels' motion, no volume model
    scores["pixel_ecg_control_matched"] = pixel_scores(matched, own_ecg, fps)
    scores["pixel_ecg_control_shuffled"] = pixel_scores(swapped, own_ecg, fps)
    first = 0 if args.no_prime else 1  # a primed first frame is given, not generated
    # phantom-free on one window: does the clip move when the real clip recorded with the ECG does?
    # (shuffled: drawn from another study's ECG, compared with this clip's real motion)
    scores["motion_agreement_matched"] = np.asarray([motion_agreement(g, r, first)
                                                     for g, r in zip(matched, held["frames"])])
    scores["motion_agreement_shuffled"] = np.asarray([motion_agreement(g, r, first)
                                                      for g, r in zip(swapped, held["frames"])])
    gen_scores = fidelity(matched, held["frames"], first=first, device=device)
    gen_psnr, gen_ssim = nanmean(gen_scores["psnr"]), nanmean(gen_scores["ssim"])
    seconds["generate_and_score"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    seconds["cpu_total"] = time.process_time()

    result = {
        "tokenizer_psnr_db": tok_psnr,
        "tokenizer_ssim": tok_ssim,
        **{k: nanmean(v) for k, v in scores.items()},
        **real_cine,
        "generated_psnr_db": gen_psnr,
        "generated_ssim": gen_ssim,
        "ecg_sync_per_clip": {k: [None if math.isnan(x) else round(float(x), 4) for x in v]
                              for k, v in scores.items()},
        "cpu_seconds_per_step": {"tokenizer": tok["cpu_seconds"] / max(1, tok["steps"]),
                                 "generator": gen["cpu_seconds"] / max(1, gen["steps"])},
        "steps": {"tokenizer": tok["steps"], "generator": gen["steps"],
                  "tokenizer_asked": args.tokenizer_steps, "generator_asked": args.generator_steps},
        "final_train_metrics": {"tokenizer": tok["final"], "generator": gen["final"]},
        "clips": {"train": int(n_train), "heldout": int(len(held["frames"])),
                  "studies": args.studies, "heldout_studies": args.holdout,
                  "frames": recipe.clip.frames, "size": recipe.clip.size, "fps": recipe.clip.fps},
        "sampling": {"steps": s_steps, "guidance": guidance, "temperature": temperature, "negative": negative,
                     "guidance_schedule": args.guidance_schedule,
                     "primed_with_first_frame": not args.no_prime},
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": {**machine(), "load_avg_start": load_start},
        "recipe": "demo",
        "generator": {"ecg_frame_embedding": gen_cfg.ecg_frame_embedding, "prime_prob": gen_cfg.prime_prob,
                      "cond_dropout": gen_cfg.cond_dropout},
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
    }
    result["goals_reached"] = {k: bool(result[k] >= b if op == ">=" else result[k] <= b)
                               for k, (op, b) in GOALS.items()}
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
