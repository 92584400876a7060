"""``echopulse manifest`` on small roots in each public dataset's exact layout (see conftest.py)."""

from __future__ import annotations

import csv
from datetime import timedelta

import numpy as np
import pytest

from echopulse.cli import main
from echopulse.config import ClipConfig
from echopulse.ingest import IngestError, make_ingest_fn
from echopulse.io.volume import read_echo_volume
from echopulse.manifests import LayoutError, build_manifest

CLIP = ClipConfig(frames=5, size=32, fps=5.0, ecg_samples=300)


def run_cli(*args: str) -> int:
    return main(["manifest", *args])


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ingest(row: dict, base_dir) -> list[dict]:
    return make_ingest_fn(CLIP, base_dir=str(base_dir), salt="s")(dict(row))


def test_mimic_echo_reads_the_screen_ecg_and_counts_what_it_skips(mimic_roots, tmp_path, capsys):
    echo_root, _ = mimic_roots
    out = tmp_path / "manifest.csv"
    assert run_cli("mimic-echo", str(echo_root), "--out", str(out)) == 0
    rows = read_rows(out)
    assert [r["echo"].rsplit("/", 1)[-1] for r in rows] == ["90000001_0001.dcm", "90000002_0001.dcm"]
    assert {r["ecg"] for r in rows} == {"screen"} and {r["ecg_sync"] for r in rows} == {"true"}
    assert [r["study"] for r in rows] == ["p10000001", "p10000002"]  # grouped by subject
    printed = capsys.readouterr().out
    assert "skipped 1: single-frame image" in printed
    assert "skipped 1: not an ultrasound image" in printed


def test_mimic_ecg_root_pairs_the_nearest_ecg_of_the_subject_within_the_gap(mimic_roots, tmp_path):
    echo_root, ecg_root = mimic_roots
    out = tmp_path / "manifest.csv"
    assert run_cli("mimic-echo", str(echo_root), "--ecg-root", str(ecg_root), "--out", str(out)) == 0
    first, second = read_rows(out)
    # subject 1: the ECG 2 h later, not the one 2 days later; unsynchronized, aligned start to start
    assert first["ecg"].endswith("p10000001/s40000001/40000001.hea")
    assert (first["ecg_sync"], first["ecg_offset_s"]) == ("false", "0")
    # subject 2's only ECG is 30 h away: past the default 24 h gap, the screen trace stays
    assert (second["ecg"], second["ecg_sync"]) == ("screen", "true")
    wider = build_manifest("mimic-echo", echo_root, ecg_root=ecg_root, max_gap=timedelta(hours=36))
    assert wider.rows[1]["ecg"].endswith("40000002.hea")
    # ingest reads what the row points at: the cine and the 12-lead WFDB record
    clips = ingest(first, tmp_path)
    assert clips and {c["ecg_source"] for c in clips} == {"wfdb"} and all(clips[0]["ecg_leads"])


def test_mimic_path_outside_the_layout_is_refused_in_one_line(mimic_roots, tmp_path, capsys):
    echo_root, _ = mimic_roots
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "files").mkdir()
    (bad / "echo-record-list.csv").write_text(
        "subject_id,study_id,acquisition_datetime,dicom_filepath\n1,2,2180-01-01 00:00:00,echo/a.dcm\n")
    assert run_cli("mimic-echo", str(bad), "--out", str(tmp_path / "m.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "echo-record-list.csv" in err and "echo/a.dcm" in err


@pytest.mark.parametrize("dataset", ["mimic-echo", "echonet-dynamic", "echonet-pediatric", "camus"])
def test_a_root_in_another_layout_exits_2_with_one_line(dataset, echonet_dynamic_root, mimic_roots, tmp_path,
                                                        capsys):
    # each dataset's root handed to another dataset's layout (and an empty folder) is refused
    other = mimic_roots[0] if dataset != "mimic-echo" else echonet_dynamic_root
    for root in (other, tmp_path):
        assert run_cli(dataset, str(root), "--out", str(tmp_path / "m.csv")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and str(root) in err
    assert not (tmp_path / "m.csv").exists()


def test_echonet_dynamic_rows_carry_ef_split_and_traced_ed_es_frames(echonet_dynamic_root, tmp_path, capsys):
    out = echonet_dynamic_root / "manifest.csv"
    assert run_cli("echonet-dynamic", str(echonet_dynamic_root), "--out", str(out)) == 0
    rows = read_rows(out)
    assert [r["echo"] for r in rows] == ["Videos/0X1A.avi", "Videos/0X1B.avi"]  # relative to the manifest
    assert [r["ef"] for r in rows] == ["0.55", "0.4"] and [r["split"] for r in rows] == ["train", "val"]
    assert {(r["ed_frame"], r["es_frame"], r["view"], r["ecg"]) for r in rows} == {("24", "7", "A4C", "")}
    assert "skipped 1: listed video missing" in capsys.readouterr().out
    clips = ingest(rows[0], echonet_dynamic_root)
    assert clips and {c["ecg_source"] for c in clips} == {"none"} and clips[0]["ef"] == pytest.approx(0.55)


def test_filelist_as_ingest_manifest_reads_as_the_manifest_command_writes(echonet_dynamic_root):
    """Ingest given FileList.csv itself makes the rows ``echopulse manifest echonet-dynamic`` makes
    (one function), less the video check and the tracings."""
    from pipelines.plan import read_manifest

    built = {r["study"]: r for r in build_manifest("echonet-dynamic", echonet_dynamic_root).rows}
    read = {r["study"]: r for r in read_manifest(str(echonet_dynamic_root / "FileList.csv"))}
    assert set(read) == set(built) | {"0X1C"}  # the missing video is ingest's to quarantine
    for study, row in built.items():
        assert read[study]["echo"] == f"Videos/{study}.avi"
        assert row["echo"] == str(echonet_dynamic_root / "Videos" / f"{study}.avi")
        same = {k: v for k, v in row.items() if k not in ("echo", "ed_frame", "es_frame")}
        assert {k: read[study][k] for k in same} == same
        assert read[study]["ed_frame"] == read[study]["es_frame"] == ""


def test_echonet_pediatric_maps_folds_to_splits_and_folders_to_views(echonet_pediatric_root, tmp_path):
    manifest = build_manifest("echonet-pediatric", echonet_pediatric_root)
    got = [(r["view"], r["split"], r["ed_frame"], r["es_frame"], r["ef"]) for r in manifest.rows]
    assert got == [("A4C", "train", "3", "12", "0.625"), ("A4C", "val", "3", "12", "0.625"),
                   ("PSAX", "test", "3", "12", "0.625")]
    clips = ingest(manifest.rows[2], tmp_path)  # absolute path; fps from the container
    assert clips and clips[0]["view"] == "PSAX"


def test_echonet_pediatric_fold_outside_0_to_9_is_refused(echonet_pediatric_root, tmp_path):
    import shutil

    root = tmp_path / "ped"
    shutil.copytree(echonet_pediatric_root / "PSAX", root / "PSAX")
    listing = root / "PSAX" / "FileList.csv"
    listing.write_text(listing.read_text().replace(",9\n", ",TRAIN\n"))
    with pytest.raises(LayoutError, match="Split 'TRAIN'.*not a fold 0-9"):
        build_manifest("echonet-pediatric", root)


def test_camus_nifti_and_mhd_releases_give_views_frames_ef_and_splits(camus_roots, tmp_path):
    nifti, mhd, frames = camus_roots
    rows = build_manifest("camus", nifti, fps=10.0).rows
    assert [(r["study"], r["view"], r["split"], r["ef"]) for r in rows] == [
        ("patient0001", "A2C", "train", "0.55"), ("patient0001", "A4C", "train", "0.55"),
        ("patient0002", "A2C", "test", "0.385"), ("patient0002", "A4C", "test", "0.385")]
    assert {(r["ed_frame"], r["es_frame"], r["fps"]) for r in rows} == {("0", "15", "10")}
    old = build_manifest("camus", mhd, fps=10.0)
    assert [(r["study"], r["split"]) for r in old.rows] == [("patient0003", "train"), ("patient0004", "test")]
    assert old.skipped["patient without a 2CH sequence"] == 2
    # both formats read back to the frames that were written, upright (T, H, W)
    for row in (rows[0], old.rows[0]):
        got, meta = read_echo_volume(row["echo"], fps=float(row["fps"]))
        np.testing.assert_array_equal(got, frames)
        assert meta["fps"] == 10.0
        clips = ingest(row, tmp_path)
        assert clips and clips[0]["view"] == row["view"] and clips[0]["ecg_source"] == "none"


def test_camus_without_a_frame_rate_is_quarantined_with_the_reason(camus_roots, tmp_path):
    row = build_manifest("camus", camus_roots[0]).rows[0]
    with pytest.raises(IngestError, match="no frame rate.*--fps"):
        ingest(row, tmp_path)
