"""Pick a generator's guidance weight on its validation split, from pixels.

Whether classifier-free guidance helps depends on the model (BENCHMARKS.md: +0.10 ECG control on one
demo pair, a loss on another), so the weight is measured per model instead of fixed by a recipe.
For each validation clip the generator draws a clip from the clip's own ECG, primed with its first
token frame (as a video's first window is when a first frame is given, and as evaluation primes), at
every candidate weight and a few seeds; the score is
:func:`echopulse.metrics.motion_agreement` of the decoded clip against the clip the ECG was recorded
with (the tokenizer's decoding of its tokens). A weight other than 0 is picked only when its paired
gain over g=0 is positive by more than ``MARGIN_SE`` standard errors; the best such weight wins.

Plain functions; ``jobs/train_generator.py`` runs :func:`measure_checkpoint` in a Ray task (a GPU
when the cluster has them) on the exported checkpoint and :func:`write_calibration` before upload.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from echopulse.config import SamplingConfig

log = logging.getLogger(__name__)

MARGIN_SE = 2.0  # a weight must beat g=0 by this many standard errors of the paired gain
BATCH = 16  # clips sampled at once


@dataclass(frozen=True)
class GuidanceCalibration:
    """What :func:`calibrate_guidance` measured: per candidate weight the mean motion agreement,
    the mean paired gain over g=0 and its standard error; the picked weight."""

    candidates: tuple[float, ...]
    scores: tuple[float, ...]
    gains: tuple[float, ...]
    gain_se: tuple[float, ...]
    picked: float
    clips: int
    seeds: int

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuidanceCalibration":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _decode_uint8(tokenizer, ids) -> np.ndarray:
    import torch

    with torch.inference_mode():
        video = tokenizer.decode_from_indices(ids.to(next(tokenizer.parameters()).device))
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _draw(generator, tokenizer, ecg, prime, weight: float, sampling: SamplingConfig, seed: int,
          conditions: dict[str, Any]) -> np.ndarray:
    """uint8 clips sampled at guidance ``weight`` for each ECG (in batches of ``BATCH``)."""
    import torch

    from echopulse.models.sampling import sample
    from echopulse.transforms.ecg import shifted_ecg

    out = []
    for k in range(0, len(ecg), BATCH):
        part = slice(k, k + BATCH)
        extra = {name: value[part] for name, value in conditions.items() if value is not None}
        if sampling.negative == "shifted" and weight:
            extra["negative_ecg"] = torch.from_numpy(shifted_ecg(ecg[part].cpu().numpy())).to(ecg.device)
        ids = sample(generator, ecg[part], steps=sampling.steps, guidance=weight,
                     temperature=sampling.temperature, schedule=sampling.schedule, order=sampling.order,
                     seed=[seed + i for i in range(k, k + len(ecg[part]))], prime_tokens=prime[part], **extra)
        out.append(_decode_uint8(tokenizer, ids))
    return np.concatenate(out)


def pick_weight(candidates: tuple[float, ...], per_clip: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(picked, gains, gain_se)`` from ``per_clip`` ``(candidates, clips)`` scores (seed means):
    the best-scoring weight whose mean gain over the g=0 row exceeds ``MARGIN_SE`` standard errors,
    else 0."""
    base = candidates.index(0.0)
    diff = per_clip - per_clip[base]
    n = per_clip.shape[1]
    gains = diff.mean(axis=1)
    se = diff.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(candidates), np.inf)
    means = per_clip.mean(axis=1)
    ok = [i for i in range(len(candidates)) if i != base and gains[i] > MARGIN_SE * se[i]]
    picked = candidates[max(ok, key=lambda i: means[i])] if ok else 0.0
    return float(picked), gains, se


def calibrate_guidance(generator, tokenizer, tokens: np.ndarray, ecg: np.ndarray, sampling: SamplingConfig,
                       conditions: dict[str, Any] | None = None) -> GuidanceCalibration:
    """Score each of ``sampling.guidance_candidates`` (0 is always scored) on validation clips.

    Args:
        generator, tokenizer: the trained pair (eval mode is set while sampling).
        tokens: ``(n, tokens_per_clip)`` or ``(n, t', h', w')`` token ids of validation clips.
        ecg: ``(n, 12, L)`` their standardized ECGs.
        sampling: the checkpoint's sampling settings (steps, temperature, schedule, order,
            negative, candidates, seeds).
        conditions: ``view``/``ef``/``lead_mask`` tensors with one row per clip, when the model
            conditions on them.

    Raises:
        ValueError: fewer than two clips whose reference clip moves.
    """
    import torch

    from echopulse.metrics import motion_agreement

    device = next(generator.parameters()).device
    grid = tuple(generator.cfg.token_grid)
    ids = torch.as_tensor(np.asarray(tokens)).long().reshape(-1, *grid).to(device)
    ecg_t = torch.as_tensor(np.asarray(ecg), dtype=torch.float32).to(device)
    conditions = {k: None if v is None else torch.as_tensor(v).to(device) for k, v in (conditions or {}).items()}
    reference = _decode_uint8(tokenizer, ids)
    prime = ids[:, :1]  # the first token frame: one frame of pixels (a causal tokenizer codes it alone)
    candidates = tuple(sorted({0.0, *map(float, sampling.guidance_candidates)}))
    seeds = sampling.calibration_seeds
    scores = np.full((len(candidates), seeds, len(ids)), np.nan)
    for c, weight in enumerate(candidates):
        for s in range(seeds):
            drawn = _draw(generator, tokenizer, ecg_t, prime, weight, sampling, 1000 * s, conditions)
            scores[c, s] = [motion_agreement(g, r, first=1) for g, r in zip(drawn, reference)]
    moving = np.isfinite(scores).all(axis=(0, 1))
    if moving.sum() < 2:
        raise ValueError(f"guidance calibration needs two validation clips that move; {int(moving.sum())} of "
                         f"{len(ids)} do")
    per_clip = scores[:, :, moving].mean(axis=1)
    picked, gains, se = pick_weight(candidates, per_clip)
    return GuidanceCalibration(candidates, tuple(per_clip.mean(axis=1).round(4).tolist()),
                               tuple(gains.round(4).tolist()), tuple(se.round(4).tolist()), picked,
                               int(moving.sum()), seeds)


def measure_checkpoint(directory: str, batch: dict[str, Any], device: str | None = None,
                       overrides: dict[str, Any] | None = None) -> GuidanceCalibration | None:
    """:func:`calibrate_guidance` for the generator checkpoint in local ``directory`` (tokenizer
    bundled in ``tokenizer/``) on up to ``calibration_clips`` rows of ``batch`` (``tokens``, ``ecg``
    and the conditions it has: validation rows). ``None`` when its sampling has no candidates.
    ``device``: where to sample (default: CUDA when this process has it); ``overrides``: sampling
    fields to use instead of the checkpoint's (``guidance_candidates``, ``calibration_clips``, ...)."""
    import torch

    from echopulse.config import from_dict
    from echopulse.models.checkpoint import load_checkpoint
    from echopulse.training.steps import generator_conditions

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator, _, info = load_checkpoint(directory, expected_kind="generator", map_location=dev)
    sampling = from_dict(SamplingConfig, {**info["extra"]["sampling"], **(overrides or {})})
    if not sampling.guidance_candidates:
        return None
    tokenizer, _, _ = load_checkpoint(os.path.join(directory, "tokenizer"), expected_kind="tokenizer",
                                      map_location=dev)
    n = min(len(batch["tokens"]), sampling.calibration_clips)
    conditions = generator_conditions(generator, {k: v[:n] for k, v in batch.items()}, dev)
    ecg = np.stack(list(batch["ecg"][:n])).astype(np.float32).reshape(n, 12, -1)  # Parquet lists come flat
    return calibrate_guidance(generator, tokenizer, np.stack(list(batch["tokens"][:n])), ecg, sampling, conditions)


def write_calibration(directory: str, result: GuidanceCalibration) -> None:
    """Make ``result.picked`` the guidance of the checkpoint in local ``directory``
    (``extra["sampling"]["guidance"]``) and keep the measurement in ``extra["guidance_calibration"]``."""
    from echopulse.models.checkpoint import read_checkpoint_info, update_extra

    sampling = read_checkpoint_info(directory)["extra"]["sampling"]
    update_extra(directory, {"sampling": {**sampling, "guidance": result.picked},
                             "guidance_calibration": result.to_dict()})
    log.info("guidance calibrated on %d validation clips: %s -> %g", result.clips,
             ", ".join(f"g={c:g} {s:.3f}" for c, s in zip(result.candidates, result.scores)), result.picked)


def calibrate_checkpoint(directory: str, batch: dict[str, Any], device: str | None = None
                         ) -> GuidanceCalibration | None:
    """:func:`measure_checkpoint` then :func:`write_calibration` (nothing written without candidates)."""
    result = measure_checkpoint(directory, batch, device)
    if result is not None:
        write_calibration(directory, result)
    return result
