"""``echopulse evaluate``: every section computed (or honestly not), reports written, MLflow run."""

from __future__ import annotations

import json

import pytest

from echopulse.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_evaluate_writes_reports_and_logs_to_mlflow(tiny_checkpoint, clips_dataset, tmp_path, capsys):
    import mlflow

    out = tmp_path / "eval"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--clips", str(clips_dataset),
                 "--n", "3", "--out", str(out), "--tracking-uri", uri])
    assert code == EXIT_OK, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 3 and len(report["per_clip"]) == 3
    recon = report["tokenizer_reconstruction"]
    assert 0 < recon["mse"] < 1 and 0 < recon["mae"] < 1 and recon["psnr"] > 5 and -1 < recon["ssim"] <= 1
    gen = report["generation"]
    assert 0 < gen["mse"] < 1 and gen["psnr"] > 0 and -1 < gen["ssim"] <= 1
    control = report["ecg_control"]
    for key in ("matched", "shuffled", "swapped", "real"):
        assert -1 <= control[key] <= 1, key
    assert control["real"] > 0.3  # the metric sees the phantom's own ECG timing
    ef = report["ef"]
    assert ef["clips"] == 3 and 0 <= ef["mae_real_estimate"] < 0.3 and 0 <= ef["mae_generated"] <= 1
    for name in ("fid", "fvd"):
        assert report[name]["status"] == "not computed" and "weights" in report[name]["reason"]
    markdown = (out / "report.md").read_text()
    assert "not computed" in markdown and "tokenizer_reconstruction" in markdown

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("echopulse").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["gen_ssim"] == pytest.approx(gen["ssim"])
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert artifacts == {"evaluation/report.json", "evaluation/report.md"}


def test_fid_and_fvd_use_the_given_feature_network(tiny_checkpoint, clips_dataset, tmp_path):
    """A TorchScript file with the standard networks' calling convention is used as given (here a
    small real network, so the plumbing is tested without the multi-megabyte weights)."""
    import torch

    from echopulse.evaluate import evaluate

    class Images(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            x = x.float() / 255.0
            return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), x[:, 0, 0].mean(-1)], dim=1)

    class Videos(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = True,
                    return_features: bool = True) -> torch.Tensor:
            return torch.stack([x.mean(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4))], dim=1)

    fid_file, fvd_file = tmp_path / "inception.pt", tmp_path / "i3d.pt"
    torch.jit.script(Images()).save(str(fid_file))
    torch.jit.script(Videos()).save(str(fvd_file))
    report = evaluate(str(tiny_checkpoint), str(clips_dataset), str(tmp_path / "eval"), n=2,
                      fid_weights=str(fid_file), fvd_weights=str(fvd_file))
    assert report["fid"]["value"] >= 0 and report["fid"]["samples"] == 2 * 5
    assert report["fvd"]["value"] >= 0 and report["fvd"]["samples"] == 2


def test_evaluate_bad_inputs(tiny_checkpoint, clips_dataset, tmp_path, capsys):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"not torchscript")
    cases = [
        (["--clips", str(tmp_path / "nope")], "nope"),
        (["--clips", str(clips_dataset), "--fid-weights", str(junk)], "weights.pt"),
        (["--clips", str(clips_dataset), "--n", "0"], "--n"),
    ]
    for extra, needle in cases:
        code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_BAD_INPUT and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e").exists()
