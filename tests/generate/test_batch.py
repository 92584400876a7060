"""Batch generation as a Ray Data job: one video per manifest row plus a Parquet index."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from .test_video_out import gif_frames_and_fps


@pytest.mark.integration
def test_generate_batch_writes_videos_and_index(ray_session, tiny_checkpoint, corpus, tmp_path, capsys):
    from echopulse.cli import EXIT_OK, main

    manifest = corpus / "batch.csv"
    manifest.write_text(
        "id,ecg,first_frame,seconds,seed\n"
        "a,ecg/study_0000.hea,,2,1\n"
        "b,ecg/study_0001.hea,echo/study_0001.dcm,,\n"
        ",ecg/study_0001.hea,,1.4,\n"
        "bad,ecg/missing.hea,,,\n"
    )
    out = tmp_path / "batch"
    code = main(["generate-batch", "--manifest", str(manifest), "--checkpoint", str(tiny_checkpoint),
                 "--out", str(out), "--format", "gif", "--actors", "1", "--batch-size", "2"])
    assert code == EXIT_OK, capsys.readouterr().err
    index = pq.read_table(out / "index").to_pylist()
    by_id = {row["video_id"]: row for row in index}
    assert len(index) == 4 and set(by_id) >= {"a", "b", "bad"}
    assert by_id["bad"]["status"] == "error" and "missing.hea" in by_id["bad"]["error"]
    ok = [row for row in index if row["status"] == "ok"]
    assert len(ok) == 3
    for row in ok:
        count, rates = gif_frames_and_fps(row["video"])
        assert count == row["frames"] == round(row["seconds"] * 5.0)
        assert rates == pytest.approx([5.0] * count)
    assert by_id["a"]["frames"] == 10 and by_id["b"]["frames"] == 5
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"{r['video_id']}.gif" for r in ok)


def test_a_served_video_does_not_depend_on_what_shares_its_batch(model):
    """Requests with different seeds share one sampler forward, and each still gets the video it
    would get alone: its noise comes from its own seed."""
    from echopulse.serving import GenerateRequest, generate_many

    rng = np.random.default_rng(0)
    ecgs = [rng.standard_normal((12, model.clip.ecg_samples)).astype(np.float32) for _ in range(3)]

    def request(i: int, seed: int) -> GenerateRequest:
        return GenerateRequest(ecg=ecgs[i], lead_mask=np.ones(12, dtype=bool), seed=seed)

    together = generate_many(model, [request(0, 1), request(1, 2), request(2, 3)])
    alone = generate_many(model, [request(1, 2)])
    reordered = generate_many(model, [request(1, 2), request(0, 7)])
    same_seed = generate_many(model, [request(0, 2), request(1, 2)])  # second in its batch
    np.testing.assert_array_equal(together[1], alone[0])
    np.testing.assert_array_equal(same_seed[1], alone[0])
    np.testing.assert_array_equal(reordered[0], alone[0])
    assert not np.array_equal(generate_many(model, [request(1, 4)])[0], alone[0])
