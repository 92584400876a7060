import pytest
import torch

from echopulse.config import ECGEncoderConfig
from echopulse.models.ecg_encoder import ECGEncoder, load_stmem_checkpoint


def test_ecg_encoder_emits_per_patch_tokens():
    cfg = ECGEncoderConfig()
    encoder = ECGEncoder(cfg)
    tokens = encoder(torch.randn(2, 12, cfg.samples))
    assert tokens.shape == (2, 12 * cfg.samples // cfg.patch, cfg.dim)
    assert encoder.num_tokens == tokens.shape[1]


def test_ecg_encoder_tokens_depend_on_lead_and_time():
    torch.manual_seed(0)
    cfg = ECGEncoderConfig()
    encoder = ECGEncoder(cfg).eval()
    ecg = torch.randn(1, 12, cfg.samples)
    ecg_later = ecg.clone()
    ecg_later[:, 3, -cfg.patch:] += 1.0  # change only the last patch of one lead
    a, b = encoder(ecg), encoder(ecg_later)
    assert not torch.allclose(a, b)
    # identical inputs on all leads still give lead-specific tokens (lead embedding)
    same = encoder(torch.ones(1, 12, cfg.samples))
    assert not torch.allclose(same[0, 0], same[0, cfg.samples // cfg.patch])


def test_ecg_encoder_wrong_length_names_both():
    encoder = ECGEncoder(ECGEncoderConfig())
    with pytest.raises(ValueError, match="300") as info:
        encoder(torch.randn(2, 12, 250))
    assert "250" in str(info.value)
    with pytest.raises(ValueError, match="12"):
        encoder(torch.randn(2, 8, 300))


def test_ecg_encoder_rejects_patch_not_dividing_samples():
    with pytest.raises(ValueError, match="divisible"):
        ECGEncoder(ECGEncoderConfig(samples=310, patch=75))


# ---- ST-MEM checkpoints ------------------------------------------------------------------------------

def stmem_state_dict(cfg: ECGEncoderConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the layout of an ST-MEM encoder checkpoint for ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    d, n = cfg.dim, cfg.samples // cfg.patch

    def rand(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    state = {
        "to_patch_embedding.1.weight": 1 + rand(cfg.patch), "to_patch_embedding.1.bias": rand(cfg.patch),
        "to_patch_embedding.2.weight": rand(d, cfg.patch), "to_patch_embedding.2.bias": rand(d),
        "to_patch_embedding.3.weight": 1 + rand(d), "to_patch_embedding.3.bias": rand(d),
        "pos_embedding": rand(1, n + 2, d), "sep_embedding": rand(d),
        "norm.weight": 1 + rand(d), "norm.bias": rand(d),
    }
    state.update({f"lead_embeddings.{i}": rand(d) for i in range(cfg.leads)})
    for i in range(cfg.depth):
        state.update({
            f"block{i}.attn.norm.weight": 1 + rand(d), f"block{i}.attn.norm.bias": rand(d),
            f"block{i}.attn.fn.to_qkv.weight": rand(3 * d, d), f"block{i}.attn.fn.to_qkv.bias": rand(3 * d),
            f"block{i}.attn.fn.to_out.0.weight": rand(d, d), f"block{i}.attn.fn.to_out.0.bias": rand(d),
            f"block{i}.ff.norm.weight": 1 + rand(d), f"block{i}.ff.norm.bias": rand(d),
            f"block{i}.ff.fn.net.0.weight": rand(4 * d, d), f"block{i}.ff.fn.net.0.bias": rand(4 * d),
            f"block{i}.ff.fn.net.3.weight": rand(d, 4 * d), f"block{i}.ff.fn.net.3.bias": rand(d),
        })
    return state


def stmem_reference_tokens(state: dict[str, torch.Tensor], ecg: torch.Tensor, cfg: ECGEncoderConfig) -> torch.Tensor:
    """The ST-MEM encoder's forward written out with plain tensor ops on its own parameter names,
    stopping before its pooling: per-patch tokens (SEP dropped) after the final norm."""
    import torch.nn.functional as F

    b, leads, n, d = ecg.shape[0], cfg.leads, cfg.samples // cfg.patch, cfg.dim

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    def lin(x, name):
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    x = ecg.reshape(b, leads, n, cfg.patch)
    x = ln(lin(ln(x, "to_patch_embedding.1"), "to_patch_embedding.2"), "to_patch_embedding.3")
    pos = state["pos_embedding"][0]  # (n + 2, d)
    sep = state["sep_embedding"]
    x = torch.cat([(sep + pos[0]).expand(b, leads, 1, d), x + pos[1:n + 1], (sep + pos[n + 1]).expand(b, leads, 1, d)], 2)
    x = x + torch.stack([state[f"lead_embeddings.{i}"] for i in range(leads)])[None, :, None]
    x = x.reshape(b, leads * (n + 2), d)
    h = cfg.heads
    for i in range(cfg.depth):
        qkv = lin(ln(x, f"block{i}.attn.norm"), f"block{i}.attn.fn.to_qkv")
        q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1) @ v
        x = x + lin(attn.transpose(1, 2).reshape(b, -1, d), f"block{i}.attn.fn.to_out.0")
        hidden = F.gelu(lin(ln(x, f"block{i}.ff.norm"), f"block{i}.ff.fn.net.0"))
        x = x + lin(hidden, f"block{i}.ff.fn.net.3")
    x = x.reshape(b, leads, n + 2, d)[:, :, 1:-1].reshape(b, leads * n, d)
    return ln(x, "norm")


def test_load_stmem_checkpoint_reproduces_stmem(tmp_path):
    torch.manual_seed(0)
    cfg = ECGEncoderConfig()
    encoder = ECGEncoder(cfg).eval()
    ecg = torch.randn(2, cfg.leads, cfg.samples)
    before = encoder(ecg)
    state = stmem_state_dict(cfg)
    state["head.weight"], state["head.bias"] = torch.zeros(5, cfg.dim), torch.zeros(5)  # a classifier: ignored
    torch.save({"model": state, "epoch": 3}, tmp_path / "encoder.pth")
    assert load_stmem_checkpoint(tmp_path / "encoder.pth", encoder) is encoder
    after = encoder(ecg)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, stmem_reference_tokens(state, ecg, cfg), atol=1e-5)
    assert torch.equal(encoder.blocks[1].qkv.weight, state["block1.attn.fn.to_qkv.weight"])
    assert all(p.requires_grad for p in encoder.parameters())
    # a bare state dict with DDP's "module." prefix loads too, and can freeze the encoder
    other = stmem_state_dict(cfg, seed=1)
    torch.save({f"module.{k}": v for k, v in other.items()}, tmp_path / "bare.pth")
    load_stmem_checkpoint(tmp_path / "bare.pth", encoder, freeze=True)
    assert torch.allclose(encoder(ecg), stmem_reference_tokens(other, ecg, cfg), atol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_load_stmem_checkpoint_refuses_mismatches(tmp_path):
    cfg = ECGEncoderConfig()
    encoder = ECGEncoder(cfg)
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    wide = stmem_state_dict(ECGEncoderConfig(dim=32, heads=4))
    torch.save({"model": wide}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"expected shape \(.*64.*\), given \(.*32.*\)") as info:
        load_stmem_checkpoint(tmp_path / "wide.pth", encoder)
    assert "to_patch_embedding" in str(info.value) or "embedding" in str(info.value)
    deep = stmem_state_dict(ECGEncoderConfig(depth=3))
    torch.save(deep, tmp_path / "deep.pth")
    with pytest.raises(ValueError, match="block2"):
        load_stmem_checkpoint(tmp_path / "deep.pth", encoder)
    shallow = stmem_state_dict(ECGEncoderConfig(depth=1))
    torch.save(shallow, tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"blocks\.1"):
        load_stmem_checkpoint(tmp_path / "shallow.pth", encoder)
    longer = stmem_state_dict(ECGEncoderConfig(samples=2250))
    torch.save(longer, tmp_path / "long.pth")
    with pytest.raises(ValueError, match=r"pos_embedding.*\(6, 64\).*\(32, 64\)"):
        load_stmem_checkpoint(tmp_path / "long.pth", encoder)
    odd = {**stmem_state_dict(cfg), "decoder.weight": torch.zeros(3)}
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="decoder.weight"):
        load_stmem_checkpoint(tmp_path / "odd.pth", encoder)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_stmem_checkpoint(tmp_path / "junk.pth", encoder)
    for key, value in encoder.state_dict().items():  # nothing was half-loaded
        assert torch.equal(value, original[key]), key


def test_freeze_from_config_reaches_the_generator():
    from echopulse.config import GeneratorConfig
    from echopulse.models.generator import MaskGIT
    from echopulse.training.steps import make_optimizer

    model = MaskGIT(GeneratorConfig(ecg=ECGEncoderConfig(freeze=True)))
    assert not any(p.requires_grad for p in model.ecg_encoder.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("ecg_encoder."))
    optimized = {id(p) for group in make_optimizer(model, lr=1e-3).param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.ecg_encoder.parameters()}


def test_paper_recipe_takes_the_released_stmem_vit_b75():
    """ST-MEM's released encoder is ``st_mem_vit_base``: width 768, depth 12, 12 heads of 64, MLP
    3072, 2250 samples in patches of 75, 12 leads, qkv with bias. Its key names and shapes, written
    out here from that definition (meta tensors: no memory), load into the paper recipe's encoder."""
    from echopulse.models.ecg_encoder import load_stmem_state
    from jobs.recipes import paper

    width, mlp, leads, patch, n = 768, 3072, 12, 75, 2250 // 75
    with torch.device("meta"):
        state = {
            "to_patch_embedding.1.weight": torch.empty(patch), "to_patch_embedding.1.bias": torch.empty(patch),
            "to_patch_embedding.2.weight": torch.empty(width, patch),
            "to_patch_embedding.2.bias": torch.empty(width),
            "to_patch_embedding.3.weight": torch.empty(width), "to_patch_embedding.3.bias": torch.empty(width),
            "pos_embedding": torch.empty(1, n + 2, width), "sep_embedding": torch.empty(width),
            "norm.weight": torch.empty(width), "norm.bias": torch.empty(width),
            **{f"lead_embeddings.{i}": torch.empty(width) for i in range(leads)},
        }
        for i in range(12):
            state.update({
                f"block{i}.attn.norm.weight": torch.empty(width), f"block{i}.attn.norm.bias": torch.empty(width),
                f"block{i}.attn.fn.to_qkv.weight": torch.empty(3 * 12 * 64, width),
                f"block{i}.attn.fn.to_qkv.bias": torch.empty(3 * 12 * 64),
                f"block{i}.attn.fn.to_out.0.weight": torch.empty(width, 12 * 64),
                f"block{i}.attn.fn.to_out.0.bias": torch.empty(width),
                f"block{i}.ff.norm.weight": torch.empty(width), f"block{i}.ff.norm.bias": torch.empty(width),
                f"block{i}.ff.fn.net.0.weight": torch.empty(mlp, width), f"block{i}.ff.fn.net.0.bias": torch.empty(mlp),
                f"block{i}.ff.fn.net.3.weight": torch.empty(width, mlp), f"block{i}.ff.fn.net.3.bias": torch.empty(width),
            })
        state["head.weight"] = torch.empty(5, width)  # a fine-tuned classifier head is ignored
        encoder = ECGEncoder(paper().generator.ecg)
    load_stmem_state(state, encoder)  # every key placed, every shape equal
    assert encoder.lead_embed.shape == (12, 768) and len(encoder.blocks) == 12
    assert encoder.blocks[0].heads == 12
    # a ViT-S checkpoint is refused by name and shape
    small = {k: v for k, v in state.items() if k != "head.weight"}
    small["block0.attn.fn.to_qkv.weight"] = torch.empty(3 * 384, 384, device="meta")
    with pytest.raises(ValueError, match="to_qkv"):
        load_stmem_state(small, encoder)
