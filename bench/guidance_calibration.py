"""Does the guidance weight picked on validation clips help held-out clips?

Takes a demo pair saved by ``bench/quality.py --save`` (``tokenizer.safetensors``,
``generator.safetensors``) and its corpus cache (``--clips``). The held-out studies are split in two
halves; :func:`echopulse.calibration.calibrate_guidance` picks a weight on one half (what
``echopulse train generator`` does on its validation split) and the other half is scored at g=0 and
at the picked weight, with both ECG-control scores: the phantom's volume-curve score
(``ecg_sync_score``) and the pixel motion agreement the calibration uses. Then the halves swap.

    python bench/guidance_calibration.py --clips Q/clips.npz --tokenizer Q/tokenizer.safetensors \\
        --generator Q/generator.safetensors --json out.json

JSON: per split ``{"picked", "calibration", "heldout_ecg_sync_g0", "heldout_ecg_sync_picked",
"heldout_agreement_g0", "heldout_agreement_picked"}`` and ``"ecg_sync_never_worse"`` (the picked
weight's held-out ECG-sync score is >= g=0's in every split).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import generate, load_clips, load_trained, machine, reconstruct  # noqa: E402

log = logging.getLogger("bench.guidance_calibration")


def heldout_scores(generator, tokenizer, held: dict, ids, recon: np.ndarray, rows: np.ndarray, weight: float,
                   sampling, seeds: int) -> dict[str, float]:
    """Mean ECG-control scores of ``rows`` (held-out clips) generated at ``weight`` over ``seeds``."""
    from echopulse.evaluate import sync_scores
    from echopulse.metrics import motion_agreement

    ecg = held["ecg"][rows]
    sync, agree = [], []
    for seed in range(seeds):
        drawn = generate(generator, tokenizer, ecg, ids[rows, :1], sampling.steps, weight, sampling.temperature,
                         seed=7919 + 1000 * seed, negative=sampling.negative,
                         heart_rate_bpm=held["heart_rate_bpm"][rows])
        sync.append(sync_scores(drawn, ecg, np.asarray(held["fps"])[rows], held["heart_rate_bpm"][rows]))
        agree.append([motion_agreement(g, r, first=1) for g, r in zip(drawn, recon[rows])])
    return {"ecg_sync": float(np.nanmean(sync)), "agreement": float(np.nanmean(agree))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", required=True, help="bench/quality.py corpus cache (.npz)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.safetensors from bench/quality.py --save")
    parser.add_argument("--generator", required=True, help="generator.safetensors from bench/quality.py --save")
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds per weight (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    import torch

    from echopulse.calibration import calibrate_guidance
    from echopulse.config import replace
    from echopulse.models.generator import MaskGIT
    from echopulse.models.tokenizer import VideoTokenizer
    from jobs.recipes import demo

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe = demo()
    sampling = replace(recipe.sampling, calibration_seeds=args.seeds)
    tokenizer = VideoTokenizer(recipe.tokenizer)
    load_trained("tokenizer", tokenizer, args.tokenizer)
    generator = MaskGIT(recipe.generator)
    load_trained("generator", generator, args.generator)
    generator.eval()
    held = load_clips(Path(args.clips))["heldout"]
    ids, recon = reconstruct(tokenizer, held["frames"])
    study = np.asarray(held["study"])
    studies = sorted(set(study.tolist()))
    halves = (studies[: len(studies) // 2], studies[len(studies) // 2:])
    splits = []
    for val_studies, test_studies in (halves, halves[::-1]):
        val, test = np.isin(study, val_studies), np.isin(study, test_studies)
        cal = calibrate_guidance(generator, tokenizer, ids[val].numpy(), held["ecg"][val], sampling)
        g0 = heldout_scores(generator, tokenizer, held, ids, recon, np.flatnonzero(test), 0.0, sampling, args.seeds)
        picked = g0 if cal.picked == 0 else heldout_scores(generator, tokenizer, held, ids, recon,
                                                           np.flatnonzero(test), cal.picked, sampling, args.seeds)
        splits.append({"val_studies": val_studies, "picked": cal.picked, "calibration": cal.to_dict(),
                       "heldout_clips": int(test.sum()),
                       "heldout_ecg_sync_g0": g0["ecg_sync"], "heldout_ecg_sync_picked": picked["ecg_sync"],
                       "heldout_agreement_g0": g0["agreement"], "heldout_agreement_picked": picked["agreement"]})
        log.info("picked g=%g on studies %s: held-out ECG sync %.3f -> %.3f, agreement %.3f -> %.3f",
                 cal.picked, val_studies, g0["ecg_sync"], picked["ecg_sync"], g0["agreement"], picked["agreement"])
    result = {"splits": splits,
              "ecg_sync_never_worse": all(s["heldout_ecg_sync_picked"] >= s["heldout_ecg_sync_g0"] for s in splits),
              "seeds": args.seeds, "candidates": list(sampling.guidance_candidates),
              "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "models": {"tokenizer": args.tokenizer, "generator": args.generator}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
