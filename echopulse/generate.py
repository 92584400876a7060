"""ECG in, echo video out: load a generator checkpoint (tokenizer bundled) and sample.

A video longer than the model's window is made of chained windows: each new window is primed
with the ``GeneratorConfig.chain_prime_token_frames`` leading token frames that overlap the
previous window -- its first token frame re-encoded from the one frame it starts on (a first-frame
prime, as training shows), the rest the previous window's own generated token ids, not pixels
re-encoded -- and takes the ECG from its own start time. Training primes rows with exactly that
many token frames. Pixels that were background (black) throughout the first window are re-anchored
to the first window's value in every later window, so tokenizer artefacts cannot accumulate
outside the sector; and each chained window is drawn up to ``SamplingConfig.window_candidates``
times until its mean frame keeps the first window's look (``window_accept_ssim``), so the view
does not drift. Any frame rate is resampled from the model's frames, so duration and rate follow
the request.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from echopulse.config import ECG_FS, ClipConfig, SamplingConfig, from_dict
from echopulse.errors import EchoPulseError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Window:
    """One model window of a chained video, in model frames.

    Attributes:
        start: index (at the model's frame rate) of the window's first frame.
        overlap: how many of its leading frames were already made (0 for the first window); they
            prime the window and are not emitted again.
        ecg_start: first ECG sample (at ``ECG_FS``) of the window's conditioning ECG.
    """

    start: int
    overlap: int
    ecg_start: int


def _ecg_start(start: int, clip: ClipConfig) -> int:
    """First ECG sample (at ``ECG_FS``) of the window whose first frame is ``start``."""
    return int(round(start / clip.fps * ECG_FS))


def last_window_start(clip: ClipConfig, ecg_samples: int) -> int:
    """The latest frame a window can start at with its whole conditioning ECG inside the ECG
    (-1 when not even the first window's fits)."""
    if clip.ecg_samples > ecg_samples:
        return -1
    start = 0
    while _ecg_start(start + 1, clip) + clip.ecg_samples <= ecg_samples:
        start += 1
    return start


def longest_video_s(clip: ClipConfig, ecg_samples: int) -> float:
    """The longest video (seconds at the model's frame rate) an ECG of ``ecg_samples`` samples can
    condition: its last window ends where the ECG's conditioning runs out (0 when none fits)."""
    start = last_window_start(clip, ecg_samples)
    return (start + clip.frames) / clip.fps if start >= 0 else 0.0


def plan_windows(model_frames: int, clip: ClipConfig, ecg_samples: int, temporal_patch: int = 2,
                 prime_token_frames: int = 1) -> list[Window]:
    """Where each window of a chained video starts.

    A window of ``clip.frames`` frames holds ``1 + (frames - 1) / temporal_patch`` token frames; an
    overlap of ``1 + temporal_patch * (k - 1)`` frames is exactly ``k`` leading token frames.
    Windows hop by ``frames - overlap``; the last one moves earlier (a longer overlap) if the ECG
    ends before a full hop's conditioning window (see :func:`prime_frames`).

    Args:
        model_frames: frames needed at the model's rate.
        clip: the model's clip geometry (frames, fps, ecg_samples).
        ecg_samples: samples the ECG holds at ``ECG_FS``.
        temporal_patch: the tokenizer's temporal patch.
        prime_token_frames: token frames each chained window is primed with (``k`` above).

    Raises:
        EchoPulseError: when the ECG does not cover the windows the video needs.
    """
    frames, need = clip.frames, clip.ecg_samples
    overlap = 1 + temporal_patch * (prime_token_frames - 1)
    if not 1 <= overlap < frames:
        raise ValueError(f"prime_token_frames={prime_token_frames} leaves nothing to generate in a "
                         f"{frames}-frame window")
    max_start = last_window_start(clip, ecg_samples)
    if max_start < 0 or max_start + frames < model_frames:
        video_s = (model_frames - 1) / clip.fps
        last_start = max(0, model_frames - frames)
        needed = max(need, _ecg_start(last_start, clip) + need) / ECG_FS
        raise EchoPulseError(
            f"the ECG is {ecg_samples / ECG_FS:.2f} s long; {video_s + 1 / clip.fps:.2f} s of video "
            f"needs {needed:.2f} s of ECG (each {clip.seconds:.2f} s window of this model is "
            f"conditioned on {need / ECG_FS:.2f} s of ECG)")
    windows = [Window(0, 0, 0)]
    end = frames - 1  # last frame made so far
    while end < model_frames - 1:
        start = min(end - overlap + 1, max_start)
        if start + frames - 1 <= end or start < 0:
            raise EchoPulseError(f"the ECG ({ecg_samples / ECG_FS:.2f} s) is too short for "
                                 f"{model_frames} frames at {clip.fps:g} fps")
        windows.append(Window(start, end - start + 1, _ecg_start(start, clip)))
        end = start + frames - 1
    return windows


def prime_frames(overlap: int, temporal_patch: int = 2) -> tuple[int, int]:
    """(frames, token frames) that prime a window overlapping ``overlap`` frames already made.

    The leading ``1 + temporal_patch * (k - 1)`` frames are exactly ``k`` token frames; with an
    overlap between two such counts, the last overlapping frames are sampled again and dropped.
    """
    k = 1 + (overlap - 1) // temporal_patch
    return 1 + temporal_patch * (k - 1), k


@dataclass
class EchoGenerator:
    """A generator and its tokenizer, ready to turn ECGs into videos."""

    generator: Any
    tokenizer: Any
    clip: ClipConfig
    sampling: SamplingConfig
    info: dict[str, Any]
    device: Any = field(default=None)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, device: str | None = None,
                        tracking_uri: str | None = None) -> "EchoGenerator":
        """Load a generator checkpoint directory written by ``echopulse train generator``.

        Args:
            checkpoint: local directory or URI, or an MLflow model URI (``models:/NAME@alias``,
                ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``).
            device: torch device (default: CPU).
            tracking_uri: MLflow tracking URI for model URIs (default: ``MLFLOW_TRACKING_URI``).
        """
        import torch

        from echopulse.models.checkpoint import load_checkpoint
        from echopulse.model_uri import local_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            local = local_checkpoint(checkpoint, tmp, tracking_uri)
            try:
                generator, _, info = load_checkpoint(local, expected_kind="generator")
            except ValueError as exc:
                raise EchoPulseError(f"{checkpoint}: {exc}") from None
            tokenizer_dir = os.path.join(local, "tokenizer")
            if not os.path.isdir(tokenizer_dir):
                raise EchoPulseError(f"{checkpoint}: generator checkpoint has no bundled tokenizer/")
            tokenizer, _, tok_info = load_checkpoint(tokenizer_dir, expected_kind="tokenizer")
        extra = info.get("extra", {})
        if extra.get("tokenizer_id") != tok_info["model_id"]:
            raise EchoPulseError(f"{checkpoint}: bundled tokenizer {tok_info['model_id']} is not the "
                                 f"one the generator was trained with ({extra.get('tokenizer_id')})")
        dev = torch.device(device or "cpu")
        generator.to(dev).eval()
        tokenizer.to(dev).eval()
        return cls(generator, tokenizer, from_dict(ClipConfig, extra["clip"]),
                   from_dict(SamplingConfig, extra["sampling"]), info, dev)

    @property
    def size(self) -> int:
        return self.clip.size

    def prime_token_frames(self) -> int:
        """Token frames a chained window is primed with (the generator's training used the same)."""
        return self.generator.cfg.chain_prime_token_frames

    def conditions(self, view: str | None = None, ef: float | None = None) -> dict[str, Any]:
        """The ``view``/``ef`` keyword arguments for this generator: ids and fractions as (1,)
        tensors; a condition left out is "unknown" (-1 / NaN), one the model lacks is refused.

        Raises:
            EchoPulseError: a view name this model does not know, an EF outside [0, 1], or a
                condition the model was not trained with.
        """
        import torch

        from echopulse.config import ECHO_VIEWS, view_id

        cfg = self.generator.cfg
        out: dict[str, Any] = {}
        if cfg.num_views > 0:
            vid = -1 if view is None else view_id(view, cfg.num_views)
            if view is not None and vid < 0:
                raise EchoPulseError(f"unknown view {view!r}; this model knows "
                                     f"{', '.join(ECHO_VIEWS[:cfg.num_views])}")
            out["view"] = torch.tensor([vid], device=self.device)
        elif view is not None:
            raise EchoPulseError("this model is not view-conditioned (trained with num_views = 0); "
                                 "leave out --view")
        if cfg.ef_conditioning:
            if ef is not None and not 0.0 <= float(ef) <= 1.0:
                raise EchoPulseError(f"--ef must be a fraction in [0, 1] (e.g. 0.55), got {ef}")
            out["ef"] = torch.tensor([float("nan") if ef is None else float(ef)], device=self.device)
        elif ef is not None:
            raise EchoPulseError("this model is not EF-conditioned (trained without ef_conditioning); "
                                 "leave out --ef")
        return out

    def generate(self, ecg: Any, first_frame: Any = None, seconds: float | None = None,
                 fps: float | None = None, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, temperature: float | None = None,
                 view: str | None = None, ef: float | None = None,
                 anchor_background: bool = True) -> np.ndarray:
        """Generate an echo video from an ECG.

        Args:
            ecg: an ECG file path (any format :func:`echopulse.io.ecg.read_ecg` reads), a
                :class:`~echopulse.transforms.ecg.PreparedECG`, or a prepared float array (12, L)
                at 250 Hz (``prepare_ecg``). Sample 0 is the time of the first frame.
            first_frame: optional first frame: an image path (PNG etc., exactly the model's size),
                an echo DICOM path (its first frame, cropped and resized like ingestion), or a
                uint8 array (size, size).
            seconds: video duration (default: one model window, ``clip.frames / clip.fps``).
            fps: output frame rate (default: the model's).
            seed: sampling seed (same seed, same video).
            steps, guidance, temperature: override the checkpoint's sampling settings;
                guidance g gives logits ``cond + g * (cond - uncond)`` (0: conditional only).
            view: echo view name (``A4C``, ...) for a view-conditioned model (default unknown).
            ef: ejection fraction in [0, 1] for an EF-conditioned model (default unknown).
            anchor_background: keep pixels that were black throughout the first window at the
                first window's value in later windows (see the module docstring).

        Returns:
            uint8 frames (round(seconds * fps), H, W).
        """
        signal, lead_mask = _ecg_array(ecg)
        conditions = self.conditions(view, ef)
        first = None if first_frame is None else load_first_frame(first_frame, self.size)
        model_frames, out_fps, n_out = self._frame_plan(seconds, fps, signal.shape[1])
        windows = plan_windows(model_frames, self.clip, signal.shape[1],
                               self.tokenizer.cfg.temporal_patch, self.prime_token_frames())
        video = self._sample_windows(signal, windows, first, seed, steps, guidance, temperature,
                                     {**conditions, "lead_mask": lead_mask}, anchor_background)
        video = video[:model_frames]
        if out_fps == self.clip.fps:
            return video[:n_out]
        from echopulse.transforms.video import sample_frames

        return sample_frames(video, self.clip.fps, np.arange(n_out) / out_fps)

    def _frame_plan(self, seconds: float | None, fps: float | None, ecg_samples: int) -> tuple[int, float, int]:
        """(model frames needed, output fps, output frames) for a request; checks it."""
        out_fps = float(fps) if fps is not None else float(self.clip.fps)
        seconds = float(seconds) if seconds is not None else self.clip.seconds
        if not (math.isfinite(seconds) and seconds > 0):
            raise EchoPulseError(f"--seconds must be positive, got {seconds}")
        if not (math.isfinite(out_fps) and out_fps > 0):
            raise EchoPulseError(f"--fps must be positive, got {out_fps}")
        n_out = int(round(seconds * out_fps))
        if n_out < 1:
            raise EchoPulseError(f"{seconds} s at {out_fps:g} fps is no frame at all")
        ecg_s = ecg_samples / ECG_FS
        if ecg_s + 1e-6 < seconds:
            raise EchoPulseError(f"the ECG is {ecg_s:.2f} s long, shorter than the requested "
                                 f"{seconds:.2f} s of video")
        last_time = (n_out - 1) / out_fps
        model_frames = int(math.ceil(last_time * self.clip.fps - 1e-9)) + 1
        return model_frames, out_fps, n_out

    def _sample_windows(self, signal: np.ndarray, windows: list[Window], first: np.ndarray | None,
                        seed: int, steps: int | None, guidance: float | None,
                        temperature: float | None, conditions: dict[str, Any] | None = None,
                        anchor_background: bool = True) -> np.ndarray:
        import torch

        s = self.sampling
        tok = self.tokenizer
        patch = tok.cfg.temporal_patch
        need = self.clip.ecg_samples
        conditions = dict(conditions or {})
        if conditions.get("lead_mask") is not None:
            conditions["lead_mask"] = torch.as_tensor(conditions["lead_mask"], device=self.device)[None]
        guidance = s.guidance if guidance is None else guidance
        negative = None
        if s.negative == "shifted" and guidance != 0:
            from echopulse.transforms.ecg import shifted_ecg

            negative = shifted_ecg(signal)  # the whole ECG half a beat later, cut like the ECG
        video = np.zeros((0, self.size, self.size), dtype=np.uint8)
        previous: tuple[Window, Any] | None = None  # the last window and its token ids
        background = None  # (H, W) bool: black throughout the first window
        for i, window in enumerate(windows):
            cut = slice(window.ecg_start, window.ecg_start + need)
            ecg = torch.as_tensor(np.ascontiguousarray(signal[:, cut]), dtype=torch.float32, device=self.device)[None]
            if negative is not None:
                conditions["negative_ecg"] = torch.as_tensor(np.ascontiguousarray(negative[:, cut]),
                                                             dtype=torch.float32, device=self.device)[None]
            with torch.inference_mode():
                prime = None
                if window.overlap:
                    prime = self._chain_prime(video, window, previous, patch)
                elif first is not None:
                    image = torch.tensor(first, device=self.device)[None].float() / 255.0
                    prime = tok.encode_first_frame(image)  # (1, h', w')

                def draw(attempt: int, prime=prime, ecg=ecg) -> tuple[Any, np.ndarray]:
                    tokens = self.generator.generate(
                        ecg,
                        steps=steps or s.steps,
                        guidance=guidance,
                        temperature=s.temperature if temperature is None else temperature,
                        schedule=s.schedule, order=s.order, precision=s.precision,
                        compile_mode=s.compile or None,
                        seed=seed + i + 100_003 * attempt,
                        prime_tokens=prime,
                        **{k: v for k, v in conditions.items() if v is not None},
                    )
                    decoded = tok.decode_from_indices(tokens)[0]  # (t, h, w) in [0, 1]
                    return tokens, (decoded.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

                if i == 0:
                    tokens, frames = draw(0)
                else:
                    tokens, frames = _closest_to_anchor(draw, anchor, s.window_candidates, s.window_accept_ssim)
            previous = (window, tokens)
            if i == 0 and first is not None:
                frames[0] = first  # the given frame itself, not its reconstruction
            if i == 0:
                background = frames.max(axis=0) <= BACKGROUND_LEVEL
                anchor = frames.mean(axis=0)
            elif anchor_background and background is not None:
                frames[:, background] = np.round(anchor[background]).astype(np.uint8)
            video = np.concatenate([video, frames[window.overlap:]])
            log.debug("window %d/%d: frames %d-%d", i + 1, len(windows), window.start,
                      window.start + self.clip.frames - 1)
        return video


    def _chain_prime(self, video: np.ndarray, window: Window, previous: tuple[Window, Any] | None,
                     patch: int) -> Any:
        """The leading token frames of a chained window: ``(1, k, h', w')``.

        Token frame 0 is the window's first frame alone, encoded as a first frame. Token frame
        ``j >= 1`` holds frames ``2j - 1, 2j``; when the hop from the previous window is even
        those frames were token frame ``j + hop / 2`` of the previous window, whose generated ids
        are reused. An odd hop (only the last window of some lengths) re-encodes the frames.
        """
        import torch

        tok = self.tokenizer
        count, k = prime_frames(window.overlap, patch)
        first = torch.as_tensor(video[window.start], device=self.device)[None].float() / 255.0
        head = tok.encode_first_frame(first)[:, None]  # (1, 1, h', w')
        if k == 1:
            return head
        prev_window, prev_tokens = previous
        hop = window.start - prev_window.start
        if hop % patch == 0:
            j0 = hop // patch
            return torch.cat([head, prev_tokens[:, j0 + 1:j0 + k]], dim=1)  # (1, k, h', w')
        context = video[window.start:window.start + count]
        padded = np.concatenate([context, np.repeat(context[-1:], self.clip.frames - count, axis=0)])
        clip = torch.as_tensor(padded, device=self.device)[None].float() / 255.0
        return tok.encode(clip)[:, :k]


BACKGROUND_LEVEL = 4  # grey level (0-255) at or below which a pixel counts as black background


def _closest_to_anchor(draw, anchor: np.ndarray, candidates: int, accept: float) -> tuple[Any, np.ndarray]:
    """A chained window that keeps the video's look: draw up to ``candidates`` windows
    (``draw(attempt) -> (tokens, frames)``, attempt 0 first) and keep the first whose mean frame has
    SSIM >= ``accept`` to ``anchor`` (the first window's mean frame), else the closest one drawn.

    The mean over a window (about a beat) averages the heart's motion out, so what it compares is
    the view, depth and gain, not where in the cycle the window falls.
    """
    from echopulse.metrics import ssim

    best = None
    for attempt in range(max(1, candidates)):
        tokens, frames = draw(attempt)
        score = ssim(frames.mean(axis=0)[None] / 255.0, anchor[None] / 255.0)
        if best is None or score > best[0]:
            best = (score, tokens, frames)
        if score >= accept:
            break
        log.debug("window drawn %d: SSIM %.3f to the first window's look, below %.2f", attempt + 1, score, accept)
    return best[1], best[2]


def _ecg_array(ecg: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(prepared (12, L) float32 ECG, its lead mask or None)``."""
    from echopulse.transforms.ecg import PreparedECG

    lead_mask = None
    if isinstance(ecg, (str, os.PathLike)):
        ecg = load_ecg_file(str(ecg))
    if isinstance(ecg, PreparedECG):
        lead_mask = np.asarray(ecg.lead_mask, dtype=bool)
        ecg = ecg.ecg
    ecg = np.asarray(ecg, dtype=np.float32)
    if ecg.ndim != 2 or ecg.shape[0] != 12:
        raise ValueError(f"expected a prepared ECG of shape (12, L), got {ecg.shape}")
    if not np.all(np.isfinite(ecg)):
        raise EchoPulseError("the ECG contains NaN or infinite values")
    return ecg, lead_mask


def load_ecg_file(path: str, fs: float | None = None):
    """Read any supported ECG file and prepare it (250 Hz, 12 leads, filtered, standardized).

    ``fs`` is the rate of a CSV/NPY file without a time column (other formats carry their own).

    Raises:
        EchoPulseError: missing, unreadable, flat or beat-less ECG (the message names the file).
    """
    from echopulse.io.ecg import ECGReadError, read_ecg
    from echopulse.transforms.ecg import ECGError, prepare_ecg

    if not os.path.exists(path) and not os.path.exists(str(Path(path).with_suffix(".hea"))):
        raise EchoPulseError(f"{path}: ECG file not found")
    try:
        signal, meta = read_ecg(path, fs=fs)
    except ECGReadError as exc:
        raise EchoPulseError(str(exc)) from None
    except Exception as exc:  # a reader that fails in its own way is still an unreadable file
        raise EchoPulseError(f"{path}: unreadable ECG ({type(exc).__name__}: {exc})") from None
    try:
        return prepare_ecg(signal, meta["fs"], meta["leads"])
    except ECGError as exc:
        raise EchoPulseError(f"{path}: {exc}") from None


def load_first_frame(source: Any, size: int) -> np.ndarray:
    """A first frame for priming as uint8 (size, size).

    Args:
        source: uint8 array (size, size) (floats in [0, 1] are scaled); an echo DICOM path (its
            first frame, cropped to the ultrasound region and resized exactly like ingestion,
            which drops burned-in text); or an image file Pillow reads (PNG, ...), taken as a
            model-ready frame: it must be exactly size x size.
        size: the model's frame side.

    Raises:
        EchoPulseError: unreadable file or a frame of another size.
    """
    if not isinstance(source, (str, os.PathLike)):
        frame = np.asarray(source)
        if frame.dtype != np.uint8:
            frame = np.clip(np.round(frame.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        if frame.shape != (size, size):
            raise EchoPulseError(f"the first frame is {frame.shape}; this model makes "
                                 f"({size}, {size}) frames")
        return frame
    path = Path(source)
    if not path.is_file():
        raise EchoPulseError(f"{path}: first-frame file not found")
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        from echopulse.io.dicom_echo import EchoReadError, read_echo_dicom
        from echopulse.transforms.video import crop_region, estimate_region, resize_frames

        try:
            frames, meta = read_echo_dicom(path)
        except EchoReadError as exc:
            raise EchoPulseError(str(exc)) from None
        region = meta["region"] or estimate_region(frames)
        return resize_frames(crop_region(frames, region)[:1], size)[0]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            frame = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise EchoPulseError(f"{path}: not a readable image or echo DICOM ({exc})") from None
    if frame.shape != (size, size):
        raise EchoPulseError(f"{path}: first frame is {frame.shape[1]}x{frame.shape[0]} pixels; this "
                             f"model makes {size}x{size} frames (give a {size}x{size} image, or the "
                             f"echo DICOM, which is cropped and resized like ingestion)")
    return frame


def display_upscale(size: int, suffix: str) -> int:
    """Nearest-neighbour upscaling for viewing: GIF/MP4 to about 256 px; DICOM stays native."""
    return 1 if suffix.lower() == ".dcm" else max(1, 256 // size)


def render_video(frames: np.ndarray, fps: float, out: str, ecg: np.ndarray | None = None,
                 lead_mask: np.ndarray | None = None, panel: bool = False) -> Path:
    """Write generated frames to ``out``: .mp4/.gif upscaled for viewing, .dcm at native size.

    Args:
        frames: uint8 (T, H, W) from :meth:`EchoGenerator.generate`.
        fps: their frame rate.
        out: output path (.mp4, .gif or .dcm).
        ecg: the prepared (12, L) ECG, for ``panel``.
        lead_mask: which of its leads are real (default: the non-zero ones).
        panel: draw the ECG under the video with a cursor at each frame's time.
    """
    from echopulse.video_out import check_video_path, write_video

    suffix = check_video_path(out).suffix
    upscale = display_upscale(frames.shape[-1], suffix)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    if panel:
        from echopulse.panel import add_ecg_panel, panel_lead

        if ecg is None:
            raise ValueError("the ECG panel needs the ECG")
        trace, lead = panel_lead(ecg, lead_mask)
        frames = add_ecg_panel(frames, trace, fps, label=lead)
    return write_video(frames, fps, out)


def generate_to_file(checkpoint: str | EchoGenerator, ecg_path: str, out: str, seed: int = 0,
                     steps: int | None = None, guidance: float | None = None,
                     first_frame: str | None = None, seconds: float | None = None,
                     fps: float | None = None, panel: bool = False, view: str | None = None,
                     ef: float | None = None) -> dict[str, Any]:
    """``echopulse generate``: an ECG file in, a .gif/.mp4/.dcm out. Returns a small report.

    Every input is checked before the model runs; the output appears whole or not at all.
    """
    from echopulse.video_out import check_video_path

    check_video_path(out)
    prepared = load_ecg_file(ecg_path)
    model = checkpoint if isinstance(checkpoint, EchoGenerator) else EchoGenerator.from_checkpoint(checkpoint)
    model.conditions(view, ef)  # checked before anything runs
    first = None if first_frame is None else load_first_frame(first_frame, model.size)
    out_fps = float(fps) if fps is not None else model.clip.fps
    frames = model.generate(prepared, first_frame=first, seconds=seconds, fps=out_fps, seed=seed,
                            steps=steps, guidance=guidance, view=view, ef=ef)
    path = render_video(frames, out_fps, out, prepared.ecg, prepared.lead_mask, panel)
    return {"out": str(path), "frames": int(frames.shape[0]), "fps": out_fps,
            "seconds": round(frames.shape[0] / out_fps, 6), "size": list(frames.shape[1:]),
            "upscale": display_upscale(frames.shape[-1], Path(out).suffix), "panel": panel,
            "first_frame": first_frame is not None, "seed": seed, "view": view, "ef": ef,
            "guidance": model.sampling.guidance if guidance is None else guidance,
            "steps": steps or model.sampling.steps}


# ---- batch generation: one manifest row -> one video + one index row ------------------------

INDEX_COLUMNS = ("video_id", "ecg", "first_frame", "seconds", "fps", "seed", "video", "frames",
                 "status", "error")


def video_id(row: dict[str, Any]) -> str:
    """The row's ``id`` when given, else a deterministic id of (ecg, first frame, seconds, seed)."""
    if row.get("id"):
        return str(row["id"])
    key = "|".join(str(row.get(k) or "") for k in ("ecg", "first_frame", "seconds", "fps", "seed"))
    return uuid.uuid5(uuid.NAMESPACE_URL, "echopulse-generate:" + key).hex[:16]


def _optional(value: Any, cast: Callable[[Any], Any]) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return cast(value)


def make_generate_fn(model: EchoGenerator, out_dir: str, base_dir: str = ".", suffix: str = ".mp4",
                     panel: bool = False, defaults: dict[str, Any] | None = None
                     ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The batch stage as a plain function: a manifest row -> an index row (never raises for a bad row).

    Args:
        model: the loaded generator.
        out_dir: local directory the videos are written to (``<video_id><suffix>``).
        base_dir: what relative ``ecg``/``first_frame`` paths are relative to.
        suffix: ".mp4", ".gif" or ".dcm".
        panel: draw the ECG panel.
        defaults: ``seconds``, ``fps``, ``seed``, ``steps``, ``guidance`` for rows that leave them out.

    Returns:
        ``fn(row)`` with row keys ``ecg`` (required), optional ``id``, ``first_frame``, ``seconds``,
        ``fps``, ``seed``; it returns a dict with :data:`INDEX_COLUMNS` (status "ok" or "error").
    """
    from echopulse.video_out import check_video_path

    check_video_path("x" + suffix)
    defaults = dict(defaults or {})

    def resolve(value: Any) -> str | None:
        if not value:
            return None
        return str(value) if os.path.isabs(str(value)) else os.path.join(base_dir, str(value))

    def run(row: dict[str, Any]) -> dict[str, Any]:
        vid = video_id(row)
        seconds = _optional(row.get("seconds"), float) or defaults.get("seconds")
        fps = _optional(row.get("fps"), float) or defaults.get("fps")
        seed = _optional(row.get("seed"), int)
        seed = defaults.get("seed", 0) if seed is None else seed
        result = {"video_id": vid, "ecg": str(row.get("ecg") or ""),
                  "first_frame": str(row.get("first_frame") or ""), "seconds": seconds,
                  "fps": fps, "seed": int(seed), "video": None, "frames": 0, "status": "ok",
                  "error": None}
        try:
            if not row.get("ecg"):
                raise EchoPulseError("manifest row has no 'ecg' path")
            target = os.path.join(out_dir, vid + suffix)
            info = generate_to_file(model, resolve(row["ecg"]), target, seed=int(seed),
                                    steps=defaults.get("steps"), guidance=defaults.get("guidance"),
                                    first_frame=resolve(row.get("first_frame")), seconds=seconds,
                                    fps=fps, panel=panel)
            result.update(video=info["out"], frames=info["frames"], seconds=info["seconds"],
                          fps=info["fps"])
        except (EchoPulseError, ValueError) as exc:
            result.update(status="error", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            log.warning("row %s: %s", vid, result["error"])
        return result

    return run
