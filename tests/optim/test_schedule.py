import pytest

from zotune.optim.schedule import SCHEDULES, constant, linear


def test_constant():
    assert [constant(s, 1e-6, 10) for s in (0, 5, 9, 10)] == [1e-6] * 4


def test_linear_decays_to_zero_like_transformers():
    # get_linear_schedule_with_warmup(opt, 0, 4): factors 1, 3/4, 1/2, 1/4, then 0.
    assert [linear(s, 2.0, 4) for s in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_share_a_signature(name):
    assert SCHEDULES[name](0, 0.5, 100) == 0.5
