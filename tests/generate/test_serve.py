"""``echopulse serve`` on loopback (one service for the module): the real 12-lead DICOM ECG and an
Apple Health export in, playable videos out; concurrent requests batched; bad uploads get a 4xx
with the CLI's one line, the replica keeps answering, and uploads leave nothing behind."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import free_loopback_port

from .test_video_out import gif_frames_and_fps, mp4_frames_and_fps

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    """``echopulse serve`` in its own process (its own local Ray), uploads capped at 1 MB."""
    port = free_loopback_port()
    tmp = tempfile.mkdtemp(prefix="eps")  # short: Ray's socket paths live under TMPDIR
    env = {**os.environ, "TMPDIR": tmp, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = open(os.path.join(tmp, "serve.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "echopulse.cli", "serve", "--checkpoint", str(tiny_checkpoint),
         "--port", str(port), "--max-upload-mb", "1", "--batch-wait-s", "0.5", "--max-batch-size", "8"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while True:
            try:
                if requests.get(url + "/health", timeout=30).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still deploying
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(Path(tmp, "serve.log").read_text()[-3000:])
            time.sleep(2)
        yield url, Path(tmp)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def _post(url, files=None, data=None, **kwargs):
    return requests.post(url + "/generate", files=files, data=data, timeout=300, **kwargs)


def test_real_dicom_ecg_and_apple_health_export_give_playable_videos(service, model, corpus, tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from echopulse.synth.ecg_sim import simulate_ecg
    from tests.io.test_ecg_io import apple_health_csv

    url, _ = service
    dicom_ecg = Path(get_testdata_file("waveform_ecg.dcm"))
    r = _post(url, files={"ecg": (dicom_ecg.name, dicom_ecg.read_bytes())}, data={"seconds": "2"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    (tmp_path / "dicom.mp4").write_bytes(r.content)
    frames, fps = mp4_frames_and_fps(tmp_path / "dicom.mp4")
    assert len(frames) == 10 and fps == pytest.approx(5.0)  # 2 s at the model's 5 fps

    watch = apple_health_csv(tmp_path / "ecg_2024-03-05.csv", simulate_ecg(30.0, 64, fs=512, seed=5).signal[0] * 1000.0)
    r = _post(url, files={"ecg": (watch.name, watch.read_bytes())}, data={"seconds": "3", "format": "gif"})
    assert r.status_code == 200, r.text
    (tmp_path / "watch.gif").write_bytes(r.content)
    n, rates = gif_frames_and_fps(tmp_path / "watch.gif")
    assert n == 15 and rates[0] == pytest.approx(5.0, rel=0.05)

    # a WFDB pair, alone in its batch, as DICOM: exactly the frames `echopulse generate` makes
    hea, dat = corpus / "ecg" / "study_0000.hea", corpus / "ecg" / "study_0000.dat"
    r = _post(url, files=[("ecg", (hea.name, hea.read_bytes())), ("ecg", (dat.name, dat.read_bytes()))],
              data={"seed": "3", "format": "dcm"})
    assert r.status_code == 200, r.text
    served = pydicom.dcmread(io.BytesIO(r.content)).pixel_array
    assert np.array_equal(served, model.generate(str(hea), seed=3))

    # a JSON array with its rate (a wearable's lead I)
    signal_ = simulate_ecg(10.0, 70, fs=250, seed=1).signal[0]
    r = _post(url, json={"ecg": signal_.round(4).tolist(), "rate": 250, "format": "gif"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif", r.text


def test_concurrent_requests_share_forwards(service, corpus):
    url, _ = service
    hea, dat = corpus / "ecg" / "study_0001.hea", corpus / "ecg" / "study_0001.dat"
    files = [("ecg", (hea.name, hea.read_bytes())), ("ecg", (dat.name, dat.read_bytes()))]
    before = requests.get(url + "/health", timeout=30).json()["batches"]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: _post(url, files=files, data={"format": "gif"}).status_code, range(6)))
    assert codes == [200] * 6
    batches = requests.get(url + "/health", timeout=30).json()["batches"] - before
    assert 1 <= batches < 6  # some requests were served by the same forward


def test_bad_uploads_get_4xx_with_one_line_and_the_service_keeps_answering(service, corpus):
    url, tmp = service
    hea, dat = corpus / "ecg" / "study_0000.hea", corpus / "ecg" / "study_0000.dat"
    pair = [("ecg", (hea.name, hea.read_bytes())), ("ecg", (dat.name, dat.read_bytes()))]
    cases = [
        (dict(files=pair, data={"colour": "red"}), 400, "unknown option(s) 'colour'"),
        (dict(files=pair, data={"seconds": "abc"}), 400, "option seconds"),
        (dict(files=pair, data={"format": "avi"}), 400, "option format"),
        (dict(files=pair, data={"seconds": "30"}), 422, "shorter than the requested 30.00 s"),
        (dict(files=pair[:1]), 400, "without its signal file"),
        (dict(files={"ecg": ("notes.bin", b"hello")}), 422, "notes.bin: unknown ECG format"),
        (dict(files={"ecg": ("notes.txt", b"hello")}), 422, "notes.txt: CSV ECG holds no samples"),
        (dict(files={"ecg": ("ecg.csv", b"I,II\n1,2\n")}), 422, "ecg.csv"),
        (dict(files={"ecg": ("../../etc/x.hea", b"x")}), 400, "x.hea: WFDB header uploaded without"),
        (dict(files={"ecg": ("big.csv", b"0" * (2 * 2**20))}), 413, "over the 1 MB limit"),
        (dict(data=b"{not json", headers={"content-type": "application/json"}), 400, "does not parse"),
        (dict(json={"ecg": [0.0] * 100, "rate": 250}), 422, "ECG too short"),
        (dict(data=b"x", headers={"content-type": "text/plain"}), 415, "unsupported content type"),
        (dict(data=b"--b\r\nbroken", headers={"content-type": "multipart/form-data; boundary=b"}), 400, ""),
    ]
    for kwargs, status, message in cases:
        r = _post(url, **kwargs)
        assert r.status_code == status, (kwargs.get("data"), r.status_code, r.text)
        error = r.json()["error"]
        assert message in error and "\n" not in error and str(tmp) not in error
    assert requests.get(url + "/health", timeout=30).status_code == 200
    assert _post(url, files=pair, data={"format": "gif"}).status_code == 200
    assert not list(tmp.rglob("echopulse-upload-*")) and not list(tmp.rglob("echopulse-out-*"))
