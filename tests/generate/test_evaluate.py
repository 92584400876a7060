"""``echopulse evaluate`` end to end on the tiny chain: every section computed (or honestly not),
per-view in-sector metrics with counts, FID/FVD/EF from TorchScript stand-ins, memorization,
reports and figures written, MLflow run."""

from __future__ import annotations

import json

import pytest
import torch

from echopulse.cli import EXIT_BAD_INPUT, EXIT_OK, main


class Images(torch.nn.Module):
    """Inception's call signature: uint8 (N, 3, H, W) -> features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), x[:, 0, 0].mean(-1)], dim=1)


class Videos(torch.nn.Module):
    """I3D's call signature: uint8 (N, 3, T, H, W), rescale, resize, return_features -> features."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.stack([x.mean(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4)),
                            x[:, :, 1:].sub(x[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))], dim=1)


class MeanEF(torch.nn.Module):
    """An EF regressor's call signature: float (N, 3, T, H, W) in [0, 1] -> (N,) EF percent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 + 100.0 * x.mean(dim=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    paths = {}
    for name, module in (("inception", Images()), ("i3d", Videos()), ("ef", MeanEF())):
        paths[name] = str(root / f"{name}.pt")
        torch.jit.script(module).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def train_clips(tmp_path_factory, clips_dataset):
    """The fixture clips relabelled as a train split: the memorization reference."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("train_clips")
    shutil.copy(clips_dataset / "dataset.json", out / "dataset.json")
    table = pq.read_table(clips_dataset / "clips" / "part-0.parquet")
    table = table.set_column(table.schema.get_field_index("split"), "split",
                             pa.array(["train"] * table.num_rows))
    (out / "clips").mkdir()
    pq.write_table(table, out / "clips" / "part-0.parquet")
    return out


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
    # the sector is a part of the frame: in-sector error is larger than the background-diluted one
    assert recon["sector_mse"] > recon["mse"] and recon["sector_psnr"] < recon["psnr"]
    gen = report["generation"]
    assert 0 < gen["sector_mse"] < 1 and gen["psnr"] > 0 and -1 < gen["sector_ssim"] <= 1
    control = report["ecg_control"]
    for key in ("matched", "shuffled", "swapped", "chance", "real", "reconstructed"):
        assert -1 <= control[key] <= 1, key
    assert control["real"] > 0.3  # the metric sees the phantom's own ECG timing
    view = report["per_view"]["A4C"]  # the phantom's view, beside "all"
    assert view["gen_sector_psnr"]["used"] + view["gen_sector_psnr"]["dropped"] == 3
    ef = report["ef"]
    assert ef["estimator"].startswith("phantom estimator") and ef["all"]["clips_with_known_ef"] == 3
    assert 0 <= ef["all"]["real"]["mae"] < 30 and ef["all"]["generated_mean_over_samples"]["rmse"] >= 0
    for name in ("fid", "fvd"):
        assert report[name]["status"] == "not computed" and "weights" in report[name]["reason"]
    assert report["memorization"]["status"] == "not computed"  # the fixture has no train split
    assert report["terms"]["shuffled"].startswith("ECG-sync of the clip generated from the partner")
    markdown = (out / "report.md").read_text()
    assert "not computed" in markdown and "## Per view" in markdown and "figures/strip_A4C.png" in markdown
    assert (out / "figures" / "strip_A4C.png").stat().st_size > 1000

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("echopulse").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data.metrics
    assert logged["gen_sector_ssim"] == pytest.approx(gen["sector_ssim"])
    assert logged["per_view/A4C/gen_sector_psnr/used"] == view["gen_sector_psnr"]["used"]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert artifacts == {"evaluation/report.json", "evaluation/report.md", "evaluation/figures"}


def test_evaluate_with_feature_networks_ef_model_and_memorization(tiny_checkpoint, clips_dataset, train_clips,
                                                                  standins, tmp_path, capsys):
    """The done-when run: FID/FVD/EF from TorchScript stand-ins with the standard calling conventions."""
    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--clips", str(clips_dataset),
                 "--n", "2", "--out", str(out), "--samples-per-clip", "3",
                 "--fid-weights", standins["inception"], "--fvd-weights", standins["i3d"],
                 "--ef-model", standins["ef"], "--min-fvd-clips", "2", "--fvd-frames", "5",
                 "--train-clips", str(train_clips), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == EXIT_OK, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    fvd, fid = report["fvd"], report["fid"]
    assert fvd["value"] >= 0 and fvd["protocol"] == "stylegan-v fvd2048_5f"
    assert fvd["real_clips"] == 2 and fvd["generated_clips"] == 6 and fvd["frames_per_clip"] == 5
    assert fid["value"] >= 0 and fid["real_frames"] == 10 and fid["generated_frames"] == 30
    ef = report["ef"]
    assert ef["estimator"] == "regressor ef.pt" and ef["best_of_k"] == 3
    for key in ("real", "generated_mean_over_samples", "generated_best_of_3"):
        assert set(ef["all"][key]) == {"r2", "mae", "rmse", "clips"}
    assert ef["all"]["generated_mean_over_samples"]["clips"] == 6
    assert ef["all"]["generated_best_of_3"]["mae"] <= ef["all"]["generated_mean_over_samples"]["mae"]
    mem = report["memorization"]
    # the held-out clips are themselves in the reference set here: nothing generated is nearer
    assert mem["threshold"] == 0 and mem["share_closer_than_heldout"] == 0 and mem["generated_clips"] == 6
    assert "A4C" in report["per_view"] and "sector_ssim" in report["generation"]

    # fewer real clips than --min-fvd-clips: refused in one line before anything is generated
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--clips", str(clips_dataset),
                 "--n", "2", "--out", str(tmp_path / "refused"), "--fvd-weights", standins["i3d"]])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "--min-fvd-clips 256" in err and len(err.splitlines()) == 1, err


def test_evaluate_bad_inputs(tiny_checkpoint, clips_dataset, tmp_path, capsys):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"not torchscript")
    cases = [
        (["--clips", str(tmp_path / "nope")], "nope"),
        (["--clips", str(clips_dataset), "--fid-weights", str(junk)], "weights.pt"),
        (["--clips", str(clips_dataset), "--ef-model", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--clips", str(clips_dataset), "--n", "0"], "--n"),
        (["--clips", str(clips_dataset), "--samples-per-clip", "0"], "--samples-per-clip"),
    ]
    for extra, needle in cases:
        code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_BAD_INPUT and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e").exists()
