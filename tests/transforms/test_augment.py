import pytest
import torch

from echopulse.transforms.augment import ClipAugment, augment_clips
from jobs.train_common import augmented_batches

NONE = ClipAugment(flip=0.0, reverse=0.0, zoom=(1.0, 1.0), rotate_deg=0.0, shift=0.0, blur=0.0,
                   gain=(1.0, 1.0), gamma=(1.0, 1.0))


def clips(b: int = 4, t: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, size, size), generator=g, dtype=torch.uint8)


def test_no_ranges_leave_the_clips_as_they_are():
    x = clips()
    assert torch.equal(augment_clips(x, torch.Generator().manual_seed(0), NONE), x)


def test_mirror_and_reverse_are_exact():
    from dataclasses import replace

    x = clips()
    assert torch.equal(augment_clips(x, torch.Generator(), replace(NONE, flip=1.0)), x.flip(-1))
    assert torch.equal(augment_clips(x, torch.Generator(), replace(NONE, reverse=1.0)), x.flip(1))


def test_one_draw_per_clip_and_a_seed_repeats_it():
    """Every frame of a clip gets the same zoom/turn/shift/blur/gain: a clip of one repeated frame
    stays one repeated frame; clips differ from each other; the same seed gives the same clips."""
    still = clips(b=6, t=1).expand(-1, 5, -1, -1).contiguous()
    out = augment_clips(still, torch.Generator().manual_seed(3))
    assert out.shape == still.shape and out.dtype == torch.uint8
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert not torch.equal(out, still)
    assert torch.equal(out, augment_clips(still, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment_clips(still, torch.Generator().manual_seed(4)))


def test_gain_and_blur_change_brightness_and_sharpness_as_named():
    from dataclasses import replace

    x = clips(b=2, size=64)
    dark = augment_clips(x, torch.Generator(), replace(NONE, gain=(0.5, 0.5)))
    assert float(dark.float().mean()) == pytest.approx(0.5 * float(x.float().mean()), rel=0.02)
    soft = augment_clips(x, torch.Generator(), replace(NONE, blur=1.0, blur_px=(1.5, 1.5)))
    sharpness = lambda v: v.float().diff(dim=-1).abs().mean()  # noqa: E731
    assert sharpness(soft) < 0.3 * sharpness(x)


def test_training_batches_get_augmented_frames_and_keep_other_columns():
    batch = {"frames": clips(), "study": torch.arange(4)}
    out = next(augmented_batches(iter([batch]), seed=0))
    assert torch.equal(out["study"], batch["study"]) and out["frames"].shape == batch["frames"].shape
    assert not torch.equal(out["frames"], batch["frames"])
    with pytest.raises(ValueError, match="uint8"):
        augment_clips(batch["frames"].float(), torch.Generator())


def test_bright_curves_stay_inside_the_picture_thin_and_swaying():
    """A disc on black with a bright rim: curves about as bright as the rim brighten pixels inside
    the disc, never the black around it, cover a small share of it (thin lines, not a fill), and
    move from frame to frame."""
    from dataclasses import replace

    size, t = 64, 6
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2) < 26 ** 2
    rim = disc & (((yy - 32) ** 2 + (xx - 32) ** 2) > 24 ** 2)
    x = (disc * 40 + rim * 100).to(torch.uint8).expand(3, t, -1, -1).contiguous()
    out = augment_clips(x, torch.Generator().manual_seed(1), replace(NONE, lines=1.0))
    assert torch.equal(out[..., ~disc], x[..., ~disc])  # the background stays black
    brighter = out.int() > x.int() + 40
    share = brighter[..., disc].float().mean()
    assert 0.01 < float(share) < 0.35, float(share)
    assert brighter.any(dim=(1, 2, 3)).all()  # every clip got curves
    assert not torch.equal(out[:, 0], out[:, t // 2])  # they sway
    assert torch.equal(augment_clips(x, torch.Generator().manual_seed(1), replace(NONE, lines=0.0)), x)
