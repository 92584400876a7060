from __future__ import annotations

from echopulse.schema import CLIP_COLUMNS, clip_id, split_for, study_key


def test_clip_id_is_deterministic_and_span_sensitive():
    a = clip_id("echo/a.dcm", 0.0, 1.0)
    assert a == clip_id("echo/a.dcm", 0.0, 1.0)
    assert a != clip_id("echo/a.dcm", 1.0, 2.0)
    assert a != clip_id("echo/b.dcm", 0.0, 1.0)


def test_study_key_is_salted_and_hides_the_uid(monkeypatch):
    uid = "1.2.840.113619.2.55.3.1234"
    k1 = study_key(uid, salt="one")
    assert uid not in k1 and k1 == study_key(uid, salt="one")
    assert k1 != study_key(uid, salt="two")
    monkeypatch.setenv("ECHOPULSE_STUDY_SALT", "one")
    assert study_key(uid) == k1


def test_split_is_stable_and_roughly_proportional():
    keys = [study_key(str(i), salt="s") for i in range(2000)]
    splits = [split_for(k, val_fraction=0.2) for k in keys]
    assert splits == [split_for(k, val_fraction=0.2) for k in keys]
    assert 0.15 < splits.count("val") / len(splits) < 0.25


def test_clip_columns_follow_the_contract():
    for col in ("clip_id", "study_key", "split", "frames", "fps", "ecg", "ecg_leads", "r_peaks",
                "t_start_s", "t_end_s", "ef", "source_uri"):
        assert col in CLIP_COLUMNS
