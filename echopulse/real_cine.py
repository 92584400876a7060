"""A real echo the phantom never was: how well a tokenizer reconstructs pydicom-data's SonoSite cine.

A tokenizer trained only on phantom clips can score well on held-out phantom clips and still
redraw a real echo as phantom chambers in a phantom fan. :func:`real_cine_fidelity` measures that
on the one real cardiac cine the project can ship a reference to: ``color3d_jpeg_baseline.dcm``
of pydicom-data (SonoSite, apical four-chamber, 120 frames at 30 fps, MIT licence; a test
dependency, never downloaded here). The cine is cut by the ingest stage's own per-input function
(:func:`echopulse.ingest.make_ingest_fn`: region crop, sector mask with a black background, window
clips at the recipe's geometry), i.e. into the clips a user ingesting it would get, and scored in
and outside its sector like every reconstruction (:mod:`echopulse.evaluate`).
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np

from echopulse.evaluate import fidelity, reconstruct, sector_masks

log = logging.getLogger(__name__)

VENDOR_CINE = "color3d_jpeg_baseline.dcm"  # pydicom-data: SonoSite, A4C, 120 frames, MIT licence


def vendor_cine_path(name: str = VENDOR_CINE) -> str | None:
    """Path of a pydicom-data file, or None when pydicom-data is not installed (never downloads)."""
    try:
        from pydicom.data import get_testdata_file

        return get_testdata_file(name, download=False) or None
    except Exception:  # pydicom's external-source lookup: anything but a path means "absent"
        return None


def real_cine_clips(clip, path: str | None = None) -> np.ndarray:
    """The SonoSite cine as the ingest stage cuts it: uint8 (N, clip.frames, clip.size, clip.size).

    Args:
        clip: the clip geometry (:class:`echopulse.config.ClipConfig`, e.g. a recipe's ``clip``).
        path: the DICOM file (default: pydicom-data's SonoSite cine).

    Raises:
        FileNotFoundError: no path given and pydicom-data is not installed.
    """
    from echopulse.ingest import IngestOptions, make_ingest_fn

    path = path or vendor_cine_path()
    if not path:
        raise FileNotFoundError(f"{VENDOR_CINE} not found: install pydicom-data (the test extra)")
    with tempfile.TemporaryDirectory(prefix="real-cine-") as base:
        cut = make_ingest_fn(clip, base_dir=base, salt="real-cine", options=IngestOptions(clip_mode="window"))
        clips = cut({"echo": str(path), "ecg": "", "view": "A4C"})
    if not clips:
        raise ValueError(f"{path}: no {clip.frames}-frame clip at {clip.fps} fps fits in the cine")
    return np.stack([np.asarray(c["frames"], np.uint8).reshape(clip.frames, clip.size, clip.size)
                     for c in clips])


def reconstruction_scores(recon: np.ndarray, real: np.ndarray, device=None) -> dict[str, float]:
    """Mean per-clip PSNR (dB) and SSIM of ``recon`` against ``real`` (uint8 (N, T, H, W)), over
    the whole frame and inside each real clip's own sector (:func:`echopulse.evaluate.sector_masks`).
    Keys ``psnr_db``, ``ssim``, ``insector_psnr_db``, ``insector_ssim``, ``clips``."""
    scores = fidelity(recon, real, sector_masks(real), device=device)

    def mean(key: str) -> float:
        v = scores[key][~np.isnan(scores[key])]
        return float(np.mean(v)) if len(v) else float("nan")

    return {"psnr_db": mean("psnr"), "ssim": mean("ssim"), "insector_psnr_db": mean("sector_psnr"),
            "insector_ssim": mean("sector_ssim"), "clips": int(len(real))}


def real_cine_fidelity(tokenizer, clip, path: str | None = None, device=None, batch: int = 8,
                       clips: np.ndarray | None = None) -> dict[str, float]:
    """How well ``tokenizer`` reconstructs the real SonoSite cine (:func:`reconstruction_scores`).

    Args:
        tokenizer: a :class:`echopulse.models.tokenizer.VideoTokenizer` for ``clip``'s geometry
            (left in the train/eval mode it came in).
        clip: the clip geometry the tokenizer was trained on.
        path: the DICOM file (default: pydicom-data's SonoSite cine).
        device: where to run (default: the tokenizer's).
        batch: clips per forward pass.
        clips: the clips of :func:`real_cine_clips` when already cut (skips the DICOM decode).
    """
    real = real_cine_clips(clip, path) if clips is None else clips
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        recon = reconstruct(tokenizer, real, batch, device=device)
    finally:
        tokenizer.train(was_training)
    out = reconstruction_scores(recon, real, device=device)
    log.info("real cine: PSNR %.2f dB in-sector (%.2f whole frame), SSIM %.3f in-sector over %d clips",
             out["insector_psnr_db"], out["psnr_db"], out["insector_ssim"], out["clips"])
    return out
