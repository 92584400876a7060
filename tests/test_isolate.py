"""Inputs decoded in a limited child process (pipelines/isolate.py), without Ray: an input that
asks for more memory than the limit, or that the kernel stops, is quarantined and the next input runs."""

from __future__ import annotations

import struct

import numpy as np
import pydicom
import pytest

from echopulse.ingest import IngestOptions
from echopulse.io.dicom_cine import write_cine
from echopulse.synth.dicom_variants import rewrite_transfer_syntax
from jobs.recipes import tiny
from pipelines.ingest import make_input_fn
from pipelines.isolate import WORKER_STAGE, isolated_inputs
from pipelines.plan import input_key

UIDS = {"study": "1.2.826.0.1.3680043.8.498.1", "series": "1.2.826.0.1.3680043.8.498.2",
        "sop": "1.2.826.0.1.3680043.8.498.3"}


def _cine(path, n_frames: int, size: int = 96) -> None:
    """A moving sector, enough for ingest's crop and clip cutting (no ECG: ECG-less clips); longer
    cines repeat the first 40 frames."""
    y, x = np.mgrid[0:size, 0:size]
    sector = (y > 4) & (np.abs(x - size / 2) < y * 0.7)
    t = np.arange(40)[:, None, None]
    frames = (sector * (110 + 80 * np.sin((x + 3 * t) / 5.0) * np.cos(y / 6.0))).astype(np.uint8)
    frames = np.tile(frames, (n_frames // 40, 1, 1))
    write_cine(path, frames, 30.0, uids=UIDS, date="20200101", time="120000",
               attributes={"Manufacturer": "test"})


def _row(name: str) -> dict:
    row = {"echo": name, "ecg": "", "view": "A4C"}
    return {**row, "_key": input_key(row)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolate")
    _cine(root / "good.dcm", 40)
    # a JPEG cine whose second frame's codestream declares 60000 x 60000 pixels while the DICOM
    # header says 96 x 96: the header check passes, the JPEG decoder asks for gigabytes
    rewrite_transfer_syntax(root / "good.dcm", root / "jpeg.dcm", "jpeg_baseline")
    data = bytearray((root / "jpeg.dcm").read_bytes())
    sof = data.find(b"\xff\xc0", data.find(b"\xff\xc0") + 2)
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    (root / "bomb.dcm").write_bytes(bytes(data))
    _cine(root / "long.dcm", 12000)  # a real, long cine: several CPU seconds to cut
    return root


def _process(root, names, options):
    make = lambda: make_input_fn(tiny().clip, str(root), None, options)  # noqa: E731
    with isolated_inputs(make, options) as decode:
        results = [decode(_row(n)) for n in names]
        return results, decode.deaths


def test_a_codestream_beyond_the_memory_limit_fails_in_the_child_not_the_node(inputs):
    options = IngestOptions(screen_ecg=False, max_decoded_bytes=64 << 20, max_input_cpu_s=None)
    assert pydicom.dcmread(inputs / "bomb.dcm").Rows == 96
    results, deaths = _process(inputs, ["good.dcm", "bomb.dcm", "jpeg.dcm"], options)
    (good, table), (bomb, none), (jpeg, _) = results
    assert good["clips"] == table.num_rows > 0 and jpeg["clips"] > 0
    assert bomb["clips"] == 0 and none is None and bomb["stage"] == "read_echo"
    assert deaths == 0  # the limit turned the allocation into a decode error
    assert "Out of free memory" in bomb["detail"] or "MemoryError" in bomb["detail"]


def test_an_input_the_kernel_stops_is_quarantined_and_the_next_input_runs(inputs):
    options = IngestOptions(screen_ecg=False, max_input_cpu_s=1)
    results, deaths = _process(inputs, ["good.dcm", "long.dcm", "good.dcm"], options)
    (first, _), (long, table), (again, _) = results
    assert first["clips"] > 0 and again["clips"] == first["clips"]
    assert table is None and long["stage"] == WORKER_STAGE
    assert long["error"] == "worker died: signal 24 (SIGXCPU)" and deaths == 1
