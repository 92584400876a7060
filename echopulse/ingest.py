"""The ingest stage as a plain function: one manifest row (echo + ECG) -> ``clips/v1`` rows.

Ray (``pipelines/ingest``) only maps :func:`make_ingest_fn` over manifest rows and routes
:class:`IngestError` to the quarantine table. Nothing here logs or returns patient names, IDs,
birth dates, accession numbers, institutions or raw UIDs: the study UID is only hashed
(:func:`echopulse.schema.study_key`), acquisition times are used only as a difference, and the
frames are cropped to the ultrasound region and masked outside the sector, which drops burned-in
header text.

Manifest columns: ``echo`` (required: a DICOM cine or a video), ``ecg`` (optional: ``screen`` reads
the ECG trace the scanner drew on the echo's frames; empty means the ECG embedded in the echo DICOM
when there is one, else the on-screen trace when the frames show one, else an ECG-less clip),
``ecg_offset_s`` (echo frame 0 on the ECG's clock; default from the acquisition times when both
files carry them, else 0; an on-screen trace is on the echo's clock already), ``ecg_sync``
(``true``/``false``: whether the ECG was recorded with the echo; empty derives it: true for every
source but a pairing the manifest marks false, see :func:`ecg_synchronized`),
``view``, ``ef``, ``split``, ``study`` (groups files into one study key), ``fps`` (for videos), and
for CSV/NPY ECGs ``ecg_fs``, ``ecg_leads`` (comma-separated names) and ``ecg_units``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from echopulse import schema, storage
from echopulse.config import ECG_FS, ClipConfig
from echopulse.io.dicom_cine import DEIDENTIFICATION_METHOD
from echopulse.io.dicom_echo import MAX_DECODED_BYTES, EchoReadError, read_echo_dicom
from echopulse.io.ecg import ECGReadError, read_ecg
from echopulse.io.screen_ecg import SOURCE as SCREEN, NoTraceError, ScreenECGError, read_screen_ecg
from echopulse.io.video import is_video, read_echo_video
from echopulse.io.volume import is_volume, read_echo_volume
from echopulse.transforms.clips import CLIP_MODES, ClipSpan, cut_clip, cycle_spans, window_spans
from echopulse.transforms.ecg import ECGError, PreparedECG, prepare_ecg
from echopulse.transforms.video import crop_region, estimate_region, mask_outside_sector

log = logging.getLogger(__name__)

MIN_ECG_COVERAGE = 0.9  # an ECG covering less of the cine than this is a truncated or wrong pair
NO_ECG = "none"  # ecg_source of ECG-less clips (plain videos for tokenizer training)


class IngestError(Exception):
    """A manifest row that could not be turned into clips.

    Attributes:
        stage: where it failed: "manifest", "read_echo", "read_ecg", "ecg", "pair" or "clip".
        detail: a human-readable reason (no patient identifiers).
    """

    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True)
class IngestOptions:
    """How rows become clips, beyond the clip geometry.

    Attributes:
        clip_mode: "window" (fixed windows of ``clip.seconds``) or "cycle" (one R-R interval
            resampled to ``clip.frames`` frames).
        allow_roots: folders outside the manifest's folder that ``../`` paths may land in.
        ecg_fs: sampling rate of CSV/NPY ECGs whose row has no ``ecg_fs``.
        max_decoded_bytes: the most memory one echo's decoded frames may take.
        mask_sector: zero everything outside the moving sector after the crop.
        screen_ecg: for a row that names no ECG on an echo without a Waveform Sequence, read the
            ECG trace drawn on screen when there is one (``ecg`` = ``screen`` always reads it).
        max_input_cpu_s: CPU seconds one input may take in the ingest pipelines' decoder process
            before the kernel stops it and the input is quarantined (``None``: no limit).
    """

    clip_mode: str = "window"
    allow_roots: tuple[str, ...] = ()
    ecg_fs: float | None = None
    max_decoded_bytes: int = MAX_DECODED_BYTES
    mask_sector: bool = True
    screen_ecg: bool = True
    max_input_cpu_s: float | None = 600.0

    def __post_init__(self) -> None:
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("echopulse")
    except metadata.PackageNotFoundError:
        import echopulse

        return str(getattr(echopulse, "__version__", "0+unknown"))


def _normpath(path: str) -> str:
    if storage.is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def _inside(path: str, root: str) -> bool:
    root = _normpath(root).rstrip("/\\")
    return path == root or path.startswith(root + ("/" if storage.is_remote(root) else os.sep))


def resolve_input(base_dir: str, value: str, allow_roots: tuple[str, ...] = ()) -> str:
    """Resolve a manifest path against the manifest's folder.

    Absolute paths and URIs are taken as they are. A relative path that climbs out of the folder
    (``../``) is refused unless it lands inside one of ``allow_roots``.

    Raises:
        IngestError: (stage "manifest") for an escaping relative path.
    """
    if storage.is_remote(value) or os.path.isabs(value):
        return value
    if storage.is_remote(base_dir):
        joined = _normpath(posixpath.join(base_dir, value))
    else:
        joined = _normpath(os.path.join(os.path.abspath(base_dir), value))
    if _inside(joined, base_dir):
        return joined
    roots = [r if storage.is_remote(r) else os.path.abspath(r) for r in allow_roots]
    if any(_inside(joined, r) for r in roots):
        return joined
    raise IngestError(
        "manifest",
        f"{value}: the relative path climbs out of the manifest's folder (it lands in "
        f"{os.path.dirname(joined)}); refused unless --allow-root names that folder",
    )


def _optional_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def ecg_offset(row: dict, echo_meta: dict, ecg_meta: dict | None) -> tuple[float, str]:
    """Echo frame 0 on the ECG's clock, and where that came from ("manifest", "acquisition_time",
    "default")."""
    if ecg_meta is not None and ecg_meta.get("source") == SCREEN:
        return float(ecg_meta["offset_s"]), "screen"
    given = _optional_float(row.get("ecg_offset_s"))
    if given is not None:
        return given, "manifest"
    if ecg_meta is not None and echo_meta.get("start") and ecg_meta.get("start"):
        return (echo_meta["start"] - ecg_meta["start"]).total_seconds(), "acquisition_time"
    return 0.0, "default"


def make_ingest_fn(clip: ClipConfig, base_dir: str, salt: str | None = None,
                   options: IngestOptions | None = None) -> Callable[[dict], list[dict]]:
    """Build the ingest function for one clip geometry.

    Args:
        clip: clip geometry (frames, size, fps, ecg_samples, stride).
        base_dir: folder (or URI) that relative paths in the manifest are relative to.
        salt: study-key salt (default: ``ECHOPULSE_STUDY_SALT`` or the built-in default).
        options: clip mode, allowed roots, ECG rate default, memory limit.

    Returns:
        ``fn(row) -> list[dict]`` mapping a manifest row (see the module docstring) to clip rows
        with exactly ``schema.CLIP_COLUMNS``; it raises :class:`IngestError` on any failure.
    """
    options = options or IngestOptions()
    version = _version()

    def ingest(row: dict) -> list[dict]:
        echo_uri, ecg_uri, echo_path, ecg_path, sync = _row_inputs(row, base_dir, options)
        screen = ecg_uri.lower() == SCREEN
        keep_color = screen or (not ecg_uri and options.screen_ecg)  # the trace is found by its colour
        frames, echo_meta = _read_echo(row, echo_uri, echo_path, options, keep_color=keep_color)
        ecg_meta, prepared = _read_prepare_ecg(row, echo_uri, echo_path, echo_meta, ecg_uri, ecg_path, options)
        frames, region_source = _crop_frames(frames, echo_meta, ecg_meta, options.mask_sector)
        fps = float(echo_meta["fps"])
        video_s = frames.shape[0] / fps
        offset, offset_source = ecg_offset(row, echo_meta, ecg_meta)
        if prepared is not None:
            _check_coverage(echo_uri, video_s, prepared.duration_s, offset, offset_source)
        spans = _spans(echo_uri, video_s, prepared, offset, clip, options.clip_mode)

        source = ecg_meta["source"] if ecg_meta else NO_ECG
        provenance = _provenance(ecg_uri, echo_uri, echo_meta, ecg_meta, region_source,
                                 offset, offset_source, options.clip_mode, version)
        shared = _shared_columns(row, echo_uri, echo_meta, salt, source, sync, provenance)
        out = []
        for span in spans:
            try:
                video, ecg, peaks = cut_clip(frames, fps, prepared, span, clip, ecg_offset_s=offset)
            except ValueError as exc:
                raise IngestError("clip", f"{echo_uri} at {span.t_start_s:.2f} s: {exc}") from None
            out.append(_clip_row(shared, echo_uri, span, clip, options.clip_mode, prepared, video, ecg, peaks))
        log.info("ingested %s: %d clips", echo_uri, len(out))
        return out

    return ingest


def _row_inputs(row: dict, base_dir: str, options: IngestOptions) -> tuple[str, str, str, str, bool | None]:
    """The row's echo and ECG as written and as resolved, and its ``ecg_sync`` flag.

    Returns:
        ``(echo_uri, ecg_uri, echo_path, ecg_path, sync)``; ``ecg_path`` is empty when the row
        names no ECG file (none, or ``screen``).

    Raises:
        IngestError: (stage "manifest") for a row without an echo, a bad ``ecg_sync``, ``screen``
            on a video, or a path escaping the manifest's folder.
    """
    echo_uri, ecg_uri = _text(row.get("echo")), _text(row.get("ecg"))
    if not echo_uri:
        raise IngestError("manifest", f"row has no 'echo' path (ecg={ecg_uri!r})")
    screen = ecg_uri.lower() == SCREEN
    sync = _sync_flag(row, echo_uri)
    if screen and is_video(echo_uri):
        raise IngestError("manifest", f"{echo_uri}: ecg 'screen' needs a DICOM cine (its colour "
                                      "frames and timing); this is a video file")
    echo_path = resolve_input(base_dir, echo_uri, options.allow_roots)
    ecg_path = resolve_input(base_dir, ecg_uri, options.allow_roots) if ecg_uri and not screen else ""
    return echo_uri, ecg_uri, echo_path, ecg_path, sync


def _crop_frames(frames: np.ndarray, echo_meta: dict, ecg_meta: dict | None,
                 mask_sector: bool) -> tuple[np.ndarray, str]:
    """Crop to the ultrasound region (the DICOM's, else estimated) and mask outside the sector.

    Returns:
        The cropped frames and where the region came from ("dicom" or "estimated").
    """
    region, region_source = echo_meta["region"], "dicom"
    if region is None:
        if ecg_meta is not None and ecg_meta.get("source") == SCREEN:
            # the moving trace would pull the estimated imaging box over the strip
            x0, y0, x1, y1 = ecg_meta["strip"]
            frames = frames.copy()
            frames[:, y0 : y1 + 1, x0 : x1 + 1] = 0
        region, region_source = estimate_region(frames), "estimated"
    frames = crop_region(frames, region)
    if mask_sector:
        frames = mask_outside_sector(frames)
    return frames, region_source


def _provenance(ecg_uri: str, echo_uri: str, echo_meta: dict, ecg_meta: dict | None, region_source: str,
                offset: float, offset_source: str, clip_mode: str, version: str) -> str:
    """The ``provenance`` JSON shared by every clip of one row (no patient identifiers)."""
    source = ecg_meta["source"] if ecg_meta else NO_ECG
    return json.dumps(
        {
            "ecg": ecg_uri,
            "reader": {"echo": _echo_reader(echo_uri), "ecg": source,
                       "region": region_source},
            "transfer_syntax": echo_meta.get("transfer_syntax", ""),
            "source_fps": float(echo_meta["fps"]),
            "ecg_fs": float(ecg_meta["fs"]) if ecg_meta else None,
            **({"screen": {"mode": ecg_meta["mode"], "px_per_s": round(float(ecg_meta["px_per_s"]), 3),
                           "history_s": round(float(ecg_meta["offset_s"]), 4)}}
               if source == SCREEN else {}),
            "ecg_offset_s": round(offset, 6),
            "ecg_offset_source": offset_source,
            "clip_mode": clip_mode,
            "echopulse": version,
            # what ingest guarantees (see the module docstring), in DICOM's words
            "patient_identity_removed": "YES",
            "deidentification_method": DEIDENTIFICATION_METHOD,
        },
        sort_keys=True,
    )


def _shared_columns(row: dict, echo_uri: str, echo_meta: dict, salt: str | None, source: str,
                    sync: bool | None, provenance: str) -> dict:
    """The ``clips/v1`` columns that are the same for every clip cut from one row."""
    study = _text(row.get("study")) or echo_meta["study_uid"] or echo_meta["sop_uid"] or echo_uri
    key = schema.study_key(study, salt)
    split = _text(row.get("split")).lower()
    return {
        "study_key": key,
        "split": split if split in schema.SPLITS else schema.split_for(key),
        "view": _text(row.get("view")) or "unknown",
        "ecg_source": source,
        "ecg_sync": ecg_synchronized(source, sync),
        "ef": _optional_float(row.get("ef")),
        "source_uri": echo_uri,
        "provenance": provenance,
    }


def _clip_row(shared: dict, echo_uri: str, span: ClipSpan, clip: ClipConfig, clip_mode: str,
              prepared: PreparedECG | None, video: np.ndarray, ecg, peaks) -> dict:
    """One ``clips/v1`` row, columns in ``schema.CLIP_COLUMNS`` order, from a cut clip."""
    if prepared is None:
        heart_rate = None
    elif clip_mode == "cycle":
        heart_rate = 60.0 / span.seconds
    else:
        heart_rate = float(prepared.heart_rate_bpm)
    return {
        "clip_id": schema.clip_id(echo_uri, span.t_start_s, span.t_end_s),
        "study_key": shared["study_key"],
        "split": shared["split"],
        "view": shared["view"],
        "frames": video,
        "fps": float(clip.frames / span.seconds),
        "ecg": ecg,
        "ecg_leads": [bool(m) for m in prepared.lead_mask] if prepared else [False] * 12,
        "ecg_source": shared["ecg_source"],
        "ecg_sync": shared["ecg_sync"],
        "heart_rate_bpm": heart_rate,
        "r_peaks": [int(p) for p in peaks],
        "t_start_s": float(span.t_start_s),
        "t_end_s": float(span.t_end_s),
        "ef": shared["ef"],
        "source_uri": shared["source_uri"],
        "provenance": shared["provenance"],
    }


def _read_echo(row: dict, echo_uri: str, echo_path: str, options: IngestOptions, keep_color: bool = False):
    try:
        if is_video(echo_path):
            return read_echo_video(echo_path, fps=_optional_float(row.get("fps")),
                                   max_decoded_bytes=options.max_decoded_bytes)
        if is_volume(echo_path):
            return read_echo_volume(echo_path, fps=_optional_float(row.get("fps")),
                                    max_decoded_bytes=options.max_decoded_bytes)
        return read_echo_dicom(echo_path, max_decoded_bytes=options.max_decoded_bytes, keep_color=keep_color)
    except EchoReadError as exc:
        raise IngestError("read_echo", _relabel(str(exc), echo_path, echo_uri)) from None
    except Exception as exc:  # a reader bug must still quarantine, not kill the dataset
        raise IngestError("read_echo", f"{echo_uri}: {type(exc).__name__}: {exc}") from None


def _echo_reader(echo_uri: str) -> str:
    return "video" if is_video(echo_uri) else "volume" if is_volume(echo_uri) else "pydicom"


def _read_prepare_ecg(row, echo_uri, echo_path, echo_meta, ecg_uri, ecg_path, options):
    """The row's ECG, read and prepared; (None, None) for an ECG-less clip."""
    color = echo_meta.pop("color_frames", None)  # only the screen reader needs it; free it after
    if ecg_uri.lower() == SCREEN or (not ecg_uri and not echo_meta.get("has_waveform") and color is not None):
        shown = f"{echo_uri} (on-screen ECG)"
        try:
            signal, meta = read_screen_ecg(color, echo_meta.get("color_photometric", echo_meta.get("photometric", "")),
                                           echo_meta["region"],
                                           float(echo_meta["fps"]), shown=echo_uri)
        except NoTraceError as exc:
            if ecg_uri:
                raise IngestError("read_ecg", str(exc)) from None
            log.debug("%s", exc)  # an echo without an ECG strip: an ECG-less clip, as before
            return None, None
        except ScreenECGError as exc:
            if ecg_uri:
                raise IngestError("read_ecg", str(exc)) from None
            # only a try (the manifest named no ECG): the cine still serves as an ECG-less clip,
            # as a real cine with text or a second trace under the image must (e.g. SonoSite)
            log.warning("%s; ingested without an ECG", exc)
            return None, None
        except Exception as exc:
            raise IngestError("read_ecg", f"{shown}: {type(exc).__name__}: {exc}") from None
        call = lambda: (signal, meta)  # noqa: E731
    elif ecg_path:
        shown = ecg_uri
        leads = [x.strip() for x in _text(row.get("ecg_leads")).split(",") if x.strip()] or None
        fs = _optional_float(row.get("ecg_fs")) or options.ecg_fs
        units = _text(row.get("ecg_units")) or None
        call = lambda: read_ecg(ecg_path, fs=fs, leads=leads, units=units)  # noqa: E731
    elif echo_meta.get("has_waveform"):
        shown, ecg_path = f"{echo_uri} (embedded waveform)", echo_path
        call = lambda: read_ecg(echo_path)  # noqa: E731
    else:
        return None, None
    try:
        signal, meta = call()
    except ECGReadError as exc:
        raise IngestError("read_ecg", _relabel(str(exc), ecg_path, shown)) from None
    except Exception as exc:
        raise IngestError("read_ecg", f"{shown}: {type(exc).__name__}: {exc}") from None
    try:
        prepared = prepare_ecg(signal, meta["fs"], meta["leads"])
    except ECGError as exc:
        raise IngestError("ecg", f"{shown}: {exc}") from None
    return meta, prepared


def _sync_flag(row: dict, echo_uri: str) -> bool | None:
    """The manifest's ``ecg_sync`` as a bool, None when empty or absent."""
    text = _text(row.get("ecg_sync")).lower()
    if not text:
        return None
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    raise IngestError("manifest", f"{echo_uri}: ecg_sync must be true, false or empty, got {text!r}")


def ecg_synchronized(source: str, given: bool | None) -> bool:
    """Whether a clip's ECG was recorded with its echo (``ecg_sync`` of ``clips/v1``).

    An ECG-less clip is never synchronized. Otherwise the manifest's ``ecg_sync`` wins when given
    (a manifest that pairs an ECG by patient and nearest time says false); when it is empty, every
    source counts as synchronized: the on-screen trace and the embedded Waveform Sequence are
    recorded with the cine by the scanner, and a separate file named in a manifest row without
    ``ecg_sync`` is taken to be time-aligned as the row claims, as before this column existed.
    """
    if source == NO_ECG:
        return False
    return True if given is None else bool(given)


def _check_coverage(echo_uri: str, video_s: float, ecg_s: float, offset: float, offset_source: str) -> None:
    covered = max(0.0, min(video_s, ecg_s - offset) - max(0.0, -offset))
    if covered < MIN_ECG_COVERAGE * video_s:
        where = {"manifest": "from the manifest", "acquisition_time": "from the acquisition times",
                 "default": "assumed", "screen": "the history drawn on screen"}[offset_source]
        raise IngestError(
            "pair",
            f"{echo_uri}: ECG shorter than the echo: the ECG ({ecg_s:.2f} s, echo frame 0 at "
            f"{offset:.2f} s on it, {where}) covers {covered:.2f} s of the {video_s:.2f} s cine; "
            "the pair is truncated or mismatched",
        )


def _spans(echo_uri: str, video_s: float, prepared: PreparedECG | None, offset: float,
           clip: ClipConfig, mode: str):
    if mode == "cycle":
        if prepared is None:
            raise IngestError("pair", f"{echo_uri}: --clip-mode cycle needs an ECG to find the cardiac "
                                      "cycles; this input has none (use --clip-mode window)")
        spans = cycle_spans(prepared.r_peaks, video_s, prepared.duration_s, clip, offset)
        if not spans:
            raise IngestError(
                "pair",
                f"{echo_uri}: no whole cardiac cycle (R to R, 0.3-2 s) lies inside the {video_s:.2f} s "
                f"cine with {clip.ecg_samples / ECG_FS:.2f} s of ECG after its first R-peak",
            )
        return spans
    spans = window_spans(video_s, prepared.duration_s if prepared else None, clip, offset)
    if not spans:
        ecg_text = f"ECG {prepared.duration_s:.2f} s" if prepared else "no ECG"
        raise IngestError(
            "pair",
            f"{echo_uri}: no clip fits: cine {video_s:.2f} s, {ecg_text}; a clip "
            f"needs {clip.seconds:.2f} s of cine and {clip.ecg_samples / ECG_FS:.2f} s of ECG",
        )
    return spans


def _relabel(message: str, resolved: str, uri: str) -> str:
    """Show the manifest's own path in messages instead of the resolved absolute one."""
    return message.replace(str(resolved), uri)
