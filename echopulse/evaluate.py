"""``echopulse evaluate``: how good is a generator checkpoint, in the literature's terms.

For ``n`` held-out clips of a ``clips/v1`` dataset it measures

- tokenizer reconstruction: MSE, MAE, PSNR, SSIM of decode(encode(clip)) against the clip;
- generation: the clip generated from the real clip's ECG and first frame against the real clip
  (SSIM, PSNR, MSE over the frames after the given first frame);
- ECG control (:func:`echopulse.metrics.ecg_sync_score`): the generated clip against the ECG it was
  given ("matched") and against another clip's ECG ("shuffled", the chance level); a generation
  conditioned on another clip's ECG scored against that ECG ("swapped": does motion follow the
  ECG even when the first frame disagrees); and the real clips against their ECG (the metric's
  ceiling on this data);
- EF error where the clip's EF is known (cavity-area EF, :func:`echopulse.metrics.ef_from_video`),
  with the same estimator on the real clip as its floor;
- FID / FVD only from the standard feature networks in files the user gives; otherwise the report
  says "not computed".

It writes ``report.json`` and ``report.md`` and logs both (and the numbers) to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from echopulse import metrics, storage
from echopulse.errors import EchoPulseError
from echopulse.schema import CLIPS_SCHEMA, read_dataset_info, tensor_column_to_numpy

log = logging.getLogger(__name__)

NOT_COMPUTED = "not computed"
FID_HELP = ("TorchScript Inception-v3 feature network for FID (the standard "
            "'inception-2015-12-05.pt' used by StyleGAN3 / clean-fid): called as "
            "net(uint8 images (N, 3, H, W), return_features=True) -> (N, 2048)")
FVD_HELP = ("TorchScript I3D feature network for FVD (the standard 'i3d_torchscript.pt' of "
            "StyleGAN-V / fvd-comparison): called as net(videos (N, 3, T, H, W) in [-1, 1], "
            "rescale=False, resize=True, return_features=True) -> (N, 400)")


def read_eval_clips(clips: str, n: int) -> dict[str, Any]:
    """Up to ``n`` clips of a ``clips/v1`` dataset, held-out splits first, in ``clip_id`` order.

    Returns:
        ``frames`` uint8 (n, T, H, W), ``ecg`` float32 (n, 12, L), ``ecg_leads`` bool (n, 12),
        ``ef`` (n,) float (nan where unknown), ``fps``, ``clip_id`` and ``split`` lists, and ``splits``
        (which splits they came from).
    """
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
    held_out = [s for s in ("test", "val") if s in keys["split"]]
    splits = held_out or sorted(set(keys["split"]))
    chosen = sorted(c for c, s in zip(keys["clip_id"], keys["split"]) if s in splits)[:n]
    import pyarrow.compute as pc

    table = dataset.to_table(filter=pc.field("clip_id").isin(chosen))
    order = np.argsort(np.asarray(table.column("clip_id").to_pylist()))
    table = table.take(order)
    ef = np.asarray([np.nan if v is None else v for v in table.column("ef").to_pylist()], dtype=np.float64)
    return {
        "frames": np.array(tensor_column_to_numpy(table.column("frames"))),
        "ecg": tensor_column_to_numpy(table.column("ecg")).astype(np.float32),
        "ecg_leads": np.asarray(table.column("ecg_leads").to_pylist(), dtype=bool),
        "ef": ef,
        "fps": [float(v) for v in table.column("fps").to_pylist()],
        "clip_id": table.column("clip_id").to_pylist(),
        "split": table.column("split").to_pylist(),
        "splits": splits,
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _load_feature_net(weights: str | None, name: str):
    if not weights:
        return None
    import torch

    if not Path(weights).is_file():
        raise EchoPulseError(f"{weights}: {name} feature-network weights file not found")
    try:
        return torch.jit.load(weights, map_location="cpu").eval()
    except Exception as exc:
        raise EchoPulseError(f"{weights}: not a TorchScript {name} feature network "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _fid(net, real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    """FID over all frames of all clips (grey repeated to RGB, uint8 as the network expects)."""
    import torch

    def features(videos: np.ndarray) -> np.ndarray:
        images = torch.as_tensor(videos.reshape(-1, *videos.shape[-2:]))[:, None].repeat(1, 3, 1, 1)
        with torch.inference_mode():
            return torch.cat([net(chunk, return_features=True) for chunk in images.split(64)]).numpy()

    return {"value": metrics.frechet_distance(features(real), features(fake)),
            "samples": int(real.shape[0] * real.shape[1])}


def _fvd(net, real: np.ndarray, fake: np.ndarray) -> dict[str, Any]:
    """FVD over clips (grey repeated to RGB, scaled to [-1, 1], resized by the network)."""
    import torch

    def features(videos: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(videos).float()[:, None].repeat(1, 3, 1, 1, 1) / 127.5 - 1  # (n, 3, t, h, w)
        with torch.inference_mode():
            return torch.cat([net(chunk, rescale=False, resize=True, return_features=True)
                              for chunk in x.split(16)]).numpy()

    return {"value": metrics.frechet_distance(features(real), features(fake)), "samples": int(len(real))}


def evaluate(checkpoint: str, clips: str, out: str, n: int = 16, seed: int = 0,
             steps: int | None = None, guidance: float | None = None,
             fid_weights: str | None = None, fvd_weights: str | None = None,
             tracking_uri: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Evaluate a generator checkpoint on ``n`` clips; write ``OUT/report.json`` and ``report.md``.

    Args:
        checkpoint: generator checkpoint (tokenizer bundled).
        clips: a ``clips/v1`` dataset (ingest output) made with the model's clip geometry.
        out: output directory for the reports.
        n: clips to evaluate (held-out splits first).
        seed: sampling seed (clip ``i`` uses ``seed + i``).
        steps, guidance: override the checkpoint's sampling settings.
        fid_weights, fvd_weights: feature-network files (see ``FID_HELP``/``FVD_HELP``); without
            them FID/FVD are reported as not computed.
        tracking_uri: MLflow tracking URI; ``None`` skips MLflow.
        device: torch device for the models.

    Returns:
        The report (as written to ``report.json``).
    """
    import torch

    from echopulse.generate import EchoGenerator

    if n < 1:
        raise EchoPulseError(f"--n must be at least 1, got {n}")
    fid_net = _load_feature_net(fid_weights, "FID (Inception-v3)")
    fvd_net = _load_feature_net(fvd_weights, "FVD (I3D)")
    model = EchoGenerator.from_checkpoint(checkpoint, device=device)
    data = read_eval_clips(clips, n)
    real = data["frames"]
    count, frames, size = real.shape[0], real.shape[1], real.shape[2]
    clip = model.clip
    if (frames, size, data["ecg"].shape[2]) != (clip.frames, clip.size, clip.ecg_samples):
        raise EchoPulseError(
            f"{clips}: clips are {frames} frames of {size}x{size} with {data['ecg'].shape[2]} ECG samples; "
            f"the model makes {clip.frames} frames of {clip.size}x{clip.size} from {clip.ecg_samples}")
    fps = clip.fps
    started = time.time()
    shuffle = [(i + 1) % count for i in range(count)]  # a derangement when count >= 2

    rows: list[dict[str, Any]] = []
    generated = np.zeros_like(real)
    for i in range(count):
        video = torch.as_tensor(real[i][None], device=model.device)
        with torch.inference_mode():
            recon = model.tokenizer.decode_from_indices(model.tokenizer.encode(video))[0]
        recon = (recon.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        gen = model.generate(data["ecg"][i], first_frame=real[i][0], seconds=clip.seconds,
                             seed=seed + i, steps=steps, guidance=guidance)
        generated[i] = gen
        row = {
            "clip_id": data["clip_id"][i],
            "split": data["split"][i],
            "recon_mse": metrics.mse(recon, real[i]),
            "recon_mae": metrics.mae(recon, real[i]),
            "recon_psnr": metrics.psnr(recon, real[i]),
            "recon_ssim": metrics.ssim(recon, real[i]),
            # frame 0 is the given first frame itself: score what was generated
            "gen_ssim": metrics.ssim(gen[1:], real[i][1:]),
            "gen_psnr": metrics.psnr(gen[1:], real[i][1:]),
            "gen_mse": metrics.mse(gen[1:], real[i][1:]),
            "sync_real": metrics.ecg_sync_score(real[i], data["ecg"][i], fps),
            "sync_matched": metrics.ecg_sync_score(gen, data["ecg"][i], fps),
        }
        if count >= 2:
            j = shuffle[i]
            row["sync_shuffled"] = metrics.ecg_sync_score(gen, data["ecg"][j], fps)
            swapped = model.generate(data["ecg"][j], first_frame=real[i][0], seconds=clip.seconds,
                                     seed=seed + i, steps=steps, guidance=guidance)
            row["sync_swapped"] = metrics.ecg_sync_score(swapped, data["ecg"][j], fps)
        ef = data["ef"][i]
        row["ef_true"] = None if math.isnan(ef) else float(ef)
        if row["ef_true"] is not None:
            row["ef_real_estimate"] = metrics.ef_from_video(real[i])
            row["ef_generated_estimate"] = metrics.ef_from_video(gen)
        rows.append(row)
        log.info("evaluated clip %d/%d (%s)", i + 1, count, row["clip_id"])

    report = _summarize(rows, model, checkpoint, clips, data, seed, steps, guidance)
    report["fid"] = (_fid(fid_net, real, generated) if fid_net is not None else
                     {"status": NOT_COMPUTED, "reason": "no feature-network weights file given (--fid-weights)"})
    report["fvd"] = (_fvd(fvd_net, real, generated) if fvd_net is not None else
                     {"status": NOT_COMPUTED, "reason": "no feature-network weights file given (--fvd-weights)"})
    report["seconds"] = round(time.time() - started, 3)
    report["per_clip"] = rows
    paths = write_report(report, out)
    if tracking_uri:
        _log_to_mlflow(report, paths, tracking_uri)
    return report


def _summarize(rows: list[dict[str, Any]], model, checkpoint: str, clips: str, data: dict[str, Any],
               seed: int, steps: int | None, guidance: float | None) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [r[key] for r in rows if key in r]

    def psnr_mean(key: str) -> float:
        # the mean of per-clip PSNR; identical clips (inf) make it inf, which is the truth
        values = col(key)
        return float(np.mean(values)) if values else float("nan")

    sampling = model.sampling
    report: dict[str, Any] = {
        "checkpoint": checkpoint,
        "generator_id": model.info.get("model_id"),
        "tokenizer_id": model.info.get("extra", {}).get("tokenizer_id"),
        "clips": clips,
        "splits": data["splits"],
        "n": len(rows),
        "seed": seed,
        "sampling": {"steps": steps or sampling.steps,
                     "guidance": sampling.guidance if guidance is None else guidance,
                     "temperature": sampling.temperature, "schedule": sampling.schedule},
        "tokenizer_reconstruction": {"mse": _mean(col("recon_mse")), "mae": _mean(col("recon_mae")),
                                     "psnr": psnr_mean("recon_psnr"), "ssim": _mean(col("recon_ssim"))},
        "generation": {"ssim": _mean(col("gen_ssim")), "psnr": psnr_mean("gen_psnr"),
                       "mse": _mean(col("gen_mse")),
                       "note": "vs the real clip with the same ECG and first frame; frames after the "
                               "given first frame"},
    }
    control = {"matched": _mean(col("sync_matched")), "real": _mean(col("sync_real"))}
    if len(rows) >= 2:
        control.update(shuffled=_mean(col("sync_shuffled")), swapped=_mean(col("sync_swapped")))
        control["matched_minus_shuffled"] = control["matched"] - control["shuffled"]
    else:
        control["shuffled"] = NOT_COMPUTED + " (needs at least 2 clips)"
    control["note"] = ("Pearson r of cavity area vs the ECG-implied volume curve (ED at R-peaks); "
                       "matched: generated vs its own ECG; shuffled: vs another clip's ECG (chance); "
                       "swapped: generated from another clip's ECG, vs that ECG; real: real clips")
    report["ecg_control"] = control
    with_ef = [r for r in rows if r.get("ef_true") is not None]
    if with_ef:
        def err(key: str, ref: str = "ef_true") -> float:
            return _mean([abs(r[key] - r[ref]) for r in with_ef])

        report["ef"] = {
            "clips": len(with_ef),
            "mae_generated": err("ef_generated_estimate"),
            "mae_real_estimate": err("ef_real_estimate"),
            "mae_generated_vs_real_estimate": err("ef_generated_estimate", "ef_real_estimate"),
            "note": "EF from LV cavity area (V = A^1.5) of each clip; mae_real_estimate is the "
                    "estimator's own error on the real clips (its floor)",
        }
    else:
        report["ef"] = {"status": NOT_COMPUTED, "reason": "no clip has a known EF"}
    return report


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
    """The report as a short Markdown document."""
    lines = [
        "# EchoPulse evaluation",
        "",
        f"- checkpoint: `{report['checkpoint']}` (generator {report['generator_id']}, "
        f"tokenizer {report['tokenizer_id']})",
        f"- clips: `{report['clips']}`, {report['n']} clips from split(s) {', '.join(report['splits'])}",
        f"- sampling: {', '.join(f'{k} {v}' for k, v in report['sampling'].items())}; seed {report['seed']}",
        "",
        "| section | metric | value |",
        "| --- | --- | --- |",
    ]
    for section in ("tokenizer_reconstruction", "generation", "ecg_control", "ef", "fid", "fvd"):
        for key, value in report[section].items():
            if key in ("note", "reason"):
                continue
            lines.append(f"| {section} | {key} | {_fmt(value)} |")
    lines.append("")
    for section in ("generation", "ecg_control", "ef", "fid", "fvd"):
        note = report[section].get("note") or report[section].get("reason")
        if note:
            lines.append(f"- {section}: {note}")
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str) -> dict[str, str]:
    """Write ``report.json`` and ``report.md`` under ``out`` (each via a temporary file)."""
    import os
    import tempfile

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
    """The report's numbers as flat MLflow metric names (finite values only)."""
    out: dict[str, float] = {}
    prefixes = {"tokenizer_reconstruction": "recon", "generation": "gen", "ecg_control": "ecg_sync",
                "ef": "ef", "fid": "fid", "fvd": "fvd"}
    for section, prefix in prefixes.items():
        for key, value in report.get(section, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{prefix}_{key}"] = float(value)
    return out


def _log_to_mlflow(report: dict[str, Any], paths: dict[str, str], tracking_uri: str) -> None:
    from echopulse.tracking import tracked_run

    params = {"checkpoint": report["checkpoint"], "clips": report["clips"], "n": report["n"],
              "seed": report["seed"], "sampling": report["sampling"],
              "generator_id": report["generator_id"]}
    with tracked_run(tracking_uri, "evaluate", params=params) as run:
        run.log_metrics(flat_metrics(report), step=0)
        for path in paths.values():
            run.log_artifact(path, "evaluation")
        report["mlflow_run_id"] = run.run_id
