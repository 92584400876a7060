"""Training-step throughput of one process, no Ray: the tokenizer and the generator of a recipe,
fp32 next to bf16 autocast (what training uses on a GPU), measured in one run.

The same step functions the Ray Train loops call (``echopulse.training.steps``), on random inputs
of the recipe's shapes (uint8 frames for the tokenizer; token ids and standardized-like ECGs for
the generator), with an AdamW optimizer. Each setting runs ``--warmup`` untimed steps, then
``--steps`` timed ones (synchronised on CUDA).

    python3 bench/train_step.py --recipe paper --device cuda --batch 32 --json train_step.json
    .venv/bin/python bench/train_step.py --recipe demo --steps 5     # CPU (fp32 only)

Writes ``{"tokenizer_fp32_samples_per_s", "tokenizer_bf16_samples_per_s",
"generator_fp32_samples_per_s", "generator_bf16_samples_per_s", "bf16_over_fp32", ...}``; bf16 is
skipped on a CPU, where it is far slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import pick_device, sync  # noqa: E402
from echopulse.models.generator import MaskGIT  # noqa: E402
from echopulse.models.tokenizer import VideoTokenizer  # noqa: E402
from echopulse.training.steps import generator_train_step, make_optimizer, tokenizer_train_step  # noqa: E402
from jobs.recipes import get_recipe  # noqa: E402

log = logging.getLogger("bench.train_step")


def rate(model, step_fn, batch: dict, size: int, steps: int, warmup: int, amp, lr: float) -> dict:
    """Samples/s of ``steps`` timed steps after ``warmup``, and the peak CUDA memory."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, lr)
    for _ in range(warmup):
        step_fn(model, batch, optimizer, lr=lr, amp_dtype=amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step_fn(model, batch, optimizer, lr=lr, amp_dtype=amp)
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"samples_per_s": round(size * steps / seconds, 2), "s_per_step": round(seconds / steps, 4),
           "loss": round(float(last["loss"]), 4)}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="paper", help="tiny, demo or paper (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None, help="(default: the recipe's training batch)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default: all cores)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = pick_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    recipe = get_recipe(args.recipe)
    g = torch.Generator().manual_seed(0)
    precisions = {"fp32": None}
    if device.type == "cuda":
        precisions["bf16"] = torch.bfloat16
    result: dict = {"recipe": recipe.name, "device": str(device), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "cores": os.cpu_count(), "steps": args.steps, "warmup": args.warmup}

    tok_cfg, gen_cfg = recipe.tokenizer, recipe.generator
    tok_batch = args.batch or recipe.tokenizer_train.batch_size
    gen_batch = args.batch or recipe.generator_train.batch_size
    frames = torch.randint(0, 256, (tok_batch, tok_cfg.frames, tok_cfg.image_size, tok_cfg.image_size),
                           dtype=torch.uint8, generator=g)
    tokens = torch.randint(0, gen_cfg.vocab_size, (gen_batch, *gen_cfg.token_grid), generator=g)
    ecg = torch.randn(gen_batch, gen_cfg.ecg.leads, gen_cfg.ecg.samples, generator=g)
    jobs = {
        "tokenizer": (lambda: VideoTokenizer(tok_cfg), tokenizer_train_step, {"frames": frames}, tok_batch,
                      recipe.tokenizer_train.lr),
        "generator": (lambda: MaskGIT(gen_cfg), generator_train_step, {"tokens": tokens, "ecg": ecg}, gen_batch,
                      recipe.generator_train.lr),
    }
    for name, (build, step_fn, batch, size, lr) in jobs.items():
        for precision, amp in precisions.items():
            torch.manual_seed(0)
            model = build().to(device)
            log.info("%s %s: batch %d on %s ...", name, precision, size, device)
            figures = rate(model, step_fn, batch, size, args.steps, args.warmup, amp, lr)
            for key, value in figures.items():
                result[f"{name}_{precision}_{key}"] = value
            result[f"{name}_batch"] = size
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "bf16" in precisions:
            result[f"{name}_bf16_over_fp32"] = round(result[f"{name}_bf16_samples_per_s"]
                                                     / result[f"{name}_fp32_samples_per_s"], 2)

    print(f"\ntraining steps, {recipe.name} recipe, {device}"
          + (f" ({result['gpu']})" if result["gpu"] else f" ({os.cpu_count()} cores)"))
    print(f"{'model':<12}{'batch':>6}" + "".join(f"{p + ' samples/s':>18}" for p in precisions)
          + ("  bf16/fp32" if "bf16" in precisions else ""))
    for name in jobs:
        row = f"{name:<12}{result[name + '_batch']:>6}"
        row += "".join(f"{result[f'{name}_{p}_samples_per_s']:>18.1f}" for p in precisions)
        if "bf16" in precisions:
            row += f"{result[f'{name}_bf16_over_fp32']:>11.2f}"
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
