"""Learning-rate schedules: the rate for update number `step` (0-based) of `max_steps`.

Both take the same arguments, so the training loop picks one by name from SCHEDULES.
"""


def constant(step: int, lr: float, max_steps: int) -> float:
    return lr


def linear(step: int, lr: float, max_steps: int) -> float:
    """Linear decay to 0, as transformers' get_linear_schedule_with_warmup with no warmup:
    lr at step 0, lr / max_steps at the last step (max_steps - 1), 0 from max_steps on."""
    return lr * max(0.0, (max_steps - step) / max(1, max_steps))


SCHEDULES = {"constant": constant, "linear": linear}
