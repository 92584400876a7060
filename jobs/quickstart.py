"""The main job: synth -> ingest -> train tokenizer -> tokenize -> train generator -> tune -> generate.

Everything runs on embedded defaults (a local Ray cluster in-process, a sqlite MLflow store in the
work directory, local files) and lands under one work directory.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from echopulse.config import Recipe, to_dict
from echopulse.tracking import RunLogger, create_run, resolve_tracking_uri

log = logging.getLogger(__name__)

SCREEN_ONLY_EVERY = 3
VIDEO_SECONDS = 6.0  # the demo video: long enough (several beats) to read its heart rate from the pixels
STAGES = ("synth", "ingest", "train tokenizer", "tokenize", "train generator", "tune", "generate")


def beat_report(frames, fps: float, ecg_bpm: float) -> dict[str, Any]:
    """Does a generated video beat with its ECG? Its heart rate from the pixels alone
    (:func:`echopulse.metrics.pixel_heart_rate`) against the ECG's; ``video_bpm`` is nan when the
    video shows no periodic motion."""
    import math

    from echopulse.metrics import pixel_heart_rate

    video_bpm, _ = pixel_heart_rate(frames, fps)
    return {"video_bpm": float(video_bpm), "ecg_bpm": float(ecg_bpm),
            "within_5bpm": bool(math.isfinite(video_bpm) and abs(video_bpm - ecg_bpm) <= 5.0)}


def describe_beat(beat: dict[str, Any]) -> str:
    """One line for the user: the video's heart rate (from its pixels) against the ECG's."""
    if beat["video_bpm"] != beat["video_bpm"]:
        return f"no beat in the video's pixels (ECG {beat['ecg_bpm']:.0f} bpm)"
    verdict = "beats with its ECG" if beat["within_5bpm"] else "does not beat with its ECG"
    return f"the video {verdict}: {beat['video_bpm']:.0f} bpm from its pixels, ECG {beat['ecg_bpm']:.0f} bpm"


def _generate_videos(checkpoint: str, ecg: Path, out_dir: Path, seed: int) -> tuple[list[str], dict[str, Any]]:
    """A video of :data:`VIDEO_SECONDS` (or the longest the ECG can condition) from ``ecg``
    (chained windows), written as GIF and MP4, and its :func:`beat_report`."""
    from echopulse.generate import EchoGenerator, load_ecg_file, longest_video_s, render_video

    model = EchoGenerator.from_checkpoint(checkpoint)
    prepared = load_ecg_file(str(ecg))
    fps = model.clip.fps
    seconds = min(VIDEO_SECONDS, longest_video_s(model.clip, prepared.ecg.shape[1]))
    frames = model.generate(prepared, seconds=seconds, fps=fps, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = [str(render_video(frames, fps, str(out_dir / f"echo{suffix}"), prepared.ecg, prepared.lead_mask,
                               False)) for suffix in (".gif", ".mp4")]
    return videos, beat_report(frames, fps, prepared.heart_rate_bpm)


def _pick_val_ecg(synth_dir: Path) -> Path:
    with open(synth_dir / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ecg") not in (None, "", "screen")]  # an ECG file
    chosen = next((r for r in rows if r.get("split") == "val"), rows[-1])
    return synth_dir / chosen["ecg"]


def add_vendor_cine(synth_dir: Path) -> bool:
    """Add the real SonoSite cine of pydicom-data to the corpus as an ECG-less study.

    pydicom-data is a test dependency (34 MB), not a runtime one: when it is installed (``make test``
    installs it into the same venv) the demo corpus gets one real cine for tokenizer training; when
    it is absent this logs a line and the corpus stays phantom-only. Never downloads.

    Returns:
        True when the cine was added to ``synth_dir/manifest.csv``.
    """
    from echopulse.real_cine import vendor_cine_path

    source = vendor_cine_path()
    if not source:
        log.info("pydicom-data is not installed: the demo corpus has no real vendor cine "
                 "(pip install pydicom-data adds SonoSite's as an ECG-less study)")
        return False
    target = synth_dir / "echo" / "sonosite_a4c.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    manifest = synth_dir / "manifest.csv"
    with open(manifest, newline="") as f:
        fields = list(csv.DictReader(f).fieldnames or [])
    row = {"echo": "echo/sonosite_a4c.dcm", "ecg": "", "view": "A4C", "split": "train"}
    with open(manifest, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerow({k: row.get(k, "") for k in fields})
    log.info("added pydicom-data's SonoSite cine to the corpus as an ECG-less study")
    return True


def quickstart(workdir: str, recipe: Recipe, seed: int = 0, tracking_uri: str | None = None,
               report: Callable[[str], None] = log.info, vendor_cine: bool | None = None) -> dict[str, Any]:
    """Run the whole chain into ``workdir``; returns where every output is.

    Args:
        workdir: a local directory; created if needed.
        recipe: the run recipe (``tiny`` for tests, ``demo`` for ``make demo``).
        seed: seed of the synthetic corpus and of sampling.
        tracking_uri: MLflow URI (default: ``MLFLOW_TRACKING_URI`` or ``WORKDIR/mlflow.db``).
        report: called with one progress line per stage.
        vendor_cine: add pydicom-data's real SonoSite cine (ECG-less) when installed; default:
            every recipe but ``tiny`` (its decode would double the tests' ingest time).
    """
    from echopulse.runtime import init_ray
    from echopulse.synth.phantom import write_corpus

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # a fresh run: earlier stage outputs would be resumed from (or clash with another recipe);
    # the MLflow store is kept so runs accumulate
    for stage_dir in ("synth", "clips", "tokenizer", "tokens", "generator", "tune", "generated"):
        shutil.rmtree(work / stage_dir, ignore_errors=True)
    uri = resolve_tracking_uri(str(work), tracking_uri)
    outputs: dict[str, Any] = {"workdir": str(work), "tracking_uri": uri, "recipe": recipe.name}
    t_all = time.perf_counter()

    def stage(i: int, text: str) -> float:
        report(f"[{i}/{len(STAGES)}] {STAGES[i - 1]}: {text}")
        return time.perf_counter()

    def done(t0: float, text: str) -> None:
        report(f"      done in {time.perf_counter() - t0:.1f} s: {text}")

    t = stage(1, f"{recipe.synth_studies} phantom studies -> {work / 'synth'}")
    # every third train study's only ECG is the trace on its screen, as in archives like MIMIC-IV-ECHO
    manifest = write_corpus(work / "synth", studies=recipe.synth_studies, seed=seed,
                            duration_s=recipe.synth_seconds, screen_only_every=SCREEN_ONLY_EVERY)
    outputs["manifest"] = str(manifest)
    if vendor_cine if vendor_cine is not None else recipe.name != "tiny":
        outputs["vendor_cine"] = add_vendor_cine(work / "synth")
    done(t, str(manifest))

    init_ray()
    parent = create_run(uri, f"quickstart-{recipe.name}", {"recipe": to_dict(recipe), "seed": seed},
                        tags={"echopulse.stage": "quickstart"})
    parent_log = RunLogger(uri, parent)
    try:
        _chain(work, recipe, seed, uri, parent, parent_log, outputs, stage, done)
    except BaseException:
        parent_log.finish("FAILED")
        raise
    outputs["seconds"] = round(time.perf_counter() - t_all, 1)
    outputs["mlflow_run_id"] = parent
    (work / "quickstart.json").write_text(json.dumps(outputs, indent=2))
    parent_log.log_artifact(str(work / "quickstart.json"))
    parent_log.finish()
    return outputs


def _chain(work: Path, recipe: Recipe, seed: int, uri: str, parent: str, parent_log: RunLogger,
           outputs: dict[str, Any], stage: Callable[[int, str], float],
           done: Callable[[float, str], None]) -> None:
    """Stages 2-7 of the quickstart (after synth), filling ``outputs``."""
    from jobs.train_generator import train_generator
    from jobs.train_tokenizer import train_tokenizer
    from jobs.tune_masking import tune_masking
    from pipelines.ingest import run_ingest
    from pipelines.tokenize import run_tokenize

    t = stage(2, "DICOM + WFDB or on-screen ECG -> clips/v1 (Ray Data)")
    summary = run_ingest(outputs["manifest"], str(work / "clips"), recipe.clip)
    outputs["clips"] = str(work / "clips")
    parent_log.log_metrics({f"ingest_{k}": v for k, v in summary.as_dict().items()}, step=0)
    done(t, f"{summary.clips} clips from {summary.inputs_with_clips}/{summary.inputs} inputs, "
            f"{summary.quarantined} quarantined")
    if summary.clips == 0:
        raise RuntimeError("ingest produced no clips; see clips/quarantine")

    t = stage(3, f"{recipe.tokenizer_train.steps} steps (Ray Train)")
    tok = train_tokenizer(str(work / "clips"), str(work / "tokenizer"), recipe, uri,
                          parent_run_id=parent)
    outputs["tokenizer"] = tok.checkpoint
    done(t, f"psnr {tok.metrics.get('psnr', float('nan')):.2f} dB -> {tok.checkpoint}")

    t = stage(4, "clips -> tokens/v1 (Ray Data actor pool)")
    toks = run_tokenize(str(work / "clips"), tok.checkpoint, str(work / "tokens"))
    outputs["tokens"] = str(work / "tokens")
    done(t, f"{toks.tokens} token grids")

    t = stage(5, f"{recipe.generator_train.steps} steps (Ray Train)")
    gen = train_generator(str(work / "tokens"), tok.checkpoint, str(work / "generator"), recipe,
                          uri, parent_run_id=parent)
    outputs["generator"] = gen.checkpoint
    done(t, f"masked acc {gen.metrics.get('masked_acc', float('nan')):.3f}, "
            f"val ce {gen.metrics.get('val_ce', float('nan')):.3f}, "
            f"guidance {gen.metrics.get('guidance_picked', recipe.sampling.guidance):g} -> {gen.checkpoint}")

    t = stage(6, f"{recipe.tune.trials} trials over masking schedules (Ray Tune)")
    tuned = tune_masking(str(work / "tokens"), tok.checkpoint, str(work / "tune"), recipe, uri,
                         parent_run_id=parent)
    outputs["tune"] = {"best_recipe": tuned.best_recipe, "trials_csv": tuned.table,
                       "plot": tuned.plot, "best_schedule": tuned.best["schedule"]}
    done(t, f"best schedule {tuned.best['schedule']} (val ce {tuned.best['val_ce']:.3f})")

    t = stage(7, "ECG of a held-out study -> echo video")
    ecg = _pick_val_ecg(work / "synth")
    videos, beat = _generate_videos(gen.checkpoint, ecg, work / "generated", seed)
    for path in videos:
        parent_log.log_artifact(path, "generated")
    parent_log.log_metrics({k: v for k, v in beat.items() if isinstance(v, float)}, step=0)
    outputs["videos"], outputs["video_heart_rate"] = videos, beat
    done(t, f"{', '.join(videos)}; {describe_beat(beat)}")
