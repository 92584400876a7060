"""What ``echopulse serve`` does with a request, as plain functions (Ray Serve is only wiring).

A request is an ECG (an uploaded file: a WFDB ``.hea`` + ``.dat`` pair, a DICOM ECG, an Apple
Health export, a CSV or NPY with ``rate``; or a JSON body ``{"ecg": [[...], ...], "rate": Hz}``)
plus options. It is checked and turned into a :class:`GenerateRequest` before any model work, by
the same readers and checks as ``echopulse generate``; every problem is a :class:`RequestError`
with an HTTP status and the one line the CLI would print. Uploads are written only into a
temporary directory that is removed before the function returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from echopulse.errors import EchoPulseError

log = logging.getLogger(__name__)

FORMATS = {"mp4": "video/mp4", "gif": "image/gif", "dcm": "application/dicom"}
OPTIONS = ("seconds", "fps", "seed", "steps", "guidance", "format", "rate", "panel")
DEFAULT_MAX_UPLOAD_MB = 20.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RequestError(EchoPulseError):
    """A bad request: ``status`` is the HTTP status (400, 413, 422), the message one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GenerateRequest:
    """One checked request: a prepared ECG and the options of ``echopulse generate``."""

    ecg: np.ndarray  # float32 (12, L) at ECG_FS, prepared
    lead_mask: np.ndarray
    seconds: float | None = None
    fps: float | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    format: str = "mp4"
    panel: bool = False
    first_frame: np.ndarray | None = field(default=None, compare=False)

    def batch_key(self) -> tuple:
        """Requests with equal keys (and no first frame) can share one batched forward."""
        return (self.seconds, self.fps, self.steps, self.guidance, self.ecg.shape[1])


def _number(name: str, value: Any, cast, positive: bool = False):
    try:
        out = cast(value)
    except (TypeError, ValueError):
        raise RequestError(f"option {name}: {value!r} is not a {cast.__name__}") from None
    if cast is float and not math.isfinite(out):
        raise RequestError(f"option {name}: {value!r} is not a finite number")
    if positive and out <= 0:
        raise RequestError(f"option {name} must be positive, got {value!r}")
    return out


def parse_options(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Request options (form fields, query parameters or JSON keys) -> typed values.

    Raises:
        RequestError: an unknown option, or a value of the wrong type or range.
    """
    unknown = sorted(set(fields) - set(OPTIONS))
    if unknown:
        raise RequestError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(OPTIONS)}")
    out: dict[str, Any] = {}
    for name in ("seconds", "fps", "rate"):
        if fields.get(name) not in (None, ""):
            out[name] = _number(name, fields[name], float, positive=True)
    for name in ("seed", "steps"):
        if fields.get(name) not in (None, ""):
            out[name] = _number(name, fields[name], int)
    if out.get("steps") is not None and out["steps"] < 1:
        raise RequestError(f"option steps must be at least 1, got {out['steps']}")
    if fields.get("guidance") not in (None, ""):
        out["guidance"] = _number("guidance", fields["guidance"], float)
    fmt = str(fields.get("format") or "mp4").lower().lstrip(".")
    if fmt not in FORMATS:
        raise RequestError(f"option format: {fmt!r} is not one of {', '.join(FORMATS)}")
    out["format"] = fmt
    panel = str(fields.get("panel", "false")).lower()
    if panel not in ("true", "false", "1", "0", "yes", "no"):
        raise RequestError(f"option panel: {fields.get('panel')!r} is not true or false")
    out["panel"] = panel in ("true", "1", "yes")
    return out


def _safe_name(name: str) -> str:
    base = os.path.basename(str(name or "").replace("\\", "/"))
    if not _SAFE_NAME.match(base):
        raise RequestError(f"upload name {name!r} is not a plain file name (letters, digits, . _ -)")
    return base


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise RequestError(f"upload is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB limit "
                           "(--max-upload-mb)", status=413)


def _ecg_entry(names: list[str]) -> str:
    """Which uploaded file is the ECG: the ``.hea`` of a WFDB pair, else the only file."""
    headers = [n for n in names if n.lower().endswith(".hea")]
    if headers:
        record = headers[0][:-4]
        if f"{record}.dat" not in names and not any(n.startswith(record + ".") and n != headers[0]
                                                     for n in names):
            raise RequestError(f"{headers[0]}: WFDB header uploaded without its signal file ({record}.dat)")
        return headers[0]
    if len(names) != 1:
        raise RequestError(f"expected one ECG file (or a WFDB .hea + .dat pair), got {len(names)}: "
                           f"{', '.join(names)}")
    return names[0]


def _one_line(exc: Exception, tmp: str) -> str:
    """The error's first line, with the temporary directory taken out of the paths it names."""
    text = str(exc).replace(tmp + os.sep, "").replace(tmp, "")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_uploaded_ecg(files: Sequence[tuple[str, bytes]], rate: float | None = None):
    """Prepare an ECG from uploaded files (names and bytes), in a temporary directory.

    Returns:
        a :class:`~echopulse.transforms.ecg.PreparedECG`.

    Raises:
        RequestError: no file, odd names, an unreadable or too-short ECG (422 for an ECG that is
            read but unusable, 400 for the rest).
    """
    from echopulse.generate import load_ecg_file

    if not files:
        raise RequestError("no ECG uploaded (send a file field 'ecg', or a JSON body with 'ecg' and 'rate')")
    names = [_safe_name(name) for name, _ in files]
    if len(set(names)) != len(names):
        raise RequestError(f"duplicate upload names: {', '.join(names)}")
    with tempfile.TemporaryDirectory(prefix="echopulse-upload-") as tmp:
        for name, (_, data) in zip(names, files):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        entry = _ecg_entry(names)
        try:
            return load_ecg_file(os.path.join(tmp, entry), fs=rate)
        except EchoPulseError as exc:
            raise RequestError(_one_line(exc, tmp), status=422) from None
        except (ValueError, OSError) as exc:
            raise RequestError(f"{entry}: unreadable ECG ({_one_line(exc, tmp)})", status=422) from None


def read_json_ecg(body: bytes):
    """A JSON body ``{"ecg": [[lead samples], ...] or [samples], "rate": Hz, "leads": [...],
    options...}`` -> (PreparedECG, options)."""
    from echopulse.config import ECG_LEADS
    from echopulse.transforms.ecg import ECGError, prepare_ecg

    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the JSON body does not parse ({exc})") from None
    if not isinstance(doc, dict) or "ecg" not in doc:
        raise RequestError('the JSON body must be an object with "ecg" (an array) and "rate" (Hz)')
    ecg, leads = doc.pop("ecg"), doc.pop("leads", None)
    options = parse_options(doc)
    if "rate" not in options:
        raise RequestError('the JSON body needs "rate": the ECG\'s sampling rate in Hz')
    try:
        signal = np.asarray(ecg, dtype=np.float32)
    except (TypeError, ValueError):
        raise RequestError('"ecg" must be an array of numbers (leads x samples)') from None
    if signal.ndim == 1:
        signal = signal[None]
    if signal.ndim != 2 or signal.size == 0:
        raise RequestError(f'"ecg" must be leads x samples, got shape {signal.shape}')
    if leads is None:
        if signal.shape[0] == 12:
            leads = list(ECG_LEADS)
        elif signal.shape[0] == 1:
            leads = ["I"]  # a single-lead wearable (Apple Watch records lead I)
        else:
            raise RequestError(f'"ecg" has {signal.shape[0]} leads: name them with "leads"')
    if not isinstance(leads, list) or len(leads) != signal.shape[0]:
        raise RequestError(f'"leads" must name each of the {signal.shape[0]} rows of "ecg"')
    try:
        prepared = prepare_ecg(signal, options["rate"], [str(x) for x in leads])
    except ECGError as exc:
        raise RequestError(f"ECG: {exc}", status=422) from None
    return prepared, options


def build_request(prepared, options: Mapping[str, Any], first_frame: np.ndarray | None = None
                  ) -> GenerateRequest:
    return GenerateRequest(ecg=prepared.ecg, lead_mask=prepared.lead_mask,
                           seconds=options.get("seconds"), fps=options.get("fps"),
                           seed=int(options.get("seed") or 0), steps=options.get("steps"),
                           guidance=options.get("guidance"), format=options.get("format", "mp4"),
                           panel=bool(options.get("panel")), first_frame=first_frame)


def read_first_frame(name: str, data: bytes, size: int) -> np.ndarray:
    """An uploaded first frame (image exactly the model's size, or an echo DICOM)."""
    from echopulse.generate import load_first_frame

    base = _safe_name(name)
    with tempfile.TemporaryDirectory(prefix="echopulse-upload-") as tmp:
        path = os.path.join(tmp, base)
        with open(path, "wb") as f:
            f.write(data)
        try:
            return load_first_frame(path, size)
        except EchoPulseError as exc:
            raise RequestError(_one_line(exc, tmp), status=422) from None


def check_plan(model, request: GenerateRequest) -> None:
    """The checks ``generate`` makes before sampling (duration, rate, ECG long enough), up front."""
    from echopulse.generate import plan_windows

    try:
        frames, _, _ = model._frame_plan(request.seconds, request.fps, request.ecg.shape[1])
        plan_windows(frames, model.clip, request.ecg.shape[1], model.tokenizer.cfg.temporal_patch,
                     model.prime_token_frames())
    except EchoPulseError as exc:
        raise RequestError(str(exc).splitlines()[0], status=422) from None


def _single_window(model, request: GenerateRequest) -> bool:
    from echopulse.generate import plan_windows

    frames, _, _ = model._frame_plan(request.seconds, request.fps, request.ecg.shape[1])
    return len(plan_windows(frames, model.clip, request.ecg.shape[1],
                            model.tokenizer.cfg.temporal_patch, model.prime_token_frames())) == 1


def _generate_shared(model, group: list[GenerateRequest]) -> list[np.ndarray]:
    """One batched forward for requests of one window with equal options (no first frame)."""
    import torch

    from echopulse.transforms.video import sample_frames

    r = group[0]
    s = model.sampling
    frames_needed, out_fps, n_out = model._frame_plan(r.seconds, r.fps, r.ecg.shape[1])
    ecg = torch.as_tensor(np.stack([q.ecg[:, :model.clip.ecg_samples] for q in group]),
                          dtype=torch.float32, device=model.device)
    with torch.inference_mode():
        tokens = model.generator.generate(
            ecg, steps=r.steps or s.steps, guidance=s.guidance if r.guidance is None else r.guidance,
            temperature=s.temperature, schedule=s.schedule, seed=[q.seed for q in group])
        decoded = model.tokenizer.decode_from_indices(tokens)
    videos = (decoded.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()[:, :frames_needed]
    if out_fps == model.clip.fps:
        return [v[:n_out] for v in videos]
    return [sample_frames(v, model.clip.fps, np.arange(n_out) / out_fps) for v in videos]


def generate_many(model, requests: Sequence[GenerateRequest]) -> list[np.ndarray | RequestError]:
    """Frames for each request, in order; a failing request gives its error, not the others'.

    Requests of a single model window with the same options (seeds may differ) and no first frame
    share one batched forward of the sampler; each row draws its noise from its own seed, so a
    request's video does not depend on which others share its batch (up to floating-point
    differences of batched matrix products, which can flip a near-tied token). The rest run one by
    one through
    :meth:`~echopulse.generate.EchoGenerator.generate`, which chains windows.
    """
    results: list[np.ndarray | RequestError | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        try:
            check_plan(model, request)
            if request.first_frame is None and _single_window(model, request):
                groups.setdefault(request.batch_key(), []).append(i)
                continue
            results[i] = model.generate(request.ecg, first_frame=request.first_frame,
                                        seconds=request.seconds, fps=request.fps, seed=request.seed,
                                        steps=request.steps, guidance=request.guidance)
        except RequestError as exc:
            results[i] = exc
        except EchoPulseError as exc:
            results[i] = RequestError(str(exc).splitlines()[0], status=422)
    for indices in groups.values():
        for i, video in zip(indices, _generate_shared(model, [requests[i] for i in indices])):
            results[i] = video
    return results  # type: ignore[return-value]


def encode_video(frames: np.ndarray, fps: float, request: GenerateRequest) -> bytes:
    """The video as bytes in the requested format (the writer of ``echopulse generate``)."""
    from echopulse.generate import render_video

    with tempfile.TemporaryDirectory(prefix="echopulse-out-") as tmp:
        path = render_video(frames, fps, os.path.join(tmp, "echo." + request.format), request.ecg,
                            request.lead_mask, request.panel)
        return path.read_bytes()
