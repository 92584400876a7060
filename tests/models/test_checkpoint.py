import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from echopulse.config import ECGEncoderConfig, GeneratorConfig, TokenizerConfig, replace
from echopulse.models.checkpoint import load_checkpoint, save_checkpoint
from echopulse.models.generator import MaskGIT
from echopulse.models.tokenizer import VideoTokenizer


@pytest.mark.parametrize("frame_local", [False, True])
def test_tokenizer_round_trip(tmp_path, frame_local):
    torch.manual_seed(0)
    cfg = replace(TokenizerConfig(), fsq_levels=(8, 5, 5))
    if frame_local:  # no first-frame embedding, no temporal encoder weights
        cfg = replace(cfg, temporal_patch=1, frame_local_encoder=True)
    model = VideoTokenizer(cfg).eval()
    model_id = save_checkpoint(model, cfg, tmp_path / "tok", "tokenizer", extra={"step": 7})
    assert len(model_id) == 16
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["format_version"] == 1 and meta["model_id"] == model_id

    loaded, loaded_cfg, info = load_checkpoint(tmp_path / "tok", expected_kind="tokenizer")
    assert loaded_cfg == cfg and info["model_id"] == model_id and info["extra"] == {"step": 7}
    video = torch.rand(2, cfg.frames, cfg.image_size, cfg.image_size)
    assert torch.equal(loaded.encode(video), model.encode(video))
    with torch.no_grad():
        assert torch.equal(loaded(video)[0], model(video)[0])
    # same weights -> same id, every time (the file bytes must be deterministic)
    for i in range(4):
        assert save_checkpoint(loaded, loaded_cfg, tmp_path / f"again{i}", "tokenizer") == model_id


def test_tokenizer_saved_before_patch_input_loads_normed(tmp_path):
    """Tokenizers saved before ``patch_input`` existed normalised their patches and did not write
    the field: such a checkpoint loads as built (with the norm), not as today's default."""
    torch.manual_seed(0)
    cfg = replace(TokenizerConfig(), patch_input="normed")
    model = VideoTokenizer(cfg).eval()
    save_checkpoint(model, cfg, tmp_path / "old", "tokenizer")
    meta_path = tmp_path / "old" / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["patch_input"]  # what an older version wrote
    meta_path.write_text(json.dumps(meta))

    loaded, loaded_cfg, _ = load_checkpoint(tmp_path / "old", expected_kind="tokenizer")
    assert loaded_cfg.patch_input == "normed" != TokenizerConfig().patch_input
    video = torch.rand(2, cfg.frames, cfg.image_size, cfg.image_size)
    assert torch.equal(loaded.encode(video), model.encode(video))


def test_generator_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = GeneratorConfig()
    model = MaskGIT(cfg).eval()
    save_checkpoint(model, cfg, tmp_path / "gen", "generator")
    loaded, loaded_cfg, _ = load_checkpoint(str(tmp_path / "gen"))
    assert isinstance(loaded, MaskGIT) and loaded_cfg == cfg
    ecg = torch.randn(2, 12, cfg.ecg.samples)
    assert torch.equal(loaded.generate(ecg, seed=5), model.generate(ecg, seed=5))


def test_wrong_kind_refused(tmp_path):
    cfg = TokenizerConfig()
    save_checkpoint(VideoTokenizer(cfg), cfg, tmp_path, "tokenizer")
    with pytest.raises(ValueError, match="checkpoint is a tokenizer, expected a generator"):
        load_checkpoint(tmp_path, expected_kind="generator")
    with pytest.raises(ValueError, match="MaskGIT"):
        save_checkpoint(VideoTokenizer(cfg), cfg, tmp_path / "x", "generator")


def test_missing_files_refused(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    cfg = TokenizerConfig()
    save_checkpoint(VideoTokenizer(cfg), cfg, tmp_path, "tokenizer")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path)


def test_weights_not_matching_config_refused(tmp_path):
    small = GeneratorConfig()
    big = replace(small, dim=128, ecg=ECGEncoderConfig())
    save_checkpoint(MaskGIT(big), big, tmp_path, "generator")
    # swap in the config of a smaller model: the weights no longer fit
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tensor .*: expected \(.*64.*\), checkpoint has \(.*128.*\)"):
        load_checkpoint(tmp_path, verify=False)


def test_corrupted_or_edited_weights_refused(tmp_path):
    cfg = TokenizerConfig()
    save_checkpoint(VideoTokenizer(cfg), cfg, tmp_path, "tokenizer")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("to_code.bias")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match model_id"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="missing tensors.*to_code.bias"):
        load_checkpoint(tmp_path, verify=False)


def test_vq_codebook_state_is_saved(tmp_path):
    """The EMA statistics and the restart counters live in buffers, so they are in the safetensors."""
    torch.manual_seed(0)
    cfg = TokenizerConfig(quantizer="vq", vq_codebook_size=32, vq_dim=4)
    model = VideoTokenizer(cfg).train()
    video = torch.rand(2, cfg.frames, cfg.image_size, cfg.image_size)
    for _ in range(3):
        model(video)  # EMA updates change the buffers
    save_checkpoint(model, cfg, tmp_path, "tokenizer")
    stored = load_file(str(tmp_path / "model.safetensors"))
    for name in ("embed", "ema_cluster_size", "ema_embed_sum", "unused_steps", "initialized"):
        assert torch.equal(stored[f"quantizer.{name}"], getattr(model.quantizer, name)), name
    assert bool(stored["quantizer.initialized"])
    loaded, loaded_cfg, _ = load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    assert torch.equal(loaded.encode(video), model.eval().encode(video))


def test_checkpoint_of_another_size_refused(tmp_path):
    """A tiny-config checkpoint whose weights come from a larger model (or another quantizer) is refused
    with the tensors that differ."""
    small = TokenizerConfig()
    big = replace(small, dim=96)
    save_checkpoint(VideoTokenizer(big), big, tmp_path / "big", "tokenizer")
    meta = json.loads((tmp_path / "big" / "config.json").read_text())
    meta["config"]["dim"] = small.dim
    (tmp_path / "big" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tokenizer weights do not match its config: .*expected \(.*64.*\), "
                                         r"checkpoint has \(.*96.*\)"):
        load_checkpoint(tmp_path / "big", verify=False)
    save_checkpoint(VideoTokenizer(small), small, tmp_path / "fsq", "tokenizer")
    meta = json.loads((tmp_path / "fsq" / "config.json").read_text())
    meta["config"]["quantizer"] = "vq"
    (tmp_path / "fsq" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing tensors .*quantizer\.e"):
        load_checkpoint(tmp_path / "fsq", verify=False)
