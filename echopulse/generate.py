"""ECG in, echo video out: load a generator checkpoint (tokenizer bundled) and sample."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from echopulse import storage
from echopulse.config import ClipConfig, SamplingConfig, from_dict
from echopulse.errors import EchoPulseError

log = logging.getLogger(__name__)


@dataclass
class EchoGenerator:
    """A generator and its tokenizer, ready to turn prepared ECGs into videos."""

    generator: Any
    tokenizer: Any
    clip: ClipConfig
    sampling: SamplingConfig
    info: dict[str, Any]

    @classmethod
    def from_checkpoint(cls, checkpoint: str) -> "EchoGenerator":
        """Load a generator checkpoint directory written by ``echopulse train generator``."""
        from echopulse.models.checkpoint import load_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            local = storage.local_copy(checkpoint, tmp)
            generator, _, info = load_checkpoint(local, expected_kind="generator")
            tokenizer_dir = os.path.join(local, "tokenizer")
            if not os.path.isdir(tokenizer_dir):
                raise EchoPulseError(f"{checkpoint}: generator checkpoint has no bundled tokenizer/")
            tokenizer, _, tok_info = load_checkpoint(tokenizer_dir, expected_kind="tokenizer")
        extra = info.get("extra", {})
        if extra.get("tokenizer_id") != tok_info["model_id"]:
            raise EchoPulseError(f"{checkpoint}: bundled tokenizer {tok_info['model_id']} is not the "
                                 f"one the generator was trained with ({extra.get('tokenizer_id')})")
        generator.eval()
        tokenizer.eval()
        return cls(generator, tokenizer, from_dict(ClipConfig, extra["clip"]),
                   from_dict(SamplingConfig, extra["sampling"]), info)

    def generate(self, ecg: np.ndarray, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, temperature: float | None = None) -> np.ndarray:
        """Generate one clip from a prepared ECG.

        Args:
            ecg: float32 (12, L) at 250 Hz, filtered and standardized (``prepare_ecg``); the first
                ``clip.ecg_samples`` samples condition the clip.
            seed: sampling seed (same seed, same video).
            steps, guidance, temperature: override the checkpoint's sampling settings.

        Returns:
            uint8 frames (T, H, W) at ``self.clip.fps``.
        """
        import torch

        need = self.clip.ecg_samples
        if ecg.ndim != 2 or ecg.shape[0] != 12:
            raise ValueError(f"expected an ECG of shape (12, L), got {ecg.shape}")
        if ecg.shape[1] < need:
            raise EchoPulseError(f"the ECG is {ecg.shape[1] / 250:.2f} s long; this model needs "
                                 f"{need / 250:.2f} s")
        s = self.sampling
        window = torch.as_tensor(np.ascontiguousarray(ecg[:, :need]), dtype=torch.float32)[None]
        with torch.inference_mode():
            tokens = self.generator.generate(
                window,
                steps=steps or s.steps,
                guidance=s.guidance if guidance is None else guidance,
                temperature=s.temperature if temperature is None else temperature,
                schedule=s.schedule,
                seed=seed,
            )
            video = self.tokenizer.decode_from_indices(tokens)  # (1, t, h, w) in [0, 1]
        return (video[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def load_ecg_file(path: str):
    """Read any supported ECG file and prepare it (250 Hz, 12 leads, filtered, standardized)."""
    from echopulse.io.ecg import read_ecg
    from echopulse.transforms.ecg import prepare_ecg

    if not os.path.exists(path):
        raise EchoPulseError(f"{path}: ECG file not found")
    signal, meta = read_ecg(path)
    return prepare_ecg(signal, meta["fs"], meta["leads"])


def generate_to_file(checkpoint: str, ecg_path: str, out: str, seed: int = 0,
                     steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    """``echopulse generate``: an ECG file in, a .gif/.mp4 out. Returns a small report."""
    from echopulse.video_out import check_video_path, write_video

    check_video_path(out)
    model = EchoGenerator.from_checkpoint(checkpoint)
    prepared = load_ecg_file(ecg_path)
    frames = model.generate(prepared.ecg, seed=seed, steps=steps, guidance=guidance)
    upscale = max(1, 256 // frames.shape[-1])
    path = write_video(frames, model.clip.fps, out, upscale=upscale)
    return {"out": str(path), "frames": int(frames.shape[0]), "fps": model.clip.fps,
            "size": list(frames.shape[1:]), "upscale": upscale}
