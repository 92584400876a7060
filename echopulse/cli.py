"""The ``echopulse`` command line: one subcommand per stage, plus ``quickstart``.

Exit status: 0 success; 1 the run failed; 2 bad input or configuration (a missing file, an
unreadable manifest, a wrong URI, an unknown recipe), reported as one line naming the path and
the problem. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from echopulse import __version__
from echopulse.errors import EchoPulseError, RunStopped

log = logging.getLogger("echopulse")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_RESUMABLE = 3  # a run stopped part-way (storage refusing writes): rerun with --resume

EPILOG = """\
The chain, each stage reading the previous one's output:
  echopulse synth      --out synth --studies 8 --seed 0
  echopulse ingest     --manifest synth/manifest.csv --out clips --recipe tiny
  echopulse train tokenizer --clips clips --out tokenizer --recipe tiny
  echopulse tokenize   --clips clips --tokenizer tokenizer/checkpoint --out tokens
  echopulse train generator --tokens tokens --tokenizer tokenizer/checkpoint --out generator --recipe tiny
  echopulse tune       --tokens tokens --tokenizer tokenizer/checkpoint --trials 2 --recipe tiny
  echopulse calibrate  --checkpoint generator/checkpoint --tokens tokens   (re-pick its guidance)
  echopulse generate   --checkpoint generator/checkpoint --ecg synth/ecg/study_0000.hea --out echo.gif
  echopulse evaluate   --checkpoint generator/checkpoint --clips clips --n 16 --out evaluation
  echopulse generate-batch --manifest ecgs.csv --checkpoint generator/checkpoint --out generated
  echopulse register   generator/checkpoint echo-gen --alias candidate
  echopulse alias      echo-gen 1 champion
  echopulse serve      --checkpoint models:/echo-gen@champion --port 8000
Or all at once:   echopulse quickstart --workdir demo --recipe demo

Exit status: 0 ok, 1 the run failed, 2 bad input or configuration.
MLflow: --tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db (WORKDIR/mlflow.db
for quickstart). Ray: RAY_ADDRESS joins a cluster; otherwise a local one starts in-process.
"""


def _recipe(name: str):
    from jobs.recipes import get_recipe

    return get_recipe(name)


def _tracking(args: argparse.Namespace, workdir: str = ".") -> str:
    from echopulse.tracking import resolve_tracking_uri

    return resolve_tracking_uri(workdir, args.tracking_uri)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_synth(args: argparse.Namespace) -> int:
    from echopulse.synth.phantom import write_corpus

    manifest = write_corpus(args.out, studies=args.studies, seed=args.seed, duration_s=args.seconds,
                            variety=args.variety, screen_trace=not args.no_screen_trace,
                            screen_only_every=args.screen_only_every)
    print(f"wrote {args.studies} phantom studies; manifest: {manifest}")
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from echopulse.ingest import IngestOptions
    from pipelines.ingest import clip_for_mode, run_ingest
    from pipelines.shards import ShardConfig

    clip = clip_for_mode(_recipe(args.recipe).clip, args.clip_mode, seconds=args.seconds, fps=args.fps)
    options = IngestOptions(clip_mode=args.clip_mode, allow_roots=tuple(args.allow_root or ()),
                            ecg_fs=args.ecg_fs, screen_ecg=not args.no_screen_ecg)
    if args.shard_mb <= 0 or args.inputs_per_task < 1:
        raise EchoPulseError("--shard-mb must be positive and --inputs-per-task at least 1")
    shards = ShardConfig(shard_mb=args.shard_mb, inputs_per_task=args.inputs_per_task,
                         row_group_mb=min(32.0, args.shard_mb))
    if args.tokenizer:
        from pipelines.fused import run_ingest_tokens

        fused = run_ingest_tokens(args.manifest, args.out, clip, args.tokenizer, salt=args.salt,
                                  resume=args.resume, options=options, shards=shards,
                                  keep_clips=args.keep_clips, actors=args.actors,
                                  batch_size=args.batch_size, use_gpu=True if args.gpu else None)
        _print_json({**fused.as_dict(), "out": fused.out})
        return EXIT_OK
    if args.keep_clips:
        raise EchoPulseError("--keep-clips goes with --tokenizer (without it, --out is the clips)")
    summary = run_ingest(args.manifest, args.out, clip, salt=args.salt, resume=args.resume,
                         options=options, shards=shards)
    _print_json({**summary.as_dict(), "out": summary.out})
    if summary.inputs_with_clips == 0:
        print(f"error: no input produced a clip; reasons in {args.out}/quarantine/", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from jobs.train_common import summarize

    recipe = _recipe(args.recipe)
    use_gpu = True if args.gpu else None
    if args.model == "tokenizer":
        from jobs.train_tokenizer import train_tokenizer

        result = train_tokenizer(args.clips, args.out, recipe, _tracking(args), workers=args.workers,
                                 use_gpu=use_gpu)
    else:
        from echopulse.config import replace
        from jobs.train_generator import train_generator

        if args.ecg_checkpoint or args.freeze_ecg:
            ecg = recipe.generator.ecg
            ecg = replace(ecg, checkpoint=args.ecg_checkpoint or ecg.checkpoint,
                          freeze=args.freeze_ecg or ecg.freeze)
            recipe = replace(recipe, generator=replace(recipe.generator, ecg=ecg))
        result = train_generator(args.tokens, args.tokenizer, args.out, recipe, _tracking(args),
                                 workers=args.workers, use_gpu=use_gpu, register=args.register,
                                 allow_unsynchronized=args.allow_unsynchronized)
    _print_json(summarize(args.model, result))
    return EXIT_OK


def cmd_tokenize(args: argparse.Namespace) -> int:
    from pipelines.tokenize import run_tokenize

    summary = run_tokenize(args.clips, args.tokenizer, args.out, actors=args.actors,
                           batch_size=args.batch_size, use_gpu=True if args.gpu else None)
    _print_json(summary.__dict__)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from echopulse.config import replace
    from jobs.tune_masking import format_table, tune_masking

    recipe = _recipe(args.recipe)
    changes: dict[str, Any] = {}
    if args.search:
        changes["search"] = args.search
    if args.schedules == "all":
        from echopulse.models.schedules import SCHEDULES

        changes["schedules"] = tuple(SCHEDULES)
    elif args.schedules:
        changes["schedules"] = tuple(s for s in args.schedules.split(",") if s)
    if args.sampling_steps:
        changes["sampling_steps"] = tuple(int(s) for s in args.sampling_steps.split(",") if s)
    if args.steps:
        changes["steps"] = args.steps
    if args.no_asha:
        changes["asha"] = False
    if changes:
        recipe = replace(recipe, tune=replace(recipe.tune, **changes))
    summary = tune_masking(args.tokens, args.tokenizer, args.out, recipe, _tracking(args),
                           trials=args.trials, max_concurrent=args.concurrent,
                           workers=args.workers, use_gpu=True if args.gpu else None,
                           resume=args.resume)
    print(format_table(summary.trials))
    print(f"\nbest: {summary.best['schedule']} ({summary.best['val_ce']:.4f} val ce)")
    print(f"best recipe: {summary.best_recipe}   (train with --recipe {summary.best_recipe})")
    print(f"trials: {summary.table}")
    if summary.plot:
        print(f"plot: {summary.plot}")
    print(f"MLflow parent run: {summary.run_id}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from echopulse.generate import generate_to_file

    _print_json(generate_to_file(args.checkpoint, args.ecg, args.out, seed=args.seed,
                                 steps=args.steps, guidance=args.guidance,
                                 first_frame=args.first_frame, seconds=args.seconds, fps=args.fps,
                                 panel=args.panel, view=args.view, ef=args.ef))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from jobs.calibrate import calibrate

    overrides: dict[str, Any] = {}
    if args.candidates is not None:
        overrides["guidance_candidates"] = tuple(args.candidates)
    if args.clips is not None:
        overrides["calibration_clips"] = args.clips
    if args.seeds is not None:
        overrides["calibration_seeds"] = args.seeds
    result = calibrate(args.checkpoint, args.tokens, overrides, device=args.device, write=not args.dry_run,
                       allow_unsynchronized=args.allow_unsynchronized)
    print(f"motion agreement on {result.clips} validation clips x {result.seeds} seeds:")
    for weight, score, gain, se in zip(result.candidates, result.scores, result.gains, result.gain_se):
        mark = "  <- picked" if weight == result.picked else ""
        print(f"  g={weight:<4g} {score:.3f}  gain {gain:+.3f} +- {se:.3f}{mark}")
    print(("would write" if args.dry_run else "wrote") + f" guidance {result.picked:g} to {args.checkpoint}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from echopulse.evaluate import EvalOptions, evaluate

    out = args.out or "evaluation"
    options = EvalOptions(n=args.n, seed=args.seed, samples_per_clip=args.samples_per_clip,
                          steps=args.steps, guidance=args.guidance, fid_weights=args.fid_weights,
                          fvd_weights=args.fvd_weights, ef_model=args.ef_model, protocol=args.protocol,
                          min_fvd_clips=args.min_fvd_clips, fvd_frames=args.fvd_frames,
                          train_clips=args.train_clips, memorization_space=args.memorization_space)
    report = evaluate(args.checkpoint, args.clips, out, options, tracking_uri=_tracking(args),
                      device=args.device)
    print(f"reports: {os.path.join(out, 'report.json')}, {os.path.join(out, 'report.md')}")
    if report.get("mlflow_run_id"):
        print(f"MLflow run: {report['mlflow_run_id']}")
    return EXIT_OK


def cmd_generate_batch(args: argparse.Namespace) -> int:
    from pipelines.generate import run_generate_batch

    summary = run_generate_batch(args.manifest, args.checkpoint, args.out, fmt=args.format,
                                 actors=args.actors, batch_size=args.batch_size, use_gpu=args.gpu,
                                 cpus_per_actor=args.cpus_per_actor, panel=args.panel,
                                 seconds=args.seconds, fps=args.fps, seed=args.seed,
                                 steps=args.steps, guidance=args.guidance)
    _print_json(summary.__dict__)
    if summary.ok == 0:
        print(f"error: no video was generated; reasons in {summary.index}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_quickstart(args: argparse.Namespace) -> int:
    from jobs.quickstart import quickstart

    outputs = quickstart(args.workdir, _recipe(args.recipe), seed=args.seed,
                         tracking_uri=args.tracking_uri, report=lambda line: print(line, flush=True))
    print()
    print(f"All outputs are under {outputs['workdir']} ({outputs['seconds']} s):")
    for key in ("manifest", "clips", "tokenizer", "tokens", "generator"):
        print(f"  {key:<10} {outputs[key]}")
    print(f"  {'tune':<10} {outputs['tune']['trials_csv']} (best recipe: {outputs['tune']['best_recipe']})")
    if outputs["tune"].get("plot"):
        print(f"  {'plot':<10} {outputs['tune']['plot']}")
    for video in outputs["videos"]:
        print(f"  {'video':<10} {video}")
    print(f"\nMLflow runs: {outputs['tracking_uri']}")
    print(f"  open the UI with: .venv/bin/mlflow ui --backend-store-uri {outputs['tracking_uri']}")
    return EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    from echopulse.registry import register_checkpoint

    _print_json(register_checkpoint(args.checkpoint, args.name, _tracking(args), run_id=args.run_id,
                                    alias=args.alias))
    return EXIT_OK


def cmd_alias(args: argparse.Namespace) -> int:
    from echopulse.registry import set_alias

    set_alias(_tracking(args), args.name, args.version, args.alias)
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import tempfile

    from echopulse.models.checkpoint import read_checkpoint_info
    from echopulse.registry import is_model_uri, local_checkpoint

    if args.max_batch_size < 1 or args.replicas < 1 or args.max_upload_mb <= 0:
        raise EchoPulseError("--max-batch-size and --replicas must be at least 1, --max-upload-mb positive")
    tracking = _tracking(args) if is_model_uri(args.checkpoint) else None
    with tempfile.TemporaryDirectory() as tmp:  # fail here, not in every replica, on a bad checkpoint
        info = read_checkpoint_info(local_checkpoint(args.checkpoint, tmp, tracking))
    if info["kind"] != "generator":
        raise EchoPulseError(f"{args.checkpoint}: a {info['kind']} checkpoint, not a generator")
    from pipelines.serve import ServeConfig, start

    start(ServeConfig(checkpoint=args.checkpoint, tracking_uri=tracking, host=args.host,
                      port=args.port, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                      gpus_per_replica=args.gpus_per_replica, max_batch_size=args.max_batch_size,
                      batch_wait_s=args.batch_wait_s, max_upload_mb=args.max_upload_mb),
          on_ready=lambda url: print(f"EchoPulse serving {args.checkpoint} on {url}  "
                                     "(POST /generate, GET /health; Ctrl-C stops)", flush=True))
    return EXIT_OK


def _export_model_store(args: argparse.Namespace) -> None:
    """A ``models:/`` or ``runs:/`` checkpoint is resolved against this command's MLflow store, in
    this process and in every Ray worker or replica that loads it (they inherit the variable)."""
    from echopulse.registry import is_model_uri

    if is_model_uri(getattr(args, "checkpoint", None)):
        os.environ["MLFLOW_TRACKING_URI"] = _tracking(args)


def _remote_commands() -> tuple[str, ...]:
    return ("synth", "ingest", "train", "tokenize", "tune", "generate", "quickstart")


def cmd_submit(args: argparse.Namespace) -> int:
    """Run an echopulse command as a Ray job; stream its logs; exit with the job's status."""
    from echopulse import submit

    argv = list(args.job_command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] not in _remote_commands():
        got = f"'{argv[0]}'" if argv else "nothing"
        print(f"error: expected an echopulse command after --, one of {', '.join(_remote_commands())}; "
              f"got {got}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:  # check the command's own flags here, before anything is uploaded
        build_parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_BAD_INPUT if exc.code else EXIT_OK
    base = submit.load_runtime_env_file(args.runtime_env) if args.runtime_env else None
    env_vars = submit.passthrough_env()
    if args.tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = args.tracking_uri
    env_vars.update(submit.parse_env(args.env))
    runtime_env = submit.build_runtime_env(args.working_dir, env_vars, base=base, image_uri=args.image)
    client = submit.connect(args.address, timeout=args.request_timeout)
    entrypoint = submit.entrypoint_for(argv, python=args.python)
    job_id = submit.submit_job(client, entrypoint, runtime_env, submission_id=args.submission_id,
                             entrypoint_num_cpus=args.num_cpus, entrypoint_num_gpus=args.num_gpus)
    passed = ", ".join(sorted(env_vars)) or "none"
    print(f"submitted {job_id} to {client.get_address()}: {entrypoint}", file=sys.stderr)
    print(f"  working dir: {runtime_env.get('working_dir', '(none)')}; env passed: {passed}",
          file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return EXIT_OK
    try:
        result = submit.follow(client, job_id, on_output=lambda chunk: print(chunk, end="", flush=True),
                             timeout=args.timeout)
    except KeyboardInterrupt:
        print(f"\ndetached; {job_id} keeps running (stop it with `echopulse jobs stop {job_id}`)",
              file=sys.stderr)
        return 130
    return _report_job(result)


def _report_job(result) -> int:
    if result.timed_out:
        print(f"error: job {result.submission_id} {result.message} (--timeout)", file=sys.stderr)
    elif result.status == "SUCCEEDED":
        print(f"job {result.submission_id} SUCCEEDED", file=sys.stderr)
    else:
        detail = _one_line(Exception(result.message)) if result.message else ""
        print(f"error: job {result.submission_id} {result.status} (exit {result.exit_code})"
              + (f": {detail}" if detail else ""), file=sys.stderr)
    return result.exit_code


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, show or follow one job's logs, stop a job."""
    from echopulse import submit

    client = submit.connect(args.address, timeout=args.request_timeout)
    if args.action == "list":
        rows = submit.list_jobs(client)
        if args.json:
            _print_json(rows)
        else:
            print(submit.format_jobs(rows))
        return EXIT_OK
    if args.action == "logs":
        if args.follow:
            submit.job_info(client, args.submission_id)
            result = submit.follow(client, args.submission_id,
                                 on_output=lambda chunk: print(chunk, end="", flush=True),
                                 timeout=args.timeout, stop_on_timeout=False)
            return _report_job(result)
        print(submit.job_logs(client, args.submission_id), end="")
        return EXIT_OK
    status = submit.stop_job(client, args.submission_id, wait_s=args.timeout or 30.0)
    print(f"job {args.submission_id}: {status}")
    return EXIT_OK if status in submit.TERMINAL else EXIT_FAILED


RECIPE_HELP = "recipe: tiny, demo, demo48, paper or a recipe .json (default: %(default)s)"
CHECKPOINT_HELP = ("generator checkpoint directory or URI, or an MLflow model: models:/NAME@ALIAS, "
                   "models:/NAME/VERSION, runs:/RUN_ID/model")
GUIDANCE_HELP = ("classifier-free guidance weight g: logits = cond + g * (cond - uncond); 0 is "
                 "the plain ECG-conditioned model, larger follows the ECG more strongly")
ADDRESS_HELP = ("Ray job server (dashboard) address (default: RAY_API_SERVER_ADDRESS, an http:// "
                "RAY_ADDRESS, or http://127.0.0.1:8265); the token comes from RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def _command(sub, common: argparse.ArgumentParser, name: str, fn: Callable,
             help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    p.set_defaults(fn=fn)
    return p


def storage_flags(p: argparse.ArgumentParser) -> None:
    """Flags of every command that reads or writes object storage (applied once, in :func:`main`)."""
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-protocol endpoint URL (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")


def sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: checkpoint's)")
    p.add_argument("--guidance", type=float, default=None,
                   help=GUIDANCE_HELP + " (default: the checkpoint's, picked on its validation clips "
                        "when training ended)")


def video_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=None,
                   help="video duration; longer than the model's window chains windows "
                        "(default: one window)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the model's)")
    p.add_argument("--panel", action="store_true",
                   help="draw the ECG (lead II) under the video with a moving cursor")


def job_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds for each request to the job server (default: %(default)s)")


def add_synth_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "synth", cmd_synth,
                 "Write a synthetic corpus: echo phantom DICOMs, WFDB ECGs, manifest.csv.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--studies", type=int, default=8, help="number of studies (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0, help="study length (default: %(default)s)")
    p.add_argument("--variety", action="store_true",
                   help="give every study a look of its own (fan width, depth, gain, grey map, blur, speckle, "
                        "tissue brightness, chamber shapes), so a tokenizer trained on it sees more than one "
                        "cartoon")
    p.add_argument("--no-screen-trace", action="store_true",
                   help="do not draw the ECG strip (lead II, sweep mode) under each echo")
    p.add_argument("--screen-only-every", type=int, default=0, metavar="N",
                   help="every N-th train study gets no WFDB file: its on-screen trace is its only ECG "
                        "(manifest ecg 'screen'; default: %(default)s, none)")


def _max_gap(text: str):
    """``24h``, ``90m``, ``2d`` or a number of hours -> timedelta."""
    from datetime import timedelta

    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    text = text.strip().lower()
    unit = units.get(text[-1:], None)
    try:
        value = float(text[:-1] if unit else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 24h, 90m or 2d") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a gap cannot be negative")
    return timedelta(**{unit or "hours": value})


def cmd_manifest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from echopulse.manifests import build_manifest, write_manifest

    options = {"fps": args.fps, "max_gap": args.max_gap}
    if args.ecg_root:
        if args.dataset != "mimic-echo":
            raise EchoPulseError(f"--ecg-root pairs MIMIC-IV-ECG records with mimic-echo, not {args.dataset}")
        options["ecg_root"] = Path(args.ecg_root).resolve()
    manifest = build_manifest(args.dataset, args.root, **options)
    out = write_manifest(manifest, args.out)
    print(f"{args.dataset}: {len(manifest.rows)} echoes -> {out}")
    for why, n in sorted(manifest.skipped.items()):
        print(f"  skipped {n}: {why}")
    for what, n in sorted(manifest.notes.items()):
        print(f"  {n}: {what}")
    return EXIT_OK


def add_manifest_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``echopulse manifest DATASET ROOT --out manifest.csv``: a public dataset's layout -> manifest."""
    from echopulse.manifests import DATASETS

    text = "Write an ingest manifest for a public echo dataset stored in its published layout."
    p = sub.add_parser("manifest", parents=[common], help=text, description=text + (
        " mimic-echo: files/pNN/p<subject>/s<study>/*.dcm + echo-record-list.csv (ECG from the screen "
        "trace; --ecg-root pairs MIMIC-IV-ECG 12-leads, unsynchronized); echonet-dynamic: FileList.csv, "
        "VolumeTracings.csv, Videos/; echonet-pediatric: A4C/ and PSAX/ (folds 0-7 train, 8 val, 9 test); "
        "camus: patientNNNN/ with half sequences (.nii.gz or .mhd) and Info_2CH/4CH.cfg. A root not in "
        "the named layout: one line, exit 2."))
    p.set_defaults(fn=cmd_manifest)
    p.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET",
                   help="one of: " + ", ".join(sorted(DATASETS)))
    p.add_argument("root", metavar="ROOT", help="the dataset's root folder")
    p.add_argument("--out", required=True, help="manifest CSV to write (paths inside its folder are relative)")
    p.add_argument("--ecg-root", default=None, metavar="DIR",
                   help="mimic-echo: a MIMIC-IV-ECG root (record_list.csv); each echo gets its subject's "
                        "12-lead ECG nearest in time within --max-gap, marked ecg_sync=false")
    p.add_argument("--max-gap", type=_max_gap, default="24h",
                   help="mimic-echo: the largest echo-ECG time difference paired (default: %(default)s)")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate for datasets that record none (camus); written to the fps column")


def add_ingest_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "ingest", cmd_ingest,
                 "Echo (DICOM or video) + ECG pairs from a manifest -> clips/v1 Parquet (Ray Data).")
    p.add_argument("--manifest", required=True,
                   help="manifest CSV or Parquet (columns echo, ecg, optional ecg_offset_s, view, ef, "
                        "split, study), or EchoNet-Dynamic's FileList.csv; local or s3://")
    p.add_argument("--out", required=True, help="output directory or s3:// URI")
    p.add_argument("--recipe", default="demo", help=RECIPE_HELP)
    p.add_argument("--salt", default=None, help="study-key salt (default: ECHOPULSE_STUDY_SALT)")
    p.add_argument("--resume", action="store_true", help="skip inputs already done in --out")
    p.add_argument("--clip-mode", choices=("window", "cycle"), default="window",
                   help="window: fixed windows (--seconds, --fps); cycle: one R-R interval resampled "
                        "to the recipe's frame count (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=None,
                   help="window length in seconds (window mode; default: the recipe's)")
    p.add_argument("--fps", type=float, default=None,
                   help="clip frame rate (window mode; default: the recipe's)")
    p.add_argument("--allow-root", action="append", default=None, metavar="DIR",
                   help="a folder outside the manifest's that ../ paths may land in (repeatable)")
    p.add_argument("--ecg-fs", type=float, default=None,
                   help="sampling rate of CSV/NPY ECGs whose manifest row has no ecg_fs")
    p.add_argument("--shard-mb", type=float, default=256.0,
                   help="output files close at about this many MiB (default: %(default)s)")
    p.add_argument("--inputs-per-task", type=int, default=512,
                   help="consecutive manifest inputs per Ray task; each task writes at least one "
                        "file (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, metavar="CKPT",
                   help="one pass: encode the clips with this tokenizer on an actor pool and write "
                        "tokens/v1 to --out (the clips are not kept unless --keep-clips)")
    p.add_argument("--keep-clips", default=None, metavar="DIR",
                   help="with --tokenizer: also write the clips/v1 dataset to DIR")
    p.add_argument("--actors", type=int, default=1,
                   help="with --tokenizer: tokenizer actors (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="with --tokenizer: clips per encode call (default: %(default)s)")
    p.add_argument("--gpu", action="store_true",
                   help="with --tokenizer: one GPU per actor (default: when the cluster has GPUs)")
    p.add_argument("--no-screen-ecg", action="store_true",
                   help="for rows with an empty ecg, do not read the ECG trace drawn on screen "
                        "(rows with ecg 'screen' still do)")
    storage_flags(p)


def add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    train = _command(sub, common, "train", lambda a: EXIT_BAD_INPUT,
                     "Train the tokenizer or the generator (Ray Train).")
    train_sub = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    for model, text in (("tokenizer", "Train the video tokenizer on clips/v1 (Ray Train)."),
                        ("generator", "Train the ECG-conditioned generator on tokens/v1 (Ray Train).")):
        p = train_sub.add_parser(model, parents=[common], help=text, description=text)
        p.set_defaults(fn=cmd_train)
        if model == "tokenizer":
            p.add_argument("--clips", required=True, help="clips/v1 dataset (ingest output)")
        else:
            p.add_argument("--tokens", required=True, help="tokens/v1 dataset (tokenize output)")
            p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
            p.add_argument("--ecg-checkpoint", default=None,
                           help="start the ECG encoder from an ST-MEM encoder.pth (the recipe's ECG "
                                "encoder must have its size: dim 384, depth 12, heads 6 for ViT-S)")
            p.add_argument("--freeze-ecg", action="store_true",
                           help="keep the ECG encoder's weights fixed while the rest trains")
            p.add_argument("--register", default=None, metavar="NAME",
                           help="register the trained model (logged as runs:/RUN_ID/model) as a new "
                                "version of NAME in the MLflow Model Registry")
            p.add_argument("--allow-unsynchronized", action="store_true",
                           help="also train on clips whose ECG was not recorded with the echo "
                                "(ecg_sync false: paired only by patient and nearest time)")
        p.add_argument("--out", required=True,
                       help="output directory or URI (s3://bucket/prefix: Ray Train's checkpoints "
                            "go under OUT/ray/, the same command again resumes from there)")
        p.add_argument("--recipe", default="demo", help=RECIPE_HELP)
        p.add_argument("--workers", type=int, default=None, help="Ray Train workers")
        p.add_argument("--gpu", action="store_true", help="one GPU per worker")
        storage_flags(p)


def add_tokenize_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "tokenize", cmd_tokenize,
                 "clips/v1 -> tokens/v1 with a pool of tokenizer actors (Ray Data).")
    p.add_argument("--clips", required=True, help="clips/v1 dataset")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--actors", type=int, default=1, help="tokenizer actors (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="clips per encode batch on an actor (default: %(default)s)")
    p.add_argument("--gpu", action="store_true",
                   help="one GPU per actor (default: when the Ray cluster has GPUs)")
    storage_flags(p)


def add_tune_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "tune", cmd_tune,
                 "Sweep masking schedules with Ray Tune; MLflow parent + child runs.")
    p.add_argument("--tokens", required=True, help="tokens/v1 dataset")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default: recipe's)")
    p.add_argument("--search", choices=("grid", "random"), default=None,
                   help="grid: first N grid points; random: N random points (default: recipe's)")
    p.add_argument("--schedules", default=None,
                   help="training masking schedules, comma-separated (e.g. cosine,linear,sqrt), "
                        "or 'all'")
    p.add_argument("--sampling-steps", default=None,
                   help="sampling steps each trial is evaluated at, comma-separated (e.g. 4,8,16)")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial")
    p.add_argument("--no-asha", action="store_true", help="no ASHA early stopping")
    p.add_argument("--concurrent", type=int, default=None,
                   help="concurrent trials (default: recipe's; 1 fits 2 CPU cores)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    p.add_argument("--out", default="tune", help="output directory (default: %(default)s)")
    p.add_argument("--recipe", default="demo", help=RECIPE_HELP)


def add_generate_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "generate", cmd_generate,
                 "Generate an echo video from an ECG file (WFDB, DICOM 12-lead ECG, or any format "
                 "ingestion reads).")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--ecg", required=True,
                   help="ECG file (any format ingestion accepts: WFDB .hea, DICOM 12-lead ECG, ...)")
    p.add_argument("--first-frame", default=None,
                   help="first frame: an echo DICOM (cropped and resized like ingestion) or an "
                        "image exactly the model's size (PNG, ...)")
    p.add_argument("--out", required=True,
                   help="output: .mp4, .gif, or .dcm (Ultrasound Multi-frame, DERIVED, marked "
                        "synthetic, no patient data)")
    p.add_argument("--view", default=None,
                   help="echo view (A4C, A2C, ...) for a view-conditioned model (default: unknown)")
    p.add_argument("--ef", type=float, default=None,
                   help="ejection fraction as a fraction (e.g. 0.55) for an EF-conditioned model "
                        "(default: unknown)")
    video_flags(p)
    sampling_flags(p)


def add_calibrate_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "calibrate", cmd_calibrate,
                 "Pick a generator checkpoint's guidance weight on a tokens/v1 dataset's validation "
                 "clips and write it into the checkpoint (train generator does this when it ends).")
    p.add_argument("--checkpoint", required=True, help="generator checkpoint directory or URI")
    p.add_argument("--tokens", required=True,
                   help="tokens/v1 dataset made by the checkpoint's tokenizer (its val split is used)")
    p.add_argument("--candidates", type=float, nargs="+", default=None,
                   help="guidance weights to try (0 is always tried; default: the checkpoint's)")
    p.add_argument("--clips", type=int, default=None, help="validation clips (default: the checkpoint's, 32)")
    p.add_argument("--seeds", type=int, default=None, help="sampling seeds per weight (default: the checkpoint's, 2)")
    p.add_argument("--allow-unsynchronized", action="store_true",
                   help="also use clips whose ECG was not recorded with the echo")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_evaluate_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "evaluate", cmd_evaluate,
                 "Evaluate a generator on clips/v1, per view: in-sector and full-frame fidelity, ECG "
                 "control, EF (regressor or phantom estimator), FID/FVD (StyleGAN-V or the paper's "
                 "protocol, from weights files), memorization; report.json/.md + figures + MLflow.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--clips", required=True, help="clips/v1 dataset (ingest output) or URI")
    p.add_argument("--n", type=int, default=16, help="clips to evaluate, held-out first (default: %(default)s)")
    p.add_argument("--out", default=None, help="report directory (default: evaluation)")
    p.add_argument("--fid-weights", default=None,
                   help="TorchScript Inception-v3 for FID (the standard inception-2015-12-05.pt of "
                        "StyleGAN3/StyleGAN-V); without it FID is reported as not computed")
    p.add_argument("--fvd-weights", default=None,
                   help="TorchScript I3D for FVD (the standard i3d_torchscript.pt of StyleGAN-V); "
                        "without it FVD is reported as not computed")
    p.add_argument("--protocol", default="stylegan-v", choices=("stylegan-v", "echopulse-paper"),
                   help="FID/FVD protocol: stylegan-v (fvd2048_16f, comparable with EchoDiffusion / "
                        "EchoNet-Synthetic) or echopulse-paper (the paper's per-pair Inception "
                        "computation, for side-by-side tables; default: %(default)s)")
    p.add_argument("--min-fvd-clips", type=int, default=256,
                   help="refuse FID/FVD from fewer real clips than this (default: %(default)s)")
    p.add_argument("--fvd-frames", type=int, default=16,
                   help="consecutive frames per clip for FVD (default: %(default)s, as fvd2048_16f)")
    p.add_argument("--samples-per-clip", type=int, default=1,
                   help="generated samples per real clip (FID/FVD, EF best-of-3, memorization use all; "
                        "default: %(default)s)")
    p.add_argument("--ef-model", default=None,
                   help="TorchScript EF regressor video -> EF percent (e.g. an exported EchoNet-Dynamic "
                        "R(2+1)D), called on float (N, 3, T, H, W) in [0, 1]; without it the phantom "
                        "cavity-area estimator is used and labelled as such")
    p.add_argument("--train-clips", default=None,
                   help="clips/v1 dataset whose train split is the memorization reference "
                        "(default: --clips' own train split)")
    p.add_argument("--memorization-space", default="pixel", choices=("pixel", "latent"),
                   help="distance space of the memorization check (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    sampling_flags(p)


def add_generate_batch_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "generate-batch", cmd_generate_batch,
                 "Generate one video per ECG of a manifest with a pool of generator actors (Ray Data); "
                 "writes OUT/videos/ and a Parquet index OUT/index/.")
    p.add_argument("--manifest", required=True,
                   help="CSV with column ecg, optional id, first_frame, seconds, fps, seed")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="mp4", choices=("mp4", "gif", "dcm"),
                   help="video format (default: %(default)s)")
    p.add_argument("--actors", type=int, default=1, help="generator actors (default: %(default)s)")
    p.add_argument("--cpus-per-actor", type=int, default=1,
                   help="CPUs reserved per actor, also its torch threads (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per batch (default: %(default)s)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    video_flags(p)
    sampling_flags(p)


def add_quickstart_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "quickstart", cmd_quickstart,
                 "Run the whole chain on embedded defaults: synth, ingest, train tokenizer, tokenize, "
                 "train generator, tune, generate.")
    p.add_argument("--workdir", default="demo", help="where everything is written (default: %(default)s)")
    p.add_argument("--recipe", default="demo", help=RECIPE_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")



def add_serve_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "serve", cmd_serve,
                 "Serve a generator over HTTP with Ray Serve: POST /generate (an ECG file or JSON "
                 "array -> MP4/GIF/DICOM), GET /health. Loopback only unless --host says otherwise.")
    p.epilog = ("example: curl -F ecg=@ecg.hea -F ecg=@ecg.dat -F seconds=2 -F format=gif "
                "http://127.0.0.1:8000/generate -o echo.gif")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default: %(default)s)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="CPUs reserved per replica (default: %(default)s)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs per replica, fractions allowed (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="requests that may share one sampler forward (default: %(default)s; 1 "
                        "makes every video identical to `echopulse generate` with its seed)")
    p.add_argument("--batch-wait-s", type=float, default=0.05,
                   help="how long a request waits for others to batch with (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest accepted request body (default: %(default)s)")


def add_register_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "register", cmd_register,
                 "Log a generator checkpoint (tokenizer bundled) as an MLflow pyfunc model and "
                 "register a version of NAME in the MLflow Model Registry.")
    p.add_argument("checkpoint", help="generator checkpoint directory or URI (or runs:/RUN_ID/model)")
    p.add_argument("name", help="registered model name")
    p.add_argument("--alias", default=None, help="also point this alias (e.g. candidate) at the new version")
    p.add_argument("--run-id", default=None,
                   help="log the model into this run (e.g. the training run, for lineage); default: "
                        "a new run")


def add_alias_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "alias", cmd_alias,
                 "Point an alias (champion, candidate, ...) of a registered model at a version: "
                 "models:/NAME@ALIAS then loads it.")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version")
    p.add_argument("alias", help="alias, e.g. champion or candidate")

def add_submit_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "submit", cmd_submit,
                 "Run an echopulse command on a Ray cluster as a Ray job: upload the working dir, "
                 "stream the logs, exit with the job's status.")
    p.epilog = ("example: echopulse submit --address http://127.0.0.1:8265 -- ingest "
                "--manifest s3://bucket/manifest.csv --out s3://bucket/clips --recipe demo\n"
                "Passed to the job when set here: MLFLOW_* and AWS_* settings (tracking URI, "
                "credentials, endpoints, region) and ECHOPULSE_STUDY_SALT; add more with --env. "
                "Outputs are written on the cluster: use s3:// or shared paths.")
    job_server_flags(p)
    p.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's working dir (default: %(default)s)")
    p.add_argument("--runtime-env", default=None,
                   help="a Ray runtime env YAML to start from (e.g. cluster/runtime_env.yaml: pip "
                        "requirements)")
    p.add_argument("--image", default=None, help="container image for the job (runtime env image_uri)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="another environment variable for the job (repeatable)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the job; then it is stopped and the exit status is 124 "
                        "(default: wait until it ends)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--submission-id", default=None, help="the job's submission id (default: generated)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver")
    p.add_argument("--python", default="python",
                   help="the cluster's Python that runs echopulse (default: %(default)s)")
    p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the echopulse command to run, after --")


def add_jobs_parser(sub, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "jobs", cmd_jobs, "List Ray jobs, show or follow a job's logs, stop a job.")
    jobs_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "List the cluster's jobs, newest first."),
                         ("logs", "Print a job's logs (--follow: until it ends; exit with its status)."),
                         ("stop", "Stop a job and wait until it has stopped.")):
        q = jobs_sub.add_parser(action, parents=[common], help=text, description=text)
        q.set_defaults(fn=cmd_jobs)
        job_server_flags(q)
        if action == "list":
            q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            q.add_argument("submission_id", help="the job's submission id (see `echopulse jobs list`)")
            q.add_argument("--timeout", type=float, default=None,
                           help="seconds to wait (logs --follow: for the job to end; stop: for it to "
                                "stop, default 30)")
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or a sqlite store)")

    parser = argparse.ArgumentParser(
        prog="echopulse", parents=[common],
        description="ECG-conditioned echocardiogram video generation on Ray: ingest DICOM echo + "
                    "ECG, tokenize, train, sweep masking schedules, generate echo from an ECG.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"echopulse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (add_synth_parser, add_manifest_parser, add_ingest_parser, add_train_parser,
                       add_tokenize_parser, add_tune_parser, add_calibrate_parser, add_generate_parser,
                       add_evaluate_parser, add_generate_batch_parser, add_register_parser, add_alias_parser,
                       add_serve_parser, add_quickstart_parser, add_submit_parser, add_jobs_parser):
        add_parser(sub, common)
    return parser


def _one_line(exc: BaseException) -> str:
    """The informative line of an exception; Ray wraps remote errors in whole tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback") or len(lines) > 3 else lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        os.environ["ECHOPULSE_WORKER_LOGS"] = "1"
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "botocore", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if getattr(args, "s3_endpoint", None):
        # before Ray starts: local workers inherit it and Ray Train's S3 filesystem is built from it
        os.environ["AWS_ENDPOINT_URL_S3"] = args.s3_endpoint
    try:
        _export_model_store(args)
        return args.fn(args)
    except RunStopped as exc:  # what finished is kept; --resume continues
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RESUMABLE
    except (EchoPulseError, FileNotFoundError, ValueError) as exc:  # bad input or config
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the run failed: one line, the traceback under --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
