"""Momentum rules: half-life, Ignite's linear warm-up, the power warm-up (mean-teacher ramp, timm), composed."""

from __future__ import annotations

import math

import pytest
from ignite.handlers.ema_handler import EMAWarmUp

from ignite_ema.schedules import (
    HalfLife,
    MomentumSchedule,
    linear_warmup,
    momentum_from_half_life,
    power_warmup,
)


@pytest.mark.parametrize(("half_life", "delta"), [(1.0, 1), (100.0, 1), (100.0, 7), (5000.0, 3), (0.5, 2)])
def test_half_life_momentum_is_the_closed_form(half_life: float, delta: int) -> None:
    assert momentum_from_half_life(half_life, delta) == pytest.approx(1 - 0.5 ** (delta / half_life), rel=1e-12)


def test_after_one_half_life_half_the_old_average_remains() -> None:
    # k updates of period H/k leave (1 - m)^k = 1/2 of the old average, for every k.
    for k in (1, 2, 5, 10):
        kept = (1 - momentum_from_half_life(10.0, 10 // k)) ** k
        assert kept == pytest.approx(0.5, rel=1e-12)


def test_small_momenta_keep_full_relative_precision() -> None:
    # 1 - 0.5 ** x loses digits to cancellation for tiny x; the expm1 form does not.
    half_life = 1e9
    expected = math.log(2) / half_life  # first-order term; the next one is 1e-18 smaller relatively
    assert momentum_from_half_life(half_life, 1) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("momentum_warmup", "momentum", "warmup_iters"),
    [(0.0, 0.5, 5), (1.0, 0.5, 5), (0.2, 0.002, 1), (0.1, 0.2, 4), (0.3, 0.3, 3)],
)
def test_linear_warmup_matches_ignites_rule(momentum_warmup: float, momentum: float, warmup_iters: int) -> None:
    reference = EMAWarmUp(momentum_warmup, warmup_iters, momentum)
    for index in range(1, 3 * warmup_iters + 2):
        assert linear_warmup(index, momentum_warmup, momentum, warmup_iters) == pytest.approx(reference(index))
    # exactly the target (not a rounded interpolation) once reached: Ignite reaches it at max(2, warmup_iters)
    assert linear_warmup(max(2, warmup_iters), momentum_warmup, momentum, warmup_iters) == momentum


def test_mean_teacher_ramp_is_the_power_warmup_with_gamma_and_power_one() -> None:
    ramp = [power_warmup(0.01, n, 1.0, 1.0) for n in (1, 2, 4, 99, 100, 1000)]
    assert ramp == pytest.approx([0.5, 1 / 3, 0.2, 0.01, 0.01, 0.01], rel=1e-15)


def _timm_get_decay(step: int, decay: float, gamma: float, power: float, update_after_step: int = 0) -> float:
    """timm 1.0.31 ``ModelEmaV3.get_decay(step)`` with ``use_warmup=True, min_decay=0``, transcribed."""
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    return max(min(1 - (1 + step / gamma) ** -power, decay), 0.0)


@pytest.mark.parametrize(("gamma", "power"), [(1.0, 2 / 3), (1.0, 3 / 4), (10.0, 1.0), (1.0, 1.0)])
def test_power_warmup_gives_timms_decays(gamma: float, power: float) -> None:
    # timm's step s copies at s = 1 (decay 0) and averages from s = 2 with t = s - 1; ours is the same sequence
    # with start_iteration=1 (the copy) and the n-th averaging update at iteration n + 1.
    decay = 0.999
    schedule = MomentumSchedule(momentum=1 - decay, power_warmup=(gamma, power), start_iteration=1)
    ours = [1 - schedule(step, step - 1, step - 2 if step > 1 else 0) for step in range(1, 3000)]
    theirs = [_timm_get_decay(step, decay, gamma, power) for step in range(1, 3000)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_power_warmup_literal_values() -> None:
    # (1 + n / 2) ** -0.5 for n = 2, 6, 30: 2 ** -0.5, 4 ** -0.5, 16 ** -0.5; below the target 0.3 the target holds
    assert [power_warmup(0.3, n, 2.0, 0.5) for n in (2, 6, 30)] == pytest.approx([0.7071067811865476, 0.5, 0.3])


def test_power_warmup_counts_averaging_updates_not_iterations() -> None:
    # every=3 after a start phase up to iteration 3: the update at iteration 12 is the 3rd averaging one (6, 9, 12),
    # or the 2nd if the one at 9 was skipped; 9 iterations since the start would give (1 + 9 / 2) ** -0.5 = 0.43.
    schedule = MomentumSchedule(momentum=0.01, power_warmup=(2.0, 0.5), start_iteration=3)
    assert schedule(iteration=12, last_update_iteration=9, num_averaged=2) == pytest.approx(2.5**-0.5, rel=1e-15)
    assert schedule(iteration=12, last_update_iteration=6, num_averaged=1) == pytest.approx(2.0**-0.5, rel=1e-15)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (500, HalfLife(500.0, "it")),
        (2.5, HalfLife(2.5, "it")),
        ("500it", HalfLife(500.0, "it")),
        ("2ep", HalfLife(2.0, "ep")),
        (" 0.05dur ", HalfLife(0.05, "dur")),
        ("1e3it", HalfLife(1000.0, "it")),
    ],
)
def test_half_life_parsing(spec: float | str, expected: HalfLife) -> None:
    assert HalfLife.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("500", ValueError, "must look like"),
        ("2 epochs", ValueError, "must look like"),
        ("-3it", ValueError, "must look"),
        (0, ValueError, "positive"),
        (-1.0, ValueError, "positive"),
        (float("inf"), ValueError, "positive"),
        ("1.5dur", ValueError, "at most 1"),
        (True, TypeError, "found bool"),
        ([1], TypeError, "found list"),
    ],
)
def test_half_life_rejects_malformed_input(spec: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        HalfLife.parse(spec)  # type: ignore[arg-type]


def test_half_life_units_resolve_against_the_run() -> None:
    assert HalfLife(2.0, "ep").in_iterations(epoch_length=50, max_epochs=10) == 100.0
    assert HalfLife(0.05, "dur").in_iterations(epoch_length=50, max_epochs=10) == pytest.approx(25.0)
    assert HalfLife(30.0, "it").in_iterations(epoch_length=None, max_epochs=None) == 30.0
    with pytest.raises(ValueError, match="epoch_length"):
        HalfLife(2.0, "ep").in_iterations(epoch_length=None, max_epochs=3)


def test_schedule_copies_until_start_then_warms_up_from_there() -> None:
    schedule = MomentumSchedule(momentum=0.5, momentum_warmup=0.0, warmup_iters=3, start_iteration=10)
    got = [schedule(it, it - 1, max(0, it - 11)) for it in range(9, 15)]
    # iterations 9, 10 copy; 11 is warm-up index 1, 12 index 2, 13 on the target
    assert got == [1.0, 1.0, 0.0, 0.25, 0.5, 0.5]


def test_schedule_half_life_counts_iterations_since_the_last_update() -> None:
    schedule = MomentumSchedule(half_life=10.0)
    assert schedule(iteration=12, last_update_iteration=8, num_averaged=3) == pytest.approx(1 - 0.5**0.4)


def test_schedule_ramp_never_goes_below_the_target() -> None:
    schedule = MomentumSchedule(momentum=0.3, power_warmup=(1.0, 1.0))
    assert [schedule(i, i - 1, i - 1) for i in (1, 2, 3, 4)] == pytest.approx([0.5, 1 / 3, 0.3, 0.3], rel=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of momentum and half_life"),
        ({"momentum": 0.1, "half_life": 5.0}, "exactly one of momentum and half_life"),
        ({"momentum": 1.5}, r"Invalid momentum: expected a value in \(0, 1\), found 1.5"),
        ({"momentum": -0.1}, "Invalid momentum"),
        ({"half_life": -2.0}, "half_life must be positive"),
        ({"momentum": 0.1, "momentum_warmup": 2.0, "warmup_iters": 3}, r"Invalid momentum_warmup: .* \[0, 1\]"),
        ({"momentum": 0.1, "momentum_warmup": 0.5}, "needs both"),
        ({"momentum": 0.1, "power_warmup": (0.0, 1.0)}, "must both be positive"),
        ({"momentum": 0.1, "power_warmup": (1.0, 1.0), "momentum_warmup": 0.5, "warmup_iters": 2}, "choose one"),
        ({"momentum": 0.1, "start_iteration": -1}, "start_iteration must be at least 0"),
    ],
)
def test_a_schedule_out_of_range_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MomentumSchedule(**kwargs)  # type: ignore[arg-type]
