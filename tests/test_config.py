from __future__ import annotations

import json

import pytest

from echopulse.config import ClipConfig, Recipe, from_dict, to_dict
from jobs.recipes import RECIPES, get_recipe, paper, tiny


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_round_trips_through_json(name):
    recipe = get_recipe(name)
    again = from_dict(Recipe, json.loads(json.dumps(to_dict(recipe))))
    assert again == recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parts_agree(name):
    r = get_recipe(name)
    assert r.clip.frames == r.tokenizer.frames and r.clip.size == r.tokenizer.image_size
    assert r.generator.token_grid == r.tokenizer.token_grid
    assert r.generator.vocab_size == r.tokenizer.codebook_size
    assert r.generator.ecg.samples == r.clip.ecg_samples
    assert r.generator.temporal_patch == r.tokenizer.temporal_patch


def test_paper_size_matches_the_paper():
    r = paper()
    assert (r.clip.frames, r.clip.size) == (11, 128)
    assert r.generator.seq_len == 1536
    assert (r.generator.dim, r.generator.depth, r.generator.heads) == (512, 6, 8)


def test_generator_and_tokenizer_must_share_the_temporal_patch():
    data = to_dict(get_recipe("demo"))
    data["generator"]["temporal_patch"] = 1
    with pytest.raises(ValueError, match="temporal_patch 1 differs from the tokenizer's 2"):
        from_dict(Recipe, data)
    # a recipe saved before the field existed (patch 2 on both sides) still loads
    old = to_dict(paper())
    del old["generator"]["temporal_patch"]
    assert from_dict(Recipe, old) == paper()


def test_clip_frames_must_be_odd():
    with pytest.raises(ValueError, match="1 \\+ 2k"):
        ClipConfig(frames=4)


def test_unknown_keys_are_refused():
    data = to_dict(tiny())
    data["generator"]["depthh"] = 3
    with pytest.raises(ValueError, match="depthh"):
        from_dict(Recipe, data)


def test_recipe_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(to_dict(tiny())))
    assert get_recipe(str(path)) == tiny()
    with pytest.raises(Exception, match="unknown recipe"):
        get_recipe("enormous")
