"""The evaluation core: how good is a generator, in the literature's terms, with one meaning per term.

``echopulse evaluate`` (:func:`evaluate`), the masking sweep (``jobs/tune_masking.py``) and
``bench/quality.py`` all score with the functions here (no Ray); :data:`TERMS` defines every word
the reports use and is written into each report.

For ``n`` held-out clips of a ``clips/v1`` dataset :func:`evaluate` measures

- tokenizer reconstruction and generation fidelity (:func:`fidelity`): MSE, MAE, PSNR, SSIM
  inside the ultrasound sector (from the clip's own mask) and over the full frame, batched on the
  model's device;
- ECG control (:func:`ecg_control`): matched, shuffled, swapped, chance, real, reconstructed;
- EF: a user-supplied TorchScript regressor (R², MAE, RMSE in EF points; mean over samples and best
  of 3), else the phantom cavity-area estimator, labelled as such;
- FID / FVD (:mod:`echopulse.frechet`) by the StyleGAN-V protocol, or ECHOPulse's per-pair one;
- memorization (:mod:`echopulse.memorization`) against training clips;

all per view (plus ``all``) with the count of clips used and dropped for every metric. It writes
``report.json``, ``report.md`` and ``figures/`` (real vs generated strips per view with the ECG)
and logs them and every metric to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echopulse import fidelity as fid_px
from echopulse import frechet, metrics, storage
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIPS_SCHEMA, read_dataset_info, tensor_column_to_numpy

log = logging.getLogger(__name__)

NOT_COMPUTED = "not computed"
ALL = "all"
MEMORIZATION_PIXELS = 32  # pixel-space memorization compares clips area-averaged to this side
FID_HELP = ("TorchScript Inception-v3 feature network for FID (the standard "
            "'inception-2015-12-05.pt' of StyleGAN3 / StyleGAN-V): called as "
            "net(uint8 images (N, 3, H, W), return_features=True) -> (N, 2048)")
FVD_HELP = ("TorchScript I3D feature network for FVD (the standard 'i3d_torchscript.pt' of "
            "StyleGAN-V): called as net(uint8 videos (N, 3, T, H, W), rescale=True, resize=True, "
            "return_features=True) -> (N, 400)")
EF_HELP = ("TorchScript EF regressor (e.g. an exported EchoNet-Dynamic R(2+1)D): called as "
           "net(float videos (N, 3, T, H, W) in [0, 1]) -> (N,) EF in percent")

# One definition of each term; written into every report (report.json "terms", report.md).
TERMS = {
    "in-sector": "a metric over the pixels inside the ultrasound sector only: the real clip's own mask "
                 "(pixels non-zero in some frame, as ingest keeps them, holes filled); the generated clip "
                 "is scored inside the same mask",
    "full-frame": "the same metric over every pixel of the frame, black background included (what "
                  "papers report; inflated by the background)",
    "reconstruction": "decode(encode(clip)) by the bundled tokenizer, against the clip",
    "generation": "the clip generated from the real clip's ECG and first frame, against the real clip, "
                  "over the frames after the given first frame; averaged over samples",
    "partner": "for each clip, a clip of another study (the same position in the next study, cyclic); "
               "the next clip when every clip is of one study",
    "matched": "ECG-sync of the clip generated from its own ECG, scored against that ECG",
    "shuffled": "ECG-sync of the clip generated from the partner's ECG (same first frame), scored "
                "against the clip's own ECG: what is left if the generator ignored the ECG",
    "swapped": "ECG-sync of the clip generated from the partner's ECG, scored against the ECG it was "
               "given: does motion follow the ECG even when the first frame disagrees",
    "chance": "ECG-sync of the clip generated from its own ECG, scored against the partner's ECG: the "
              "score's chance level",
    "real": "ECG-sync of the real clip against its own ECG: the metric's ceiling on this data",
    "reconstructed": "ECG-sync of the tokenizer reconstruction against the clip's own ECG",
    "ecg-sync": "Pearson r of the LV cavity-area curve vs the ECG-implied volume curve "
                "(echopulse.metrics.ecg_sync_score); nan (dropped) when no R-peak is found",
    "mean over samples": "EF agreement over every generated sample of every clip",
    "best of k": "EF agreement using, per clip, the sample among its first k (3) whose EF is closest to "
                 "the truth (EchoDiffusion's protocol)",
    "phantom estimator": "EF = 1 - (A_min / A_max)^1.5 from the LV cavity area "
                         "(echopulse.metrics.ef_from_video): a heuristic for phantom clips, not a regressor",
    "used / dropped": "clips with a finite value / clips without one (no R-peak, no LV found, no known "
                      "EF, empty sector), per metric and view",
    "memorization share": "the share of generated clips nearer (RMS, frames area-averaged to at most "
                          "32 x 32, or tokenizer latents) to a training clip than the nearest held-out "
                          "real clip is to any training clip",
}


@dataclass(frozen=True)
class EvalOptions:
    """What :func:`evaluate` computes and how.

    Attributes:
        n: clips to evaluate (held-out splits first).
        seed: sampling seed; clip ``i``'s sample ``s`` uses ``seed + i * samples_per_clip + s``.
        samples_per_clip: generated samples per real clip (FID/FVD, EF and memorization use all).
        steps, guidance: override the checkpoint's sampling settings.
        fid_weights, fvd_weights, ef_model: TorchScript files (``FID_HELP``, ``FVD_HELP``, ``EF_HELP``).
        protocol: ``stylegan-v`` or ``echopulse-paper`` (:mod:`echopulse.frechet`).
        min_fvd_clips: fewest real clips FID/FVD are computed from (stylegan-v); fewer is refused.
        fvd_frames: consecutive frames per clip for FVD (16 in fvd2048_16f).
        train_clips: ``clips/v1`` dataset whose train split is the memorization reference
            (default: the evaluated dataset's own train split).
        memorization_space: ``pixel`` or ``latent`` (the tokenizer's pre-quantization latents).
        max_train_clips: training clips compared against, at most.
        batch: clips per batch for the tokenizer and the feature networks.
    """

    n: int = 16
    seed: int = 0
    samples_per_clip: int = 1
    steps: int | None = None
    guidance: float | None = None
    fid_weights: str | None = None
    fvd_weights: str | None = None
    ef_model: str | None = None
    protocol: str = frechet.STYLEGAN_V
    min_fvd_clips: int = 256
    fvd_frames: int = frechet.FVD_FRAMES
    train_clips: str | None = None
    memorization_space: str = "pixel"
    max_train_clips: int = 1024
    batch: int = 8


# ---- data ---------------------------------------------------------------------------------------


def read_clips(clips: str, n: int, splits: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Up to ``n`` clips of a ``clips/v1`` dataset in ``clip_id`` order, from ``splits`` (default:
    the held-out splits test/val when present, else every split).

    Returns:
        ``frames`` uint8 (n, T, H, W), ``ecg`` float32 (n, 12, L), ``ecg_leads`` bool (n, 12),
        ``ef`` (n,) float fraction (nan where unknown), ``heart_rate_bpm`` (n,), ``fps``,
        ``clip_id``, ``split``, ``view``, ``study`` lists, and ``splits`` (those read); only
        ``clip_id`` (empty) and ``splits`` when those splits hold no clip.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    read_dataset_info(clips, CLIPS_SCHEMA)
    fs, path = storage.arrow_filesystem(storage.join(clips, "clips"))
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        keys = dataset.to_table(columns=["clip_id", "split"]).to_pydict()
    except Exception as exc:
        raise EchoPulseError(f"{clips}: clips could not be read ({type(exc).__name__}: {exc})") from None
    if not keys["clip_id"]:
        raise EchoPulseError(f"{clips}: the clips dataset is empty")
    if splits is None:
        held_out = [s for s in ("test", "val") if s in keys["split"]]
        splits = tuple(held_out or sorted(set(keys["split"])))
    chosen = sorted(c for c, s in zip(keys["clip_id"], keys["split"]) if s in splits)[:n]
    if not chosen:
        return {"clip_id": [], "splits": list(splits)}
    table = dataset.to_table(filter=pc.field("clip_id").isin(chosen))
    table = table.take(np.argsort(np.asarray(table.column("clip_id").to_pylist())))

    def floats(name: str) -> np.ndarray:
        return np.asarray([np.nan if v is None else v for v in table.column(name).to_pylist()], np.float64)

    return {
        "frames": np.array(tensor_column_to_numpy(table.column("frames"))),
        "ecg": tensor_column_to_numpy(table.column("ecg")).astype(np.float32),
        "ecg_leads": np.asarray(table.column("ecg_leads").to_pylist(), dtype=bool),
        "ef": floats("ef"),
        "heart_rate_bpm": floats("heart_rate_bpm"),
        "fps": [float(v) for v in table.column("fps").to_pylist()],
        "clip_id": table.column("clip_id").to_pylist(),
        "split": table.column("split").to_pylist(),
        "view": [v or "unknown" for v in table.column("view").to_pylist()],
        "study": table.column("study_key").to_pylist(),
        "splits": list(splits),
    }


read_eval_clips = read_clips  # the name earlier callers used


# ---- metric cores (shared by evaluate, tune and bench/quality) ----------------------------------


def partners(groups) -> np.ndarray:
    """Each clip's partner (see ``TERMS["partner"]``): a clip of another group (study).

    Raises:
        ValueError: fewer than two clips.
    """
    groups = np.asarray(groups)
    if len(groups) < 2:
        raise ValueError("a partner ECG needs at least two clips")
    order = sorted(set(groups.tolist()))
    if len(order) < 2:
        return (np.arange(len(groups)) + 1) % len(groups)
    by_group = {g: np.flatnonzero(groups == g) for g in order}
    out = np.empty(len(groups), dtype=np.int64)
    for k, g in enumerate(order):
        other = by_group[order[(k + 1) % len(order)]]
        for pos, i in enumerate(by_group[g]):
            out[i] = other[pos % len(other)]
    return out


def sync_scores(videos, ecg, fps, heart_rate_bpm=None) -> np.ndarray:
    """``ecg_sync_score`` of each clip against each ECG (nan where no R-peak is found)."""
    n = len(videos)
    fps = np.broadcast_to(np.asarray(fps, np.float64), (n,))
    hr = np.full(n, np.nan) if heart_rate_bpm is None else np.asarray(heart_rate_bpm, np.float64)
    return np.asarray([metrics.ecg_sync_score(v, e, f, heart_rate_bpm=None if not np.isfinite(h) else h)
                       for v, e, f, h in zip(videos, ecg, fps, hr)], dtype=np.float64)


def ecg_control(matched, ecg, partner, fps, heart_rate_bpm=None, swapped=None, real=None,
                reconstructed=None) -> dict[str, np.ndarray]:
    """Per-clip ECG-control scores by ``TERMS``: matched, chance, and (when given) shuffled,
    swapped, real, reconstructed. ``partner`` indexes each clip's partner clip."""
    ecg = np.asarray(ecg)
    hr = None if heart_rate_bpm is None else np.asarray(heart_rate_bpm, np.float64)
    other_ecg, other_hr = ecg[partner], None if hr is None else hr[partner]
    out = {"matched": sync_scores(matched, ecg, fps, hr),
           "chance": sync_scores(matched, other_ecg, fps, other_hr)}
    if swapped is not None:
        out["shuffled"] = sync_scores(swapped, ecg, fps, hr)
        out["swapped"] = sync_scores(swapped, other_ecg, fps, other_hr)
    if real is not None:
        out["real"] = sync_scores(real, ecg, fps, hr)
    if reconstructed is not None:
        out["reconstructed"] = sync_scores(reconstructed, ecg, fps, hr)
    return out


def fidelity(a, b, masks=None, first: int = 0, device=None, batch: int = 32) -> dict[str, np.ndarray]:
    """Per-clip pixel fidelity of clips ``a`` against ``b`` (N, T, H, W) from frame ``first`` on,
    batched on ``device``: ``mse``, ``mae``, ``psnr``, ``ssim`` (full-frame) and, with ``masks``
    (N, H, W), ``sector_*`` (in-sector). See :func:`echopulse.fidelity.pair_metrics`."""
    parts = []
    for k in range(0, len(a), batch):
        m = None if masks is None else masks[k:k + batch]
        parts.append(fid_px.pair_metrics(a[k:k + batch, first:], b[k:k + batch, first:], m, device=device))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def sector_masks(frames: np.ndarray) -> np.ndarray:
    """Each real clip's own sector mask, bool (N, H, W)."""
    return np.stack([fid_px.sector_mask(f) for f in frames]) if len(frames) else np.zeros((0, 1, 1), bool)


def summarize(values: dict[str, np.ndarray], views: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per view (and ``all``): each metric's mean over the clips with a finite value, and the
    counts used and dropped. PSNR means keep ``inf`` (identical clips), which is the truth."""
    views = list(views)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for view in [ALL, *sorted(set(views))]:
        pick = np.asarray([view == ALL or v == view for v in views])
        row = {}
        for name, vals in values.items():
            v = np.asarray(vals, np.float64)[pick]
            ok = ~np.isnan(v)
            mean = float(np.mean(v[ok])) if ok.any() else float("nan")
            row[name] = {"mean": mean, "used": int(ok.sum()), "dropped": int((~ok).sum())}
        table[view] = row
    return table


def ef_section(truth_pct: np.ndarray, real_pred: np.ndarray, gen_pred: np.ndarray, views: list[str],
               estimator: str) -> dict[str, Any]:
    """EF agreement per view: the estimator on real clips (its floor), on generated clips (mean
    over samples, best of 3). ``gen_pred`` is (N, S) in EF points."""
    from echopulse.ef_regression import BEST_OF, agreement, best_of

    views = np.asarray(views)
    k = min(BEST_OF, gen_pred.shape[1])
    out: dict[str, Any] = {"estimator": estimator, "units": "EF points (percent)", "best_of_k": k}
    for view in [ALL, *sorted(set(views.tolist()))]:
        pick = np.ones(len(views), bool) if view == ALL else views == view
        known = pick & np.isfinite(truth_pct)
        t, g = truth_pct[known], gen_pred[known]
        out[view] = {
            "real": agreement(real_pred[known], t),
            "generated_mean_over_samples": agreement(g.ravel(), np.repeat(t, g.shape[1])),
            f"generated_best_of_{k}": agreement(best_of(g, t, k), t) if len(t) else agreement([], []),
            "clips_with_known_ef": int(known.sum()), "clips_without_ef": int((pick & ~known).sum()),
        }
    return out


# ---- evaluate -----------------------------------------------------------------------------------


def _check_feature_request(opts: EvalOptions, clips: str, count: int, frames: int) -> None:
    """Refuse, before any generation, FID/FVD requests that cannot give a meaningful number."""
    if opts.protocol not in frechet.PROTOCOLS:
        raise EchoPulseError(f"--protocol must be one of {', '.join(frechet.PROTOCOLS)}, got {opts.protocol!r}")
    wants = opts.fid_weights or (opts.fvd_weights and opts.protocol == frechet.STYLEGAN_V)
    if wants and opts.protocol == frechet.STYLEGAN_V and count < opts.min_fvd_clips:
        raise EchoPulseError(
            f"{clips}: FID/FVD from {count} real clips would be meaningless; the StyleGAN-V protocol "
            f"needs at least --min-fvd-clips {opts.min_fvd_clips} (raise --n or use more clips)")
    if opts.fvd_weights and opts.protocol == frechet.STYLEGAN_V and frames < opts.fvd_frames:
        raise EchoPulseError(f"{clips}: FVD needs {opts.fvd_frames} consecutive frames per clip "
                             f"(--fvd-frames), the clips have {frames}")


def _feature_distances(opts: EvalOptions, real: np.ndarray, fake: np.ndarray, views: list[str],
                       fid_net, fvd_net, device) -> dict[str, Any]:
    """``fid`` and ``fvd`` sections, overall and per view with enough clips. ``fake`` is (N, S, T, H, W)."""
    s = fake.shape[1]
    gen_views = np.repeat(np.asarray(views), s)
    flat = fake.reshape(-1, *fake.shape[2:])
    out: dict[str, Any] = {}
    for name, net, missing in (("fid", fid_net, "--fid-weights"),
                               ("fvd", fvd_net if opts.protocol == frechet.STYLEGAN_V else fid_net,
                                "--fvd-weights" if opts.protocol == frechet.STYLEGAN_V else "--fid-weights")):
        if net is None:
            out[name] = {"status": NOT_COMPUTED, "reason": f"no feature-network weights file given ({missing})"}
            continue
        section: dict[str, Any] = {}
        for view in [ALL, *sorted(set(views))]:
            pick = np.ones(len(views), bool) if view == ALL else np.asarray(views) == view
            gpick = np.ones(len(gen_views), bool) if view == ALL else gen_views == view
            r, g = real[pick], flat[gpick]
            if opts.protocol == frechet.ECHOPULSE_PAPER:
                pairs = [(r[i], fake[np.flatnonzero(pick)[i], j]) for i in range(len(r)) for j in range(s)]
                fn = frechet.paper_fid if name == "fid" else frechet.paper_fvd
                section[view] = fn(net, pairs, device=device)
            elif len(r) < opts.min_fvd_clips:
                section[view] = {"status": NOT_COMPUTED,
                                 "reason": f"{len(r)} real clips < --min-fvd-clips {opts.min_fvd_clips}"}
            elif name == "fid":
                section[view] = frechet.stylegan_v_fid(net, r, g, device=device)
            else:
                section[view] = frechet.stylegan_v_fvd(net, r, g, opts.fvd_frames, device=device)
        out[name] = {**section[ALL], "per_view": {k: v for k, v in section.items() if k != ALL}}
    return out


def _memorization(opts: EvalOptions, model, clips: str, data: dict[str, Any], generated: np.ndarray,
                  device) -> dict[str, Any]:
    import torch

    from echopulse.memorization import memorization_check

    source = opts.train_clips or clips
    train = read_clips(source, opts.max_train_clips, splits=("train",))
    if not train["clip_id"]:
        return {"status": NOT_COMPUTED, "reason": f"{source} has no train split (--train-clips)"}
    if train["frames"].shape[1:] != data["frames"].shape[1:]:
        raise EchoPulseError(f"{source}: training clips are {train['frames'].shape[1:]}, evaluated clips "
                             f"{data['frames'].shape[1:]}")
    if opts.memorization_space not in ("pixel", "latent"):
        raise EchoPulseError(f"--memorization-space must be pixel or latent, got {opts.memorization_space!r}")

    def embed(videos: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for k in range(0, len(videos), opts.batch):
                x = torch.as_tensor(videos[k:k + opts.batch], device=model.device)
                if opts.memorization_space == "pixel":  # area-averaged to at most 32 x 32: bounded memory
                    side = min(MEMORIZATION_PIXELS, x.shape[-1])
                    y = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, (side, side))
                else:
                    y = model.tokenizer.encode_continuous(x)
                out.append(y.flatten(1).float().cpu().numpy())
        return np.concatenate(out)

    s = generated.shape[1]
    ids = [f"{c}#{j}" for c in data["clip_id"] for j in range(s)]
    return memorization_check(embed(generated.reshape(-1, *generated.shape[2:])), embed(data["frames"]),
                              embed(train["frames"]), ids, train["clip_id"], opts.memorization_space,
                              device=device)


def _reconstruct(model, frames: np.ndarray, batch: int) -> np.ndarray:
    return reconstruct(model.tokenizer, frames, batch, device=model.device)


def reconstruct(tokenizer, frames: np.ndarray, batch: int = 8, device=None) -> np.ndarray:
    """uint8 ``decode(encode(clip))`` of uint8 clips (N, T, H, W), ``batch`` clips at a time on
    ``device`` (default: the tokenizer's)."""
    import torch

    device = device if device is not None else next(tokenizer.parameters()).device
    out = []
    with torch.inference_mode():
        for k in range(0, len(frames), batch):
            video = torch.as_tensor(frames[k:k + batch], device=device)
            recon = tokenizer.decode_from_indices(tokenizer.encode(video))
            out.append((recon.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def evaluate(checkpoint: str, clips: str, out: str, options: EvalOptions | None = None,
             tracking_uri: str | None = None, device: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Evaluate a generator checkpoint; write ``OUT/report.json``, ``report.md`` and ``figures/``.

    Args:
        checkpoint: generator checkpoint (tokenizer bundled).
        clips: a ``clips/v1`` dataset (ingest output) made with the model's clip geometry.
        out: output directory.
        options: what to compute (:class:`EvalOptions`); keyword ``overrides`` replace its fields.
        tracking_uri: MLflow tracking URI; ``None`` skips MLflow.
        device: torch device for the models and the batched metrics.

    Returns:
        The report (as written to ``report.json``).

    Raises:
        EchoPulseError: bad input (one line, naming the file or flag).
    """
    from dataclasses import replace

    opts = replace(options or EvalOptions(), **overrides)
    if opts.n < 1:
        raise EchoPulseError(f"--n must be at least 1, got {opts.n}")
    if opts.samples_per_clip < 1:
        raise EchoPulseError(f"--samples-per-clip must be at least 1, got {opts.samples_per_clip}")
    fid_net, fvd_net, ef_net = _feature_nets(opts)
    data = read_clips(clips, opts.n)
    real = data["frames"]
    count = real.shape[0]
    _check_feature_request(opts, clips, count, real.shape[1])
    model = _load_matching_model(checkpoint, clips, data, device)
    dev = model.device
    for net in (fid_net, fvd_net, ef_net):
        if net is not None:
            net.to(dev)
    started = time.time()
    partner = partners(data["study"]) if count >= 2 else None
    generated, swapped = _generate_all(model, data, partner, opts)
    recon = _reconstruct(model, real, opts.batch)
    values = _metric_values(data, recon, generated, swapped, partner, dev)
    estimator, real_ef, gen_ef = _ef_estimates(opts, ef_net, real, generated, dev)

    report = _header(model, checkpoint, clips, data, opts)
    table = summarize(values, data["view"])
    report["per_view"] = table
    report.update(_sections(table[ALL], count))
    report["ef"] = ef_section(data["ef"] * 100.0, real_ef, gen_ef, data["view"], estimator)
    report.update(_feature_distances(opts, real, generated, data["view"], fid_net, fvd_net, dev))
    report["memorization"] = _memorization(opts, model, clips, data, generated, dev)
    report["seconds"] = round(time.time() - started, 3)
    report["terms"] = TERMS
    report["per_clip"] = _per_clip(data, values, real_ef, gen_ef)
    figures = _figures(out, data, real, generated)
    report["figures"] = {view: os.path.relpath(p, out) for view, p in figures.items()}
    paths = write_report(report, out)
    if tracking_uri:
        _log_to_mlflow(report, {**paths, **{f"fig-{k}": v for k, v in figures.items()}}, tracking_uri)
        write_report(report, out)  # with the run id
    return report


def _feature_nets(opts: EvalOptions) -> tuple[Any, Any, Any]:
    """The FID, FVD and EF TorchScript networks the options name (``None`` for each not named)."""
    fid_net = frechet.load_torchscript(opts.fid_weights, "FID (Inception-v3) feature network") if opts.fid_weights else None
    fvd_net = frechet.load_torchscript(opts.fvd_weights, "FVD (I3D) feature network") if opts.fvd_weights else None
    ef_net = frechet.load_torchscript(opts.ef_model, "EF regressor") if opts.ef_model else None
    return fid_net, fvd_net, ef_net


def _load_matching_model(checkpoint: str, clips: str, data: dict[str, Any], device: str | None):
    """Load the generator and check that the clips have its clip geometry.

    Raises:
        EchoPulseError: the clips' frames, size or ECG length differ from the model's.
    """
    from echopulse.generate import EchoGenerator

    model = EchoGenerator.from_checkpoint(checkpoint, device=device)
    clip = model.clip
    _, frames, size = data["frames"].shape[:3]
    if (frames, size, data["ecg"].shape[2]) != (clip.frames, clip.size, clip.ecg_samples):
        raise EchoPulseError(
            f"{clips}: clips are {frames} frames of {size}x{size} with {data['ecg'].shape[2]} ECG samples; "
            f"the model makes {clip.frames} frames of {clip.size}x{clip.size} from {clip.ecg_samples}")
    return model


def _generate_all(model, data: dict[str, Any], partner: np.ndarray | None,
                  opts: EvalOptions) -> tuple[np.ndarray, np.ndarray | None]:
    """Generate ``samples_per_clip`` videos per clip from its own ECG, and one from its partner's.

    Returns:
        ``(generated, swapped)``: ``(count, samples, T, H, W)`` uint8, and ``(count, T, H, W)``
        from the partner's ECG (``None`` without partners). Seeds are ``seed + i * samples + j``.
    """
    from tqdm.auto import tqdm

    real, clip, s = data["frames"], model.clip, opts.samples_per_clip
    generated = np.zeros((real.shape[0], s, *real.shape[1:]), dtype=np.uint8)
    swapped = np.zeros_like(real) if partner is not None else None

    def gen(ecg: np.ndarray, i: int, seed: int) -> np.ndarray:
        return model.generate(ecg, first_frame=real[i][0], seconds=clip.seconds, seed=seed,
                              steps=opts.steps, guidance=opts.guidance)

    for i in tqdm(range(real.shape[0]), desc="evaluate", unit="clip", disable=None):
        for j in range(s):
            generated[i, j] = gen(data["ecg"][i], i, opts.seed + i * s + j)
        if partner is not None:
            swapped[i] = gen(data["ecg"][partner[i]], i, opts.seed + i * s)
    return generated, swapped


def _metric_values(data: dict[str, Any], recon: np.ndarray, generated: np.ndarray, swapped: np.ndarray | None,
                   partner: np.ndarray | None, device) -> dict[str, np.ndarray]:
    """Per-clip fidelity (reconstruction and generation) and ECG-sync values, keyed by metric."""
    real = data["frames"]
    masks = sector_masks(real)
    values: dict[str, np.ndarray] = {}
    for key, v in fidelity(recon, real, masks, device=device).items():
        values[f"recon_{key}"] = v
    gen_scores = [fidelity(generated[:, j], real, masks, first=1, device=device) for j in range(generated.shape[1])]
    for key in gen_scores[0]:
        values[f"gen_{key}"] = np.mean([g[key] for g in gen_scores], axis=0)
    if partner is not None:
        control = ecg_control(generated[:, 0], data["ecg"], partner, data["fps"], data["heart_rate_bpm"],
                              swapped=swapped, real=real, reconstructed=recon)
    else:
        control = {"matched": sync_scores(generated[:, 0], data["ecg"], data["fps"], data["heart_rate_bpm"]),
                   "real": sync_scores(real, data["ecg"], data["fps"], data["heart_rate_bpm"])}
    for key, v in control.items():
        values[f"ecg_sync_{key}"] = v
    return values


def _ef_estimates(opts: EvalOptions, ef_net, real: np.ndarray, generated: np.ndarray,
                  device) -> tuple[str, np.ndarray, np.ndarray]:
    """EF (%) of the real and generated videos: the regressor's when given, else the phantom estimator's.

    Returns:
        ``(estimator, real_ef, gen_ef)``: a description, ``(count,)`` and ``(count, samples)``.
    """
    count, s = generated.shape[:2]
    if ef_net is not None:
        estimator = f"regressor {Path(opts.ef_model).name}"
        real_ef = _predict_ef(ef_net, real, opts.batch, device)
        gen_ef = _predict_ef(ef_net, generated.reshape(-1, *real.shape[1:]), opts.batch, device).reshape(count, s)
    else:
        estimator = "phantom estimator (LV cavity area; not a regressor)"
        real_ef = np.asarray([metrics.ef_from_video(v) for v in real]) * 100.0
        gen_ef = np.asarray([[metrics.ef_from_video(v) for v in g] for g in generated]) * 100.0
    return estimator, real_ef, gen_ef


def _predict_ef(net, videos: np.ndarray, batch: int, device) -> np.ndarray:
    from echopulse.ef_regression import predict_ef

    return predict_ef(net, videos, batch=batch, device=device)


def _header(model, checkpoint: str, clips: str, data: dict[str, Any], opts: EvalOptions) -> dict[str, Any]:
    sampling = model.sampling
    views = data["view"]
    return {
        "checkpoint": checkpoint,
        "generator_id": model.info.get("model_id"),
        "tokenizer_id": model.info.get("extra", {}).get("tokenizer_id"),
        "clips": clips,
        "splits": data["splits"],
        "n": len(data["clip_id"]),
        "views": {v: views.count(v) for v in sorted(set(views))},
        "seed": opts.seed,
        "samples_per_clip": opts.samples_per_clip,
        "seeds": "clip i, sample s: seed + i * samples_per_clip + s; the swapped generation of clip i "
                 "uses seed + i * samples_per_clip",
        "sampling": {"steps": opts.steps or sampling.steps,
                     "guidance": sampling.guidance if opts.guidance is None else opts.guidance,
                     "temperature": sampling.temperature, "schedule": sampling.schedule},
        "protocol": opts.protocol,
    }


def _sections(row: dict[str, dict[str, Any]], count: int) -> dict[str, Any]:
    """The ``all`` row as the report's headline sections (means only; counts are in per_view)."""
    def pick(prefix: str) -> dict[str, float]:
        return {k[len(prefix):]: v["mean"] for k, v in row.items() if k.startswith(prefix)}

    control = pick("ecg_sync_")
    if "shuffled" in control:
        control["matched_minus_shuffled"] = control["matched"] - control["shuffled"]
    else:
        control["shuffled"] = NOT_COMPUTED + " (needs at least 2 clips)"
    return {"tokenizer_reconstruction": pick("recon_"),
            "generation": {**pick("gen_"), "note": TERMS["generation"]},
            "ecg_control": control}


def _per_clip(data: dict[str, Any], values: dict[str, np.ndarray], real_ef, gen_ef) -> list[dict[str, Any]]:
    rows = []
    for i, cid in enumerate(data["clip_id"]):
        row = {"clip_id": cid, "split": data["split"][i], "view": data["view"][i]}
        row.update({k: float(v[i]) for k, v in values.items()})
        row["ef_true"] = None if math.isnan(data["ef"][i]) else float(data["ef"][i] * 100)
        row["ef_real_estimate"] = float(real_ef[i])
        row["ef_generated_estimates"] = [float(x) for x in gen_ef[i]]
        rows.append(row)
    return rows


def _figures(out: str, data: dict[str, Any], real: np.ndarray, generated: np.ndarray) -> dict[str, str]:
    """One real-vs-generated strip per view (its first clip), with the ECG under it."""
    from echopulse.report_figures import strip_figure

    directory = Path(out) / "figures"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for view in sorted(set(data["view"])):
        i = data["view"].index(view)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in view)
        paths[view] = strip_figure(real[i], generated[i, 0], data["ecg"][i], data["fps"][i],
                                   f"{view}: real (top) vs generated (bottom)",
                                   str(directory / f"strip_{safe}.png"), lead_mask=data["ecg_leads"][i])
    return paths


# ---- report -------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4g}")
    return str(value)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown document: headline, per-view table with counts, EF, FID/FVD,
    memorization, figures, terms."""
    lines = [
        "# EchoPulse evaluation",
        "",
        f"- checkpoint: `{report['checkpoint']}` (generator {report['generator_id']}, "
        f"tokenizer {report['tokenizer_id']})",
        f"- clips: `{report['clips']}`, {report['n']} clips from split(s) {', '.join(report['splits'])}; "
        f"views {', '.join(f'{k} {v}' for k, v in report['views'].items())}",
        f"- sampling: {', '.join(f'{k} {v}' for k, v in report['sampling'].items())}; seed {report['seed']}, "
        f"{report['samples_per_clip']} sample(s) per clip ({report['seeds']})",
        "",
        "## Per view (mean; used / dropped clips)",
        "",
    ]
    views = list(report["per_view"])
    lines += ["| metric | " + " | ".join(views) + " |", "| --- |" + " --- |" * len(views)]
    for name in report["per_view"][ALL]:
        cells = [f"{_fmt(report['per_view'][v][name]['mean'])} ({report['per_view'][v][name]['used']}/"
                 f"{report['per_view'][v][name]['dropped']})" for v in views]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ef = report["ef"]
    lines += ["", f"## EF ({ef['estimator']}; {ef['units']})", "",
              "| view | clips (known EF / unknown) | estimator on real R² / MAE / RMSE | generated, mean over "
              f"samples R² / MAE / RMSE | generated, best of {ef['best_of_k']} R² / MAE / RMSE |",
              "| --- | --- | --- | --- | --- |"]
    for view in views:
        if view not in ef:
            continue
        e = ef[view]

        def trio(d: dict[str, float]) -> str:
            return " / ".join(_fmt(d[k]) for k in ("r2", "mae", "rmse"))

        best = e["generated_best_of_" + str(ef["best_of_k"])]
        lines.append(f"| {view} | {e['clips_with_known_ef']} / {e['clips_without_ef']} | {trio(e['real'])} | "
                     f"{trio(e['generated_mean_over_samples'])} | {trio(best)} |")
    lines += ["", f"## FID / FVD (protocol {report['protocol']})", ""]
    for name in ("fid", "fvd"):
        sec = report[name]
        if "value" in sec:
            counts = ", ".join(f"{k} {v}" for k, v in sec.items() if k not in ("value", "protocol", "per_view"))
            lines.append(f"- {name.upper()}: {_fmt(sec['value'])} ({sec['protocol']}; {counts})")
        else:
            lines.append(f"- {name.upper()}: {sec.get('status')} ({sec.get('reason')})")
        for view, v in sec.get("per_view", {}).items():
            lines.append(f"  - {view}: {_fmt(v['value']) if 'value' in v else v.get('reason')}")
    mem = report["memorization"]
    lines += ["", "## Memorization", ""]
    if "share_closer_than_heldout" in mem:
        lines.append(f"- {mem['space']} space: {_fmt(mem['share_closer_than_heldout'])} of "
                     f"{mem['generated_clips']} generated clips flagged (threshold {_fmt(mem['threshold'])}, "
                     f"{mem['train_clips']} training clips, {mem['heldout_clips']} held-out)")
        for f in mem["flagged"][:20]:
            lines.append(f"  - `{f['generated']}` near training clip `{f['nearest_train']}` ({_fmt(f['distance'])})")
    else:
        lines.append(f"- {mem.get('status')} ({mem.get('reason')})")
    if report.get("figures"):
        lines += ["", "## Real vs generated", ""]
        for view, path in report["figures"].items():
            lines += [f"### {view}", "", f"![{view}]({path})", ""]
    lines += ["", "## Terms", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["terms"].items()]
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str) -> dict[str, str]:
    """Write ``report.json`` and ``report.md`` under ``out`` (each via a temporary file)."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in (("report.json", json.dumps(_json_safe(report), indent=2)),
                       ("report.md", format_markdown(report))):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, directory / name)
        paths[name] = str(directory / name)
    return paths


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Every finite number of the report as a flat MLflow metric name (``view/metric``, ``ef/...``)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix.replace(" ", "_").replace("#", "_")] = float(value)

    for section in ("per_view", "ef", "fid", "fvd"):
        walk(section, report.get(section, {}))
    mem = report.get("memorization", {})
    walk("memorization", {k: v for k, v in mem.items() if k != "flagged"})
    for section, prefix in (("tokenizer_reconstruction", "recon"), ("generation", "gen"),
                            ("ecg_control", "ecg_sync")):
        for key, value in report.get(section, {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{prefix}_{key}"] = float(value)
    return out


def _log_to_mlflow(report: dict[str, Any], paths: dict[str, str], tracking_uri: str) -> None:
    from echopulse.tracking import tracked_run

    params = {"checkpoint": report["checkpoint"], "clips": report["clips"], "n": report["n"],
              "seed": report["seed"], "samples_per_clip": report["samples_per_clip"],
              "sampling": report["sampling"], "protocol": report["protocol"],
              "generator_id": report["generator_id"], "tokenizer_id": report["tokenizer_id"]}
    with tracked_run(tracking_uri, "evaluate", params=params) as run:
        run.log_metrics(flat_metrics(report), step=0)
        report["mlflow_run_id"] = run.run_id
        for key, path in paths.items():
            run.log_artifact(path, "evaluation/figures" if key.startswith("fig-") else "evaluation")

