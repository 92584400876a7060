import math

import pytest
import torch

from echopulse.models.schedules import SCHEDULES, get_schedule


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
