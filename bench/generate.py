"""Sampler speed: our MaskGIT sampler next to a naive reference loop over the same model.

Both decode the same clips from the same randomly initialised weights (fixed seed) with the same
number of steps, guidance and seed; both run every step. The reference is the plain loop: per
step two separate forwards (ECG-conditioned, then null-conditioned), nothing cached, full logits
and log-softmax at every position, Gumbel-max over the vocabulary, fp32. Ours is
``echopulse.models.sampling.sample`` (see its module docstring for what it saves).

    .venv/bin/python bench/generate.py --size paper --json bench_generate.json

    .venv/bin/python bench/generate.py --size demo --steps 8 --quality DIR   # + held-out quality
    python3 bench/generate.py --device cuda --precision bf16 --compile reduce-overhead --batch-sweep 1,8,32

Prints a side-by-side table and writes ``{"ours_s_per_clip", "reference_s_per_clip", "speedup",
"time_ratio", "flop_ratio", "flops_utilization", "default_steps", "s_per_clip_default_steps",
"s_per_clip_18_steps", "clips_per_s_batchB", ...}``; with ``--quality DIR`` (the models and clips
``bench/quality.py --save`` left there) also ``"ssim_default_steps", "ssim_18_steps",
"ecg_sync_default_steps", "ecg_sync_18_steps"`` on its held-out clips. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention) on a separate run of each
sampler; utilization is our achieved FLOP/s over the best fp32 matmul throughput (2048x2048)
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from bench._common import pick_device, sync  # noqa: E402
from echopulse.models.generator import MaskGIT  # noqa: E402
from echopulse.models.sampling import sample  # noqa: E402
from echopulse.models.schedules import get_schedule  # noqa: E402
from jobs.recipes import get_recipe  # noqa: E402

log = logging.getLogger("bench.generate")


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel SDPA uses."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)


def count_flops(fn) -> tuple[int, object]:
    """FLOPs of matmuls and attention in ``fn()``, and its result."""
    _register_cpu_attention_flops()
    with flop_counter.FlopCounterMode(display=False) as counter:
        out = fn()
    return int(counter.get_total_flops()), out


@torch.no_grad()
def reference_sample(model: MaskGIT, ecg: torch.Tensor, steps: int, guidance: float, temperature: float = 1.0,
                     schedule: str = "cosine", seed: int = 0) -> torch.Tensor:
    """The naive loop: two forwards per step, full logits everywhere, Gumbel-max, argsort ranks.

    The noise comes from a generator on ``ecg.device`` (drawn where the model runs)."""
    schedule_fn = get_schedule(schedule)
    n, mask_id = model.seq_len, model.mask_id
    device = ecg.device
    b = ecg.shape[0]
    rng = torch.Generator(device=device).manual_seed(seed)

    def gumbel(shape):
        u = torch.rand(shape, generator=rng, device=device).clamp_(1e-20, 1.0 - 1e-7)
        return -torch.log(-torch.log(u))
    ids = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    context = model.encode_ecg(ecg)
    frames = model.encode_ecg_frames(ecg)  # None without an ECG frame embedding
    null = model.null_context(b, context.shape[1])
    for step in range(steps):
        progress = (step + 1) / steps
        is_masked = ids == mask_id
        cond = model.logits(ids, context, frames=frames)
        uncond = model.logits(ids, null)  # the null condition has no frame embedding
        log_probs = F.log_softmax(cond + guidance * (cond - uncond), dim=-1)  # (b, n, vocab)
        sample_temperature = temperature * (1 - step / steps)
        if sample_temperature > 0:
            sampled = (log_probs / sample_temperature + gumbel(log_probs.shape)).argmax(-1)
        else:
            sampled = log_probs.argmax(-1)
        confidence = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        noise_scale = temperature * (1 - progress)
        if noise_scale > 0:
            confidence = confidence + noise_scale * gumbel(confidence.shape)
        confidence = confidence.masked_fill(~is_masked, math.inf)
        ids = torch.where(is_masked, sampled, ids)
        num_remask = int(math.floor(float(schedule_fn(progress)) * n))
        num_remask = min(num_remask, int(is_masked.sum(-1).min()) - 1)
        if num_remask > 0:
            ranks = confidence.argsort(dim=-1).argsort(dim=-1)
            ids = ids.masked_fill(ranks < num_remask, mask_id)
    return ids


def matmul_peak_gflops(device: torch.device, size: int = 2048, repeats: int = 8) -> float:
    """Best fp32 ``size x size`` matmul throughput in GFLOP/s."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        (a @ b).sum().item() if device.type == "cuda" else a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def quality_at_steps(work: Path, step_counts: tuple[int, int], guidance: float, options: tuple[dict, dict],
                     device: torch.device, seed: int) -> dict:
    """In-sector SSIM (generated vs the real held-out clip, inside the clip's own ultrasound sector,
    frames after the primed first) and the ECG-control score of the demo-size models
    ``bench/quality.py --save`` left in ``work``, at each step count: ``{"ssim_default_steps",
    "ssim_18_steps", "ecg_sync_default_steps", "ecg_sync_18_steps"}``."""
    from bench.quality import load_clips, nanmean, reconstruct, to_uint8
    from echopulse.evaluate import fidelity, sector_masks, sync_scores
    from echopulse.models.generator import MaskGIT as Generator
    from echopulse.models.tokenizer import VideoTokenizer
    from jobs.recipes import demo
    from safetensors.torch import load_model

    recipe = demo()
    tokenizer = VideoTokenizer(recipe.tokenizer).to(device).eval()
    generator = Generator(recipe.generator).to(device).eval()
    load_model(tokenizer, str(work / "tokenizer.safetensors"), device=str(device))
    load_model(generator, str(work / "generator.safetensors"), device=str(device))
    held = load_clips(work / "clips.npz")["heldout"]
    ids, _ = reconstruct(tokenizer, held["frames"])
    out = {"quality_models": str(work), "quality_clips": int(len(held["frames"])), "quality_ssim": "in-sector"}
    for name, k, opts in zip(("default_steps", "18_steps"), step_counts, options):
        videos = []
        with torch.inference_mode():
            for i in range(0, len(ids), 8):
                tokens = sample(generator, torch.from_numpy(held["ecg"][i:i + 8]), steps=k, guidance=guidance,
                                seed=seed + i, prime_tokens=ids[i:i + 8, :1], **opts)
                videos.append(to_uint8(tokenizer.decode_from_indices(tokens.to(device))))
        videos = np.concatenate(videos)
        scores = fidelity(videos, held["frames"], masks=sector_masks(held["frames"]), first=1)
        out[f"ssim_{name}"] = round(nanmean(scores["sector_ssim"]), 4)
        out[f"ecg_sync_{name}"] = round(nanmean(sync_scores(videos, held["ecg"], np.asarray(held["fps"]),
                                                            held["heart_rate_bpm"])), 4)
        log.info("quality at %d steps: SSIM %.4f, ECG sync %.4f", k, out[f"ssim_{name}"], out[f"ecg_sync_{name}"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "demo", "paper"), default="paper",
                        help="generator size from this recipe (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default: the recipe's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance weight (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=1, help="clips per call (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--gpu-batch", type=int, default=32, help="on a GPU, also time this batch (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-reference", action="store_true", help="time only our sampler")
    parser.add_argument("--order", default=None, choices=("confidence", "halton"),
                        help="our sampler's decoding order at the default steps (default: the recipe's); "
                             "the 18-step comparison always runs the earlier default, confidence order")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="our sampler's precision (default: %(default)s)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile our per-step network with this mode, e.g. reduce-overhead")
    parser.add_argument("--compile-backend", default="inductor", help="(default: %(default)s)")
    parser.add_argument("--batch-sweep", default="", metavar="B,B,...",
                        help="also time our sampler at these batch sizes (clips/s), e.g. 1,8,32,128")
    parser.add_argument("--quality", default=None, metavar="DIR",
                        help="also score held-out clips at the default steps and at 18 with the demo-size "
                             "models bench/quality.py --save --clips DIR/clips.npz --workdir DIR left in DIR")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = pick_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    recipe = get_recipe(args.size)
    cfg = recipe.generator
    steps = args.steps or recipe.sampling.steps
    guidance = recipe.sampling.guidance if args.guidance is None else args.guidance
    torch.manual_seed(args.seed)
    model = MaskGIT(cfg).to(device).eval().requires_grad_(False)  # inference only
    ecg = torch.randn(args.batch, cfg.ecg.leads, cfg.ecg.samples,
                      generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    params = sum(p.numel() for p in model.parameters())
    log.info("%s generator: %.1fM parameters, %d tokens, vocab %d; %s, %d threads",
             args.size, params / 1e6, cfg.seq_len, cfg.vocab_size, device, torch.get_num_threads())

    args.order = args.order or recipe.sampling.order
    options = {"order": args.order, "precision": args.precision, "compile_mode": args.compile,
               "compile_backend": args.compile_backend}
    baseline = {**options, "order": "confidence"}  # the 18-step comparison: the earlier default

    def ours(batch_ecg=ecg, n_steps=steps, opts=options):
        return sample(model, batch_ecg, steps=n_steps, guidance=guidance, seed=args.seed, **opts)

    def reference(n_steps=steps):
        return reference_sample(model, ecg, n_steps, guidance, seed=args.seed)

    # warm-up (allocator, kernels), not counted
    ours(n_steps=2)
    if args.compile:  # the compiled graph is shaped by the batch only: warm it at the timed steps too
        ours()
    if not args.skip_reference:
        reference(n_steps=1)

    peaks = [matmul_peak_gflops(device)]
    reference_s = float("nan")
    if not args.skip_reference:
        log.info("reference loop: %d steps ...", steps)
        reference_s, _ = timed(reference, device)
        peaks.append(matmul_peak_gflops(device))
    log.info("our sampler: %d steps ...", steps)
    ours_s, tokens = timed(ours, device)
    peaks.append(matmul_peak_gflops(device))
    peak = max(peaks)
    load = os.getloadavg()

    long_s = ours_s
    if steps != 18 or args.order != "confidence":
        log.info("our sampler: 18 steps, confidence order ...")
        long_s, _ = timed(lambda: ours(n_steps=18, opts=baseline), device)
    plain = {**options, "compile_mode": None}  # FLOPs are counted on the eager graph
    ours_flops, again = count_flops(lambda: sample(model, ecg, steps=steps, guidance=guidance, seed=args.seed,
                                                   **plain))
    if args.precision == "fp32":  # a second run: also checks that a seed gives the same clip
        assert torch.equal(again, tokens), "the sampler is not deterministic"
    encode_flops = count_flops(lambda: (model.encode_ecg(ecg), model.encode_ecg_frames(ecg)))[0]
    reference_step_flops = count_flops(lambda: reference(n_steps=1))[0] - encode_flops
    reference_flops = encode_flops + steps * reference_step_flops  # every step does the same work

    clips = args.batch
    ours_gflops = ours_flops / ours_s / 1e9
    result = {
        "size": args.size, "tokens": cfg.seq_len, "vocab": cfg.vocab_size, "dim": cfg.dim,
        "depth": cfg.depth, "heads": cfg.heads, "ecg_tokens": cfg.ecg.leads * cfg.ecg.samples // cfg.ecg.patch,
        "steps": steps, "guidance": guidance, "batch": clips, "device": str(device),
        "machine": _cpu_name(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": [round(x, 2) for x in load],
        "peak_gflops": round(peak, 1), "peak_gflops_samples": [round(p, 1) for p in peaks],
        "ours_s_per_clip": round(ours_s / clips, 3),
        "reference_s_per_clip": round(reference_s / clips, 3) if not args.skip_reference else None,
        "speedup": round(reference_s / ours_s, 2) if not args.skip_reference else None,
        "time_ratio": round(reference_s / ours_s, 2) if not args.skip_reference else None,
        "flop_ratio": round(reference_flops / ours_flops, 2),
        "reference_noise_device": str(device),
        "ours_gflop_per_clip": round(ours_flops / clips / 1e9, 1),
        "reference_gflop_per_clip": round(reference_flops / clips / 1e9, 1),
        "ours_gflops": round(ours_gflops, 1),
        "reference_gflops": round(reference_flops / reference_s / 1e9, 1) if not args.skip_reference else None,
        "flops_utilization": round(ours_gflops / peak, 3),
        "order": args.order, "precision": args.precision, "compile": args.compile,
        "default_steps": steps,
        "s_per_clip_default_steps": round(ours_s / clips, 3),
        "s_per_clip_18_steps": round(long_s / clips, 3),
    }
    for size in [int(x) for x in args.batch_sweep.split(",") if x.strip()]:
        many = torch.randn(size, cfg.ecg.leads, cfg.ecg.samples,
                           generator=torch.Generator().manual_seed(args.seed + 3)).to(device)
        ours(many, 2)  # warm-up (and, compiled, the graph for this batch)
        if args.compile:
            ours(many)
        batch_s, _ = timed(lambda: ours(many), device)
        result[f"clips_per_s_batch{size}"] = round(size / batch_s, 2)
        log.info("batch %d: %.2f clips/s", size, size / batch_s)
    if args.quality:
        result.update(quality_at_steps(Path(args.quality), (steps, 18), guidance, (options, baseline), device,
                                       args.seed))
    if device.type == "cuda" and args.gpu_batch > 0:
        big = torch.randn(args.gpu_batch, cfg.ecg.leads, cfg.ecg.samples,
                          generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
        ours(big, 2)
        big_s, _ = timed(lambda: ours(big), device)
        result[f"clips_per_s_batch{args.gpu_batch}"] = round(args.gpu_batch / big_s, 2)
        result["gpu"] = torch.cuda.get_device_name(device)

    def ref(value, fmt: str) -> str:  # the reference's figure, or "-" when it was skipped
        width = int(fmt.split(".")[0])
        return format(value, fmt) if value is not None and value == value else format("-", f">{width}")
    print(f"\nsampler: {args.size} size ({cfg.seq_len} tokens, vocab {cfg.vocab_size}, dim {cfg.dim} x "
          f"depth {cfg.depth}, {result['ecg_tokens']} ECG tokens), {steps} steps, guidance {guidance}, "
          f"batch {clips}; {device}, {torch.get_num_threads()} threads, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'':<26}{'reference':>12}{'ours':>12}{'ratio':>8}")
    print(f"{'seconds per clip':<26}{ref(result['reference_s_per_clip'], '12.2f')}{ours_s / clips:>12.2f}"
          f"{ref(result['speedup'], '8.2f')}")
    print(f"{'GFLOP per clip':<26}{reference_flops / clips / 1e9:>12.0f}{ours_flops / clips / 1e9:>12.0f}"
          f"{reference_flops / ours_flops:>8.2f}")
    print(f"{'GFLOP/s':<26}{ref(result['reference_gflops'], '12.1f')}{ours_gflops:>12.1f}")
    print(f"{'utilization of ' + format(peak, '.0f') + ' GFLOP/s':<26}"
          f"{ref(result['reference_gflops'] and result['reference_gflops'] / peak, '12.2f')}"
          f"{result['flops_utilization']:>12.2f}")
    for key in result:
        if key.startswith("clips_per_s_batch"):
            print(f"{'clips/s at batch ' + key.rsplit('batch', 1)[1]:<26}{'':>12}{result[key]:>12.2f}")
    print(f"{'s/clip at ' + str(steps) + ' / 18 steps':<26}{'':>12}{result['s_per_clip_default_steps']:>12.2f}"
          f"{result['s_per_clip_18_steps']:>8.2f}")
    for name in ("default_steps", "18_steps"):
        if f"ssim_{name}" in result:
            print(f"{'SSIM / ECG sync, ' + name.replace('_', ' '):<26}{result[f'ssim_{name}']:>12.4f}"
                  f"{result[f'ecg_sync_{name}']:>12.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
