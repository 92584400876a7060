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
from echopulse.errors import EchoPulseError

log = logging.getLogger("echopulse")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

EPILOG = """\
The chain, each stage reading the previous one's output:
  echopulse synth      --out synth --studies 8 --seed 0
  echopulse ingest     --manifest synth/manifest.csv --out clips --recipe tiny
  echopulse train tokenizer --clips clips --out tokenizer --recipe tiny
  echopulse tokenize   --clips clips --tokenizer tokenizer/checkpoint --out tokens
  echopulse train generator --tokens tokens --tokenizer tokenizer/checkpoint --out generator --recipe tiny
  echopulse tune       --tokens tokens --tokenizer tokenizer/checkpoint --trials 2 --recipe tiny
  echopulse generate   --checkpoint generator/checkpoint --ecg synth/ecg/study_0000.hea --out echo.gif
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

    manifest = write_corpus(args.out, studies=args.studies, seed=args.seed, duration_s=args.seconds)
    print(f"wrote {args.studies} phantom studies; manifest: {manifest}")
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import run_ingest

    summary = run_ingest(args.manifest, args.out, _recipe(args.recipe).clip, salt=args.salt,
                         resume=args.resume)
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
        from jobs.train_generator import train_generator

        result = train_generator(args.tokens, args.tokenizer, args.out, recipe, _tracking(args),
                                 workers=args.workers, use_gpu=use_gpu)
    _print_json(summarize(args.model, result))
    return EXIT_OK


def cmd_tokenize(args: argparse.Namespace) -> int:
    from pipelines.tokenize import run_tokenize

    summary = run_tokenize(args.clips, args.tokenizer, args.out, actors=args.actors,
                           batch_size=args.batch_size, use_gpu=args.gpu)
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
                                 steps=args.steps, guidance=args.guidance))
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

    def add(name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    recipe_help = "recipe: tiny, demo, paper or a recipe .json (default: %(default)s)"

    p = add("synth", cmd_synth, "Write a synthetic corpus: echo phantom DICOMs, WFDB ECGs, manifest.csv.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--studies", type=int, default=8, help="number of studies (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0, help="study length (default: %(default)s)")

    p = add("ingest", cmd_ingest, "DICOM echo + ECG pairs from a manifest -> clips/v1 Parquet (Ray Data).")
    p.add_argument("--manifest", required=True, help="manifest CSV (columns echo, ecg, ...)")
    p.add_argument("--out", required=True, help="output directory or s3:// URI")
    p.add_argument("--recipe", default="demo", help=recipe_help)
    p.add_argument("--salt", default=None, help="study-key salt (default: ECHOPULSE_STUDY_SALT)")
    p.add_argument("--resume", action="store_true", help="skip inputs already done in --out")

    train = add("train", lambda a: EXIT_BAD_INPUT, "Train the tokenizer or the generator (Ray Train).")
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
        p.add_argument("--out", required=True, help="output directory or URI")
        p.add_argument("--recipe", default="demo", help=recipe_help)
        p.add_argument("--workers", type=int, default=None, help="Ray Train workers")
        p.add_argument("--gpu", action="store_true", help="one GPU per worker")

    p = add("tokenize", cmd_tokenize, "clips/v1 -> tokens/v1 with a pool of tokenizer actors (Ray Data).")
    p.add_argument("--clips", required=True, help="clips/v1 dataset")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    p.add_argument("--out", required=True, help="output directory or URI")
    p.add_argument("--actors", type=int, default=1, help="tokenizer actors (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per batch (default: %(default)s)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")

    p = add("tune", cmd_tune, "Sweep masking schedules with Ray Tune; MLflow parent + child runs.")
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
    p.add_argument("--recipe", default="demo", help=recipe_help)

    p = add("generate", cmd_generate, "Generate an echo video from an ECG file (WFDB or DICOM ECG).")
    p.add_argument("--checkpoint", required=True, help="generator checkpoint directory")
    p.add_argument("--ecg", required=True, help="ECG file: WFDB .hea or DICOM 12-lead ECG")
    p.add_argument("--out", required=True, help="output video: .gif or .mp4")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: checkpoint's)")

    p = add("quickstart", cmd_quickstart,
            "Run the whole chain on embedded defaults: synth, ingest, train tokenizer, tokenize, "
            "train generator, tune, generate.")
    p.add_argument("--workdir", default="demo", help="where everything is written (default: %(default)s)")
    p.add_argument("--recipe", default="demo", help=recipe_help)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
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
    try:
        return args.fn(args)
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
