"""The CLI's contract: --help explains, bad input gives one clear line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from echopulse.cli import EXIT_BAD_INPUT, build_parser, main


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("synth", "manifest", "ingest", "train", "tokenize", "tune", "generate", "quickstart"):
        assert command in text


def test_train_has_both_models():
    parser = build_parser()
    args = parser.parse_args(["train", "generator", "--tokens", "t", "--tokenizer", "k", "--out", "o"])
    assert args.model == "generator"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["ingest", "--manifest", "/nonexistent/manifest.csv", "--out", "OUT"], "/nonexistent/manifest.csv"),
        (["ingest", "--manifest", "m.csv", "--out", "o", "--recipe", "huge"], "unknown recipe"),
        (["generate", "--checkpoint", "/no/ckpt", "--ecg", "x.hea", "--out", "video.avi"], ".avi"),
        (["train", "tokenizer", "--clips", "/no/clips", "--out", "o", "--recipe", "tiny"], "/no/clips"),
        (["ingest", "--manifest", "nosuch://bucket/m.csv", "--out", "o", "--recipe", "tiny"],
         "nosuch://bucket/m.csv"),
        (["tokenize", "--clips", "/no/clips", "--tokenizer", "/no/tok", "--out", "o"], "/no/clips"),
        (["manifest", "echonet-dynamic", "/no/root", "--out", "m.csv"], "/no/root"),
        (["manifest", "camus", ".", "--ecg-root", "/no/ecg", "--out", "m.csv"], "--ecg-root"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unreadable_manifest(tmp_path, capsys):
    bad = tmp_path / "manifest.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["ingest", "--manifest", str(bad), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert str(bad) in capsys.readouterr().err


def test_console_script_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "echopulse.cli", "--version"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "echopulse" in proc.stdout
