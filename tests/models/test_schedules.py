import math

import pytest
import torch

from echopulse.models.schedules import SCHEDULES, get_schedule, truncated_schedule


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_endpoints_and_monotone(name):
    schedule = get_schedule(name)
    assert schedule(0.0) == 1.0
    assert schedule(1.0) == 0.0
    r = torch.linspace(0, 1, 1001)
    values = schedule(r)
    assert values.shape == r.shape
    assert bool((values[1:] <= values[:-1] + 1e-7).all()), f"{name} is not non-increasing"
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0


def test_known_values():
    assert get_schedule("cosine")(0.5) == pytest.approx(math.cos(math.pi / 4))
    assert get_schedule("linear")(0.25) == pytest.approx(0.75)
    assert get_schedule("square")(0.5) == pytest.approx(0.75)
    assert get_schedule("cubic")(0.5) == pytest.approx(0.875)
    assert get_schedule("sqrt")(0.25) == pytest.approx(0.5)
    assert isinstance(get_schedule("cosine")(0.3), float)


def test_unknown_schedule_names_known_ones():
    with pytest.raises(ValueError, match="cosine") as info:
        get_schedule("nope")
    assert "nope" in str(info.value)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_truncated_forms(name):
    schedule = truncated_schedule(name, low=0.1, high=0.9)
    assert schedule(0.0) == pytest.approx(0.9) and schedule(1.0) == pytest.approx(0.1)
    r = torch.linspace(0, 1, 501)
    values = schedule(r)
    assert bool((values[1:] <= values[:-1] + 1e-7).all())
    assert float(values.min()) >= 0.1 - 1e-7 and float(values.max()) <= 0.9 + 1e-7
    # the same shape as the base schedule, rescaled
    assert torch.allclose((values - 0.1) / 0.8, get_schedule(name)(r), atol=1e-6)


def test_truncated_bad_arguments():
    with pytest.raises(ValueError, match="low < high"):
        truncated_schedule("cosine", low=0.5, high=0.5)
    with pytest.raises(ValueError, match="known: .*cosine"):
        truncated_schedule("nope")


def test_required_schedules_exist():
    assert {"cosine", "linear", "square", "cubic", "sqrt", "arccos"} <= set(SCHEDULES)
    # the sampler's view: after each of S steps the masked fraction shrinks, ending at 0
    for name in SCHEDULES:
        steps = [get_schedule(name)((s + 1) / 8) for s in range(8)]
        assert steps[-1] == 0.0 and all(a >= b for a, b in zip(steps, steps[1:])), name
