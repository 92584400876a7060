from pathlib import Path

import pytest
import torch

from echopulse.models.quantizer import FSQ, VectorQuantizerEMA


@pytest.mark.parametrize("levels", [(5, 5, 5), (8, 5, 5, 5), (2, 3)])
def test_fsq_round_trip(levels):
    fsq = FSQ(levels)
    z = torch.randn(2, 3, 4, 4, len(levels)) * 3
    z_q, indices = fsq(z)
    assert z_q.shape == z.shape and indices.shape == z.shape[:-1] and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < fsq.codebook_size
    assert torch.equal(fsq.indices_to_codes(indices), z_q)
    # every code decodes and re-encodes to itself: the grid has exactly prod(levels) codes
    all_ids = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(all_ids)
    assert torch.equal(fsq.codes_to_indices(codes), all_ids)
    assert codes.abs().max() <= 1.0
    assert len({tuple(c.tolist()) for c in codes}) == fsq.codebook_size


def test_fsq_reaches_every_level_and_passes_gradients():
    fsq = FSQ((8, 5))
    z = torch.linspace(-6, 6, 2001)[:, None].repeat(1, 2).requires_grad_()
    z_q, indices = fsq(z)
    assert z_q[:, 0].unique().numel() == 8 and z_q[:, 1].unique().numel() == 5
    z_q.sum().backward()
    assert z.grad is not None and bool((z.grad.abs() > 0).any())


def test_fsq_rejects_bad_inputs():
    fsq = FSQ((5, 5, 5))
    assert fsq.codebook_size == 125
    with pytest.raises(ValueError, match="last dim 3"):
        fsq(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[0, 125\)"):
        fsq.indices_to_codes(torch.tensor([125]))
    with pytest.raises(ValueError):
        FSQ((1, 5))


# ---- codebook statistics ------------------------------------------------------------------------

def test_codebook_stats():
    from echopulse.models.quantizer import codebook_stats

    assert codebook_stats(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx((0.5, 2.0))
    assert codebook_stats(torch.arange(8).repeat(3), 8) == pytest.approx((1.0, 8.0))
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 5) == pytest.approx((0.2, 1.0))
    usage, perplexity = codebook_stats(torch.tensor([[0, 0, 0, 1]]), 16)
    assert usage == pytest.approx(2 / 16) and 1.0 < perplexity < 2.0


# ---- VQ with EMA codebook -------------------------------------------------------------------------

def clustered(n: int, centers: torch.Tensor, generator: torch.Generator, spread: float = 0.05) -> torch.Tensor:
    """``n`` points around random rows of ``centers`` (k, d)."""
    pick = torch.randint(0, centers.shape[0], (n,), generator=generator)
    return centers[pick] + spread * torch.randn(n, centers.shape[1], generator=generator)


def test_vq_round_trip_and_bad_inputs():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(16, 4).eval()
    z = torch.randn(2, 3, 4, 4).requires_grad_()
    z_q, indices = vq(z)
    assert z_q.shape == z.shape and indices.shape == (2, 3, 4) and indices.dtype == torch.long
    assert torch.allclose(vq.indices_to_codes(indices), z_q.detach(), atol=1e-6)  # z + (code - z)
    # nearest code, checked by brute force
    dist = ((z.detach()[..., None, :] - vq.embed) ** 2).sum(-1)
    assert torch.equal(indices, dist.argmin(-1))
    z_q.sum().backward()  # straight-through: d z_q / d z = identity
    assert torch.equal(z.grad, torch.ones_like(z))
    assert not bool(vq.initialized)  # eval mode never touches the codebook
    with pytest.raises(ValueError, match="last dim 4"):
        vq(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        vq.indices_to_codes(torch.tensor([16]))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizerEMA(16, 4, decay=1.0)


def test_vq_ema_moves_codes_to_cluster_means():
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(1)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    vq = VectorQuantizerEMA(4, 2, decay=0.8, restart_after=3).train()
    for _ in range(60):
        vq(clustered(256, centers, rng))
    # every cluster owns exactly one code, sitting at its mean
    _, ids = vq.eval()(centers)
    assert sorted(ids.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(vq.embed[ids], centers, atol=0.05), vq.embed


def collapsed_vq(restart_after: int) -> VectorQuantizerEMA:
    """A VQ whose codebook has collapsed: one code near the data, the rest far away."""
    vq = VectorQuantizerEMA(32, 4, decay=0.9, restart_after=restart_after)
    with torch.no_grad():
        vq.embed.copy_(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) + 50.0)
        vq.embed[0].zero_()
        vq.ema_embed_sum.copy_(vq.embed)
        vq.initialized.fill_(True)
    return vq.train()


def test_vq_dead_code_restart_revives_codes():
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(2)
    centers = 3 * torch.randn(64, 4, generator=rng)
    usage = {}
    for restart_after in (0, 4):
        vq = collapsed_vq(restart_after)
        _, first = vq(clustered(512, centers, rng))
        assert first.unique().numel() == 1  # collapsed: every vector maps to code 0
        for _ in range(12):
            _, ids = vq(clustered(512, centers, rng))
        usage[restart_after] = ids.unique().numel() / 32
    assert usage[0] == 1 / 32  # without restarts the dead codes stay dead
    assert usage[4] > 0.75, usage  # restarted from encoder outputs, they are used again


def _ddp_worker(rank: int, world: int, init_file: str, data: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different local RNG: restarts must still agree
        shard = data.chunk(world)[rank]
        for restart_after in (0, 2):
            vq = collapsed_vq(restart_after)
            for step in range(4):
                vq(shard[step])
            state = {k: v.clone() for k, v in vq.state_dict().items()}
            torch.save(state, f"{out_dir}/rank{rank}_restart{restart_after}.pt")
    finally:
        dist.destroy_process_group()


def test_vq_statistics_are_all_reduced_under_ddp(tmp_path, monkeypatch):
    """Two gloo ranks, each with half of every batch, end with the codebook one process gets from
    the whole batch; restarted codes agree across ranks although each rank's RNG differs."""
    import torch.multiprocessing as mp

    # spawned workers import this module by its package name: they need the repository root on sys.path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    rng = torch.Generator().manual_seed(3)
    centers = 3 * torch.randn(16, 4, generator=rng)
    data = torch.stack([clustered(64, centers, rng) for _ in range(4)])  # (step, n, d)
    halves = torch.cat([data[:, :32], data[:, 32:]])  # rank r gets [r * 4:(r + 1) * 4]: its half of each step
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), halves, str(tmp_path)), nprocs=2, join=True)
    for restart_after in (0, 2):
        rank0 = torch.load(tmp_path / f"rank0_restart{restart_after}.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"rank1_restart{restart_after}.pt", weights_only=True)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), (restart_after, key)
    assert int((rank0["embed"].abs() < 20).sum()) > 4  # dead codes were restarted near the data
    # without restarts the all-reduced statistics equal a single process's on the full batches
    single = collapsed_vq(restart_after=0)
    for step in range(4):
        single(data[step])
    no_restart = torch.load(tmp_path / "rank0_restart0.pt", weights_only=True)
    for key, value in single.state_dict().items():
        assert torch.allclose(no_restart[key].float(), value.float(), atol=1e-5), key
