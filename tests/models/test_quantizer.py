import pytest
import torch

from echopulse.models.quantizer import FSQ


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
