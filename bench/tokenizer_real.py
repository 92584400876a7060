"""Does a tokenizer trained on the phantom alone reconstruct a real echo? Tokenizer only, no generator.

Trains the ``demo`` (or ``--recipe``) recipe's tokenizer on a phantom corpus (plain, or ``--variety``: a look of its
own per study, ``echopulse.synth.phantom.Appearance``), cut by the ingest stage's function exactly
as ``bench/quality.py`` cuts it, then measures reconstruction PSNR/SSIM

- on held-out phantom studies (whole frame and in-sector), and
- on pydicom-data's real SonoSite cine (``echopulse.real_cine``; whole frame and in-sector).

    .venv/bin/python bench/tokenizer_real.py --steps 1200 --json plain.json
    .venv/bin/python bench/tokenizer_real.py --steps 1200 --variety --json variety.json
    .venv/bin/python bench/tokenizer_real.py --steps 1200 --variety --augment --json augment.json

Goal: real-cine in-sector PSNR >= 22 dB (issue 14) without losing much on held-out phantom clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.quality import build_clips, load_clips, load_trained, machine, save_clips, train_loop  # noqa: E402

log = logging.getLogger("bench.tokenizer_real")
GOAL_INSECTOR_DB = 22.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variety", action="store_true", help="a look of its own per phantom study")
    parser.add_argument("--augment", action="store_true",
                        help="augment every training clip (echopulse.transforms.augment: mirror, reverse, "
                             "zoom, turn, shift, blur, gain; the recipes' TrainConfig.augment)")
    parser.add_argument("--lines", type=float, default=0.0,
                        help="with --augment: probability of thin bright curves per clip (ClipAugment.lines; "
                             "default: %(default)s)")
    parser.add_argument("--recipe", default="demo",
                        help="whose tokenizer and clip geometry: demo (pairs of frames per token frame) or "
                             "demo48 (one frame per token frame, frame-local encoder); default: %(default)s")
    parser.add_argument("--studies", type=int, default=24, help="phantom studies (default: %(default)s)")
    parser.add_argument("--holdout", type=int, default=5, help="studies held out (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="study length (default: %(default)s)")
    parser.add_argument("--train-stride", type=float, default=0.3, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1200, help="tokenizer steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50, help="(default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also score the real cine and held-out clips every N steps, a curve in "
                             "the JSON (default: at the end only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s; fp32)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="end training in about this many minutes (fewer steps than --steps)")
    parser.add_argument("--clips", default=None, help="cache of the cut corpus (.npz): read if it exists, else written")
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer (.safetensors): skip training")
    parser.add_argument("--save", default=None, help="write the trained tokenizer here (.safetensors)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("echopulse").setLevel(logging.WARNING)

    import torch

    from echopulse.evaluate import reconstruct
    from echopulse.models.tokenizer import VideoTokenizer
    from echopulse.real_cine import real_cine_clips, real_cine_fidelity, reconstruction_scores
    from echopulse.training.steps import tokenizer_train_step
    from echopulse.transforms.augment import ClipAugment, augment_clips
    from jobs.recipes import get_recipe

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    load_start = machine()["load_avg"]
    recipe = get_recipe(args.recipe)
    t = time.perf_counter()
    if args.clips and Path(args.clips).exists():
        data = load_clips(Path(args.clips))
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-tokenizer-real-"))
        data = build_clips(work, args.studies, args.seconds, args.seed, recipe.clip, args.train_stride,
                           args.holdout, variety=args.variety)
        if args.clips:
            save_clips(Path(args.clips), data)
    train, held = data["train"], data["heldout"]
    data_s = time.perf_counter() - t
    log.info("%d training clips, %d held-out clips (%.0f s)", len(train["frames"]), len(held["frames"]), data_s)

    deadline = None if args.budget_min is None else time.monotonic() + 60 * args.budget_min
    real_clips = data.get("real_cine")
    if real_clips is None:  # no cache with it: cut it here (needs pydicom-data)
        real_clips = real_cine_clips(recipe.clip)
    tokenizer = VideoTokenizer(recipe.tokenizer).to(device)
    rng = np.random.default_rng(args.seed)
    n_train = len(train["frames"])

    augment_gen = torch.Generator().manual_seed(args.seed)
    augment_cfg = ClipAugment(lines=args.lines)

    def batch(step: int) -> dict:
        idx = rng.choice(n_train, args.batch, replace=False)
        frames = torch.from_numpy(train["frames"][idx]).to(device)
        return {"frames": augment_clips(frames, augment_gen, augment_cfg) if args.augment else frames}

    curve: list[dict] = []

    def evaluate(step: int) -> dict[str, float]:
        """Real-cine and held-out phantom in-sector PSNR now (logged; one point of the curve)."""
        real_now = real_cine_fidelity(tokenizer, recipe.clip, device=device, clips=real_clips)
        was = tokenizer.training
        tokenizer.eval()
        phantom_now = reconstruction_scores(reconstruct(tokenizer, held["frames"], device=device), held["frames"])
        tokenizer.train(was)
        point = {"step": step, "real_insector_psnr_db": real_now["insector_psnr_db"],
                 "phantom_insector_psnr_db": phantom_now["insector_psnr_db"]}
        curve.append(point)
        return {k: v for k, v in point.items() if k != "step"}

    if args.tokenizer:
        run = load_trained("tokenizer", tokenizer, args.tokenizer)
    else:
        run = train_loop("tokenizer", tokenizer, tokenizer_train_step, batch, args.steps, args.lr, args.warmup,
                         args.log_every, ("loss", "psnr", "codebook_usage", "real_insector_psnr_db",
                                          "phantom_insector_psnr_db"), deadline,
                         validate=evaluate if args.eval_every else None, val_every=args.eval_every)
    if args.save:
        from safetensors.torch import save_model

        save_model(tokenizer, args.save)
    tokenizer.eval()
    phantom = reconstruction_scores(reconstruct(tokenizer, held["frames"], device=device), held["frames"])
    real = real_cine_fidelity(tokenizer, recipe.clip, device=device, clips=real_clips)
    result = {
        "phantom_heldout": phantom,
        "real_cine": real,
        "goal_real_insector_psnr_db": GOAL_INSECTOR_DB,
        "goal_reached": bool(real["insector_psnr_db"] >= GOAL_INSECTOR_DB),
        "steps": run["steps"],
        "curve": curve,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "seconds": {"data": round(data_s, 1), "train": round(run["seconds"], 1),
                    "cpu_train": round(run["cpu_seconds"], 1)},
        "clips": {"train": int(n_train), "heldout": int(len(held["frames"]))},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {**machine(), "load_avg_start": load_start},
    }
    print(json.dumps({k: result[k] for k in ("phantom_heldout", "real_cine", "steps")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
