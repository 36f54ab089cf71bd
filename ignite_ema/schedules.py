"""How fast the average forgets: momentum from a half-life, and warm-up rules.

``momentum`` is Ignite's: the weight of the new value,
``ema = (1 - momentum) * ema + momentum * student`` (``decay = 1 - momentum``).

A half-life ``H`` (in iterations) gives, for an update that comes ``delta``
iterations after the previous one, the momentum under which the student's
contribution halves every ``H`` iterations whatever the update period:

>>> round(momentum_from_half_life(half_life=100.0, delta=1), 6)
0.006908
>>> # two updates of period 1 forget exactly as much as one of period 2
>>> one = 1 - momentum_from_half_life(100.0, 1)
>>> two = 1 - momentum_from_half_life(100.0, 2)
>>> abs(one * one - two) < 1e-15
True

This is the exact form of the rule ``alpha = alpha_ref * n * k / m`` (batch
size ``n``, update period ``k``, schedule length ``m``) used to rescale an EMA
in pycls: ``1 - 0.5 ** (k / H)`` is close to ``k * ln 2 / H`` only while that
is small, and the linear rule overshoots (past 1, even) when it is not.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

from ignite_ema._checks import check_bool, check_count, check_fraction, check_real, warn_if_decay

__all__ = [
    "HalfLife",
    "MomentumSchedule",
    "linear_warmup",
    "momentum_from_half_life",
    "next_step",
    "power_warmup",
]

# One rule for every span argument (half_life, snapshot_every): a positive number, optional spaces,
# a unit in any case.
_HALF_LIFE = re.compile(r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>it|ep|dur)\s*$", re.IGNORECASE)


def next_step(step: object, last_step: int) -> int:
    """The step of an update: ``last_step + 1`` for ``None``, else ``step``, which must come after ``last_step``."""
    if step is None:
        return last_step + 1
    value = check_count("step", step, minimum=1)
    if value <= last_step:
        raise ValueError(
            f"step={value} does not come after the last update's step, {last_step}: steps must increase "
            "(load_state_dict() restores the count of a resumed run)"
        )
    return value


def momentum_from_half_life(half_life: float, delta: int) -> float:
    """``1 - 0.5 ** (delta / half_life)``, computed without cancellation for small momenta."""
    return -math.expm1(-math.log(2.0) * delta / half_life)


def linear_warmup(index: int, momentum_warmup: float, momentum: float, warmup_iters: int) -> float:
    """Ignite's linear warm-up: ``momentum_warmup`` at index 1, ``momentum`` from ``warmup_iters`` on.

    Same values as ``ignite.handlers.ema_handler.EMAWarmUp`` for the same index.

    >>> [linear_warmup(i, 0.0, 0.5, 5) for i in (1, 3, 5, 9)]
    [0.0, 0.25, 0.5, 0.5]
    """
    span = max(1, warmup_iters - 1)
    if index - 1 >= span:  # exactly the target once reached, not a rounded interpolation of it
        return momentum
    value = momentum_warmup + (momentum - momentum_warmup) * (index - 1) / span
    return min(momentum, value) if momentum >= momentum_warmup else max(momentum, value)


def power_warmup(momentum: float, num_updates: int, gamma: float, power: float) -> float:
    """``max(momentum, (1 + n / gamma) ** -power)`` at the ``n``-th averaging update.

    timm's ``ModelEmaV3`` and diffusers' ``EMAModel`` warm-up, written as a
    momentum. ``gamma = power = 1`` is the mean-teacher ramp of Tarvainen &
    Valpola (2017), ``max(momentum, 1 / (n + 1))``: until it reaches
    ``momentum`` the EMA is the plain average of the initial weights and the
    ``n`` students it has seen.

    >>> [power_warmup(0.1, n, 1.0, 1.0) for n in (1, 3, 20)]
    [0.5, 0.25, 0.1]
    """
    return max(momentum, math.pow(1.0 + num_updates / gamma, -power))


@dataclass(frozen=True)
class HalfLife:
    """A span of iterations (a half-life, say) given in iterations (``"it"``), epochs (``"ep"``) or fractions of the
    run (``"dur"``)."""

    value: float
    unit: str = "it"
    name: str = field(default="half_life", compare=False, repr=False)  # the argument's name, for messages

    @classmethod
    def parse(cls, spec: float | int | str, name: str = "half_life") -> HalfLife:
        """Read ``500``, ``"500it"``, ``"2ep"`` or ``"0.05dur"``; ``name`` is the argument's, for the messages.

        >>> HalfLife.parse("2ep")
        HalfLife(value=2.0, unit='ep')
        """
        if isinstance(spec, bool) or not isinstance(spec, (numbers.Real, str)):
            raise TypeError(
                f"{name} must be a number of iterations or a string like '500it', '2ep', "
                f"'0.05dur'; found {type(spec).__name__} {spec!r}"
            )
        if isinstance(spec, str):
            match = _HALF_LIFE.match(spec)
            if match is None:
                raise ValueError(
                    f"{name} must look like '500it', '2ep' or '0.05dur' (a positive number and a unit: "
                    f"it = iterations, ep = epochs, dur = fraction of the run); found {spec!r}"
                )
            value, unit = float(match["value"]), match["unit"].lower()
        else:
            value, unit = float(spec), "it"
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive and finite; found {spec!r}")
        if unit == "dur" and value > 1:
            raise ValueError(f"a {name} in 'dur' is a fraction of the run, at most 1; found {spec!r}")
        return cls(value, unit, name)

    def in_iterations(self, epoch_length: int | None, max_epochs: int | None) -> float:
        """The span in iterations, given the attached engine's run length."""
        if self.unit == "it":
            return self.value
        if epoch_length is None:
            raise ValueError(
                f"{self.name}={self.value:g}{self.unit} needs the engine's epoch_length, which is not known: "
                f"pass epoch_length to engine.run() or give {self.name} in iterations"
            )
        if self.unit == "ep":
            return self.value * epoch_length
        if max_epochs is None:
            raise ValueError(f"{self.name}={self.value:g}dur needs the engine's max_epochs, which is not known")
        return self.value * epoch_length * max_epochs


def _in_iterations(name: str, spec: float | str, run: tuple[int | None, int | None] | None) -> float:
    """``spec`` (``500``, ``"500it"``, ``"2ep"``, ``"0.05dur"``) in iterations; epochs and fractions need ``run``."""
    span = HalfLife.parse(spec, name=name)
    if span.unit == "it":
        return span.value
    if run is None:
        raise ValueError(
            f"{name}={spec!r} is in {'epochs' if span.unit == 'ep' else 'fractions of the run'}, which only an "
            "engine knows: give it in iterations here (a number, or '500it'), or use ignite_ema.EMAHandler, which "
            "resolves it when a run starts"
        )
    return span.in_iterations(*run)


@dataclass(frozen=True)
class MomentumSchedule:
    """The momentum of each update, from the counters that :class:`~ignite_ema.ModelEMA` keeps.

    The one place where the schedule's arguments are checked: each has its
    rule and its message here, for :class:`~ignite_ema.ModelEMA` and the
    handlers alike. :meth:`of` takes the spellings users write (``decay``, a
    half-life string, ``mean_teacher_warmup``).

    Args:
        momentum: per-update momentum in (0, 1) (used when ``half_life`` is ``None``).
        half_life: half-life in iterations, already resolved from its unit.
        momentum_warmup, warmup_iters: Ignite's linear warm-up, counted in
            iterations since averaging started.
        power_warmup: ``(gamma, power)`` of :func:`power_warmup`, counted in
            averaging updates; ``(1, 1)`` is the mean-teacher ramp.
        start_iteration: updates at iterations up to and including this one
            copy the student (momentum 1); averaging starts after it.

    Raises:
        ValueError, TypeError: a value of the wrong kind or out of its range,
            neither a momentum nor a half-life, or two warm-ups.
    """

    momentum: float | None = None
    half_life: float | None = None
    momentum_warmup: float | None = None
    warmup_iters: int | None = None
    power_warmup: tuple[float, float] | None = None
    start_iteration: int = 0
    #: The half-life as the user wrote it (``"0.05dur"``), for messages.
    half_life_spec: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.momentum is None) == (self.half_life is None):
            raise ValueError(
                f"a schedule needs exactly one of momentum and half_life; found momentum={self.momentum}, "
                f"half_life={self.half_life}"
            )
        if self.momentum is not None:
            check_fraction("momentum", self.momentum, low_open=True, high_open=True)
        if self.half_life is not None:
            half_life = check_real("half_life", self.half_life)
            if half_life <= 0:
                raise ValueError(f"half_life must be positive and finite; found {self.half_life}")
        if (self.momentum_warmup is None) != (self.warmup_iters is None):
            raise ValueError(
                "the linear warm-up needs both momentum_warmup and warmup_iters; found "
                f"momentum_warmup={self.momentum_warmup}, warmup_iters={self.warmup_iters}"
            )
        if self.momentum_warmup is not None:
            check_fraction("momentum_warmup", self.momentum_warmup, low_open=False, high_open=False)
            check_count("warmup_iters", self.warmup_iters, minimum=1)
        if self.power_warmup is not None:
            if self.momentum_warmup is not None:
                raise ValueError(
                    "choose one warm-up: the linear one (momentum_warmup) or power_warmup / mean_teacher_warmup"
                )
            if not isinstance(self.power_warmup, (tuple, list)) or len(self.power_warmup) != 2:
                raise TypeError(f"power_warmup must be a pair (gamma, power); found {self.power_warmup!r}")
            gamma, power = (
                check_real(f"power_warmup's {part}", value)
                for part, value in zip(("gamma", "power"), self.power_warmup, strict=True)
            )
            if gamma <= 0 or power <= 0:
                raise ValueError(f"power_warmup (gamma, power) must both be positive; found {tuple(self.power_warmup)}")
            object.__setattr__(self, "power_warmup", (gamma, power))  # a list, numpy numbers: a pair of floats
        check_count("start_iteration", self.start_iteration, minimum=0)

    @classmethod
    def of(
        cls,
        *,
        momentum: float | None = None,
        decay: float | None = None,
        half_life: float | str | None = None,
        momentum_warmup: float | None = None,
        warmup_iters: int | None = None,
        mean_teacher_warmup: bool = False,
        power_warmup: tuple[float, float] | None = None,
        start_iteration: int | str = 0,
        run: tuple[int | None, int | None] | None = None,
        warn: bool = True,
    ) -> MomentumSchedule | None:
        """The schedule the arguments users write describe; ``None`` when they give none.

        Args:
            momentum, decay, half_life: how fast the average forgets, at most
                one of them: Ignite's momentum, timm's and torch's
                ``decay = 1 - momentum``, or a half-life (``500``, ``"500it"``;
                ``"2ep"`` and ``"0.05dur"`` with ``run``). A momentum above 0.5,
                likely a decay, is warned about.
            momentum_warmup, warmup_iters, mean_teacher_warmup, power_warmup,
            start_iteration: the warm-ups and the start phase (see the class),
                which need one of the three above. ``start_iteration`` may be
                given like a half-life (``"2ep"``, ``"0.1dur"``: Composer's
                ``ema_start``), whole iterations counted down.
            run: ``(epoch_length, max_epochs)`` of the run, which resolves a
                half-life or a start in epochs or in fractions of the run.
            warn: warn about a momentum that looks like a decay (once per
                set of arguments: the handler resolves them again each run).
        """
        given = {k: v for k, v in (("momentum", momentum), ("decay", decay), ("half_life", half_life)) if v is not None}
        if len(given) > 1:
            shown = " and ".join(f"{k} ({v!r})" for k, v in given.items())
            raise ValueError(f"give one of momentum, decay and half_life, not {shown}: each sets how fast it forgets")
        if check_bool("mean_teacher_warmup", mean_teacher_warmup):
            if power_warmup is not None:
                raise ValueError(
                    "choose one warm-up: power_warmup or mean_teacher_warmup (which is power_warmup=(1, 1))"
                )
            power_warmup = (1.0, 1.0)
        if not given:
            extras = {
                "momentum_warmup": momentum_warmup,
                "warmup_iters": warmup_iters,
                "power_warmup": power_warmup,
                "start_iteration": start_iteration or None,
            }
            named = [k for k, v in extras.items() if v is not None]
            if named:
                raise ValueError(f"{', '.join(named)} needs a schedule to act on: give momentum=, decay= or half_life=")
            return None
        if decay is not None:
            momentum = 1.0 - check_fraction("decay", decay, low_open=True, high_open=True)
        elif momentum is not None:
            value = check_fraction("momentum", momentum, low_open=True, high_open=True)
            if value > 0.5 and warn:
                warn_if_decay(value)
        iterations = None if half_life is None else _in_iterations("half_life", half_life, run)
        if isinstance(start_iteration, str):
            # whole iterations; the epsilon keeps 0.1 of 1,000 iterations at 100, whichever way it rounds
            start_iteration = math.floor(_in_iterations("start_iteration", start_iteration, run) + 1e-9)
        return cls(
            momentum=momentum if iterations is None else None,
            half_life=iterations,
            momentum_warmup=momentum_warmup,
            warmup_iters=warmup_iters,
            power_warmup=power_warmup,
            start_iteration=start_iteration,
            half_life_spec=None if half_life is None else str(half_life),
        )

    def __call__(self, iteration: int, last_update_iteration: int, num_averaged: int) -> float:
        """Momentum for an update at ``iteration``.

        Args:
            iteration: the iteration of this update (1 for the first).
            last_update_iteration: iteration of the previous update, 0 if none.
            num_averaged: averaging (not copying) updates done before this one.
        """
        if iteration <= self.start_iteration:
            return 1.0
        if self.half_life is not None:
            base = momentum_from_half_life(self.half_life, iteration - last_update_iteration)
        else:
            assert self.momentum is not None  # checked at construction
            base = self.momentum
        if self.momentum_warmup is not None and self.warmup_iters is not None:
            base = linear_warmup(iteration - self.start_iteration, self.momentum_warmup, base, self.warmup_iters)
        if self.power_warmup is not None:
            base = power_warmup(base, num_averaged + 1, *self.power_warmup)
        return base
