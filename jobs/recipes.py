"""Named run recipes: plain functions deriving from one another (``tiny`` -> ``demo`` -> ``paper``).

``get_recipe`` also accepts a JSON file (for example the best config a sweep wrote).
"""

from __future__ import annotations

import json
from pathlib import Path

from echopulse.config import (
    ClipConfig,
    ECGEncoderConfig,
    GeneratorConfig,
    Recipe,
    SamplingConfig,
    TokenizerConfig,
    TrainConfig,
    TuneConfig,
    from_dict,
    replace,
)
from echopulse.errors import ConfigError


# Guidance comes from measurement, not from the paper. Whether it helps depends on the model
# (BENCHMARKS.md: on the old tokenizer the ECG-control score fell as guidance rose, 0.797 at g=0 to
# 0.643 at g=3; with the stop-30 patch embedding g=1 gained +0.02 and +0.10 on two demo pairs and
# lost 0.12 motion agreement on the `make demo` model), so every recipe samples at g=0 and tries
# `SamplingConfig.guidance_candidates` on the validation split when generator training ends
# (echopulse.calibration): a weight replaces 0 in the checkpoint only when it beats g=0 there by
# more than two standard errors.
#
# Steps: at demo size 8 steps match 18 on held-out clips (in-sector SSIM 0.667 vs 0.662, ECG control
# 0.838 vs 0.819 in confidence order; Halton order at 8 steps 0.674 / 0.827), so no recipe pays for
# 18. The paper recipe takes Halton order at 8 steps: 9.3 s per paper-size clip on 2 CPU cores
# against 38 s at 18 (BENCHMARKS.md); `echopulse tune --sampling-steps` re-picks on validation.


def _generator_for(tokenizer: TokenizerConfig, ecg: ECGEncoderConfig, clip: ClipConfig,
                   **kw) -> GeneratorConfig:
    return GeneratorConfig(vocab_size=tokenizer.codebook_size, token_grid=tokenizer.token_grid,
                           ecg=ecg, fps=clip.fps, temporal_patch=tokenizer.temporal_patch, **kw)


def tiny() -> Recipe:
    """Seconds on a CPU: every test uses this one."""
    clip = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)
    tokenizer = TokenizerConfig(frames=5, image_size=32, patch_size=8, dim=64, spatial_depth=2,
                                temporal_depth=1, heads=4, fsq_levels=(5, 5, 5))
    ecg = ECGEncoderConfig(samples=clip.ecg_samples, patch=75, dim=64, depth=2, heads=4)
    return Recipe(
        name="tiny",
        clip=clip,
        tokenizer=tokenizer,
        generator=_generator_for(tokenizer, ecg, clip, dim=64, depth=2, heads=4),
        tokenizer_train=TrainConfig(steps=40, batch_size=8, lr=2e-3, warmup_steps=5, log_every=10),
        generator_train=TrainConfig(steps=40, batch_size=8, lr=1e-3, warmup_steps=5, log_every=10),
        sampling=SamplingConfig(steps=4, guidance=0.0),
        tune=TuneConfig(trials=2, steps=15, schedules=("cosine", "linear"), sampling_steps=(2, 4),
                        eval_clips=2),
        synth_studies=4,
        synth_seconds=3.0,
    )


def demo() -> Recipe:
    """Minutes on 2 CPU cores: what ``make demo`` runs."""
    base = tiny()
    clip = ClipConfig(frames=11, size=64, fps=10.0, ecg_samples=300)
    # temporal patch 2 (pairs of frames per token frame, 384 tokens per clip): minutes to train.
    # Pairs at 10 fps smear beats above ~110 bpm; demo48 uses one frame per token frame with a
    # frame-local encoder (704 tokens, ~1.9x the generator's time), which beats at 50-130 bpm
    # (BENCHMARKS.md, "A frame-local tokenizer").
    tokenizer = replace(base.tokenizer, frames=11, image_size=64, dim=96, fsq_levels=(8, 5, 5, 5))
    ecg = replace(base.generator.ecg, samples=clip.ecg_samples, dim=96)
    return replace(
        base,
        name="demo",
        clip=clip,
        tokenizer=tokenizer,
        generator=_generator_for(tokenizer, ecg, clip, dim=128, depth=3, heads=4),
        tokenizer_train=replace(base.tokenizer_train, steps=500, batch_size=8, log_every=25),
        generator_train=replace(base.generator_train, steps=400, batch_size=8, log_every=25),
        sampling=SamplingConfig(steps=8, guidance=0.0),  # measured, see above
        tune=TuneConfig(trials=2, steps=60, schedules=("cosine", "linear", "square", "sqrt"),
                        sampling_steps=(4, 8, 12), eval_clips=4),
        synth_studies=16,
        synth_seconds=6.0,
    )


def demo48() -> Recipe:
    """``demo`` trained long enough to beat with its ECG: ~45 minutes on 2 CPU cores.

    48 phantom studies cut every 0.3 s (814 clips), tokenizer 1200 and generator 2500 steps,
    validation every 250 steps (every logged step would cost more than the training). One frame
    per token frame, encoded frame by frame (``frame_local_encoder``): pairs of frames at 10 fps
    smear every other systole above ~110 bpm, and a causal per-frame encoder gives ids that depend
    on their window, so chained windows drifted. Measured 2026-12-05 (BENCHMARKS.md, "A
    frame-local tokenizer"): its 8 s videos beat within 5 bpm of every held-out phantom ECG at
    50-130 bpm, of pydicom's real 12-lead ECG and of a single-lead watch export (33 of 33 over
    three seeds), and the quickstart's held-out 124-bpm video reads 122 bpm.
    """
    base = demo()
    tokenizer = replace(base.tokenizer, temporal_patch=1, frame_local_encoder=True)
    return replace(
        base,
        name="demo48",
        clip=replace(base.clip, stride_s=0.3),
        tokenizer=tokenizer,
        generator=replace(base.generator, token_grid=tokenizer.token_grid, temporal_patch=1),
        tokenizer_train=replace(base.tokenizer_train, steps=1200, val_every=250),
        generator_train=replace(base.generator_train, steps=2500, warmup_steps=20, val_every=250),
        synth_studies=48,
    )


def paper() -> Recipe:
    """The paper's size: 128x128, 11 frames, 1536 tokens per clip, generator dim 512 / depth 6 / 8 heads."""
    base = demo()
    clip = ClipConfig(frames=11, size=128, fps=10.0, ecg_samples=2250)
    # the paper's temporal patch of 2 (6 token frames); at 10 fps it smears beats above ~110 bpm
    # (see demo; docs/architecture.md, "Temporal patch")
    tokenizer = replace(base.tokenizer, image_size=128, dim=256, spatial_depth=4, temporal_depth=4,
                        heads=8, fsq_levels=(8, 8, 8, 5, 5, 5))
    # the released ST-MEM encoder is ViT-B/75 (width 768, depth 12, 12 heads of 64, 2250 samples
    # at 250 Hz in patches of 75): `--ecg-checkpoint encoder.pth` loads it one-to-one
    ecg = ECGEncoderConfig(samples=2250, patch=75, dim=768, depth=12, heads=12)
    return replace(
        base,
        name="paper",
        clip=clip,
        tokenizer=tokenizer,
        generator=_generator_for(tokenizer, ecg, clip, dim=512, depth=6, heads=8),
        # validation and sample GIFs every logged step would dominate a long run
        tokenizer_train=replace(base.tokenizer_train, steps=100_000, batch_size=32, lr=1e-4,
                                warmup_steps=2000, val_every=1000, sample_every=5000,
                                checkpoint_every=5000),
        generator_train=replace(base.generator_train, steps=100_000, batch_size=32, lr=1e-4,
                                warmup_steps=2000, val_every=1000, sample_every=5000,
                                checkpoint_every=5000),
        sampling=SamplingConfig(steps=8, guidance=0.0, order="halton"),  # measured, see above
        synth_studies=200,
        synth_seconds=12.0,
    )


RECIPES = {"tiny": tiny, "demo": demo, "demo48": demo48, "paper": paper}


def get_recipe(name_or_path: str) -> Recipe:
    """A named recipe, or a recipe JSON file (as written by ``echopulse tune``)."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.exists():
            raise ConfigError(f"{path}: recipe file not found")
        try:
            return from_dict(Recipe, json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a valid recipe ({exc})") from exc
    raise ConfigError(f"unknown recipe {name_or_path!r}: use one of {', '.join(RECIPES)} or a .json file")
