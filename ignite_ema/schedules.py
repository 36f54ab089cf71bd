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

__all__ = [
    "HalfLife",
    "MomentumSchedule",
    "linear_warmup",
    "momentum_from_half_life",
    "power_warmup",
]

# One rule for every span argument (half_life, snapshot_every): a positive number, optional spaces,
# a unit in any case.
_HALF_LIFE = re.compile(r"^\s*(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>it|ep|dur)\s*$", re.IGNORECASE)


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


@dataclass(frozen=True)
class MomentumSchedule:
    """The momentum of each update, from the counters that the handler keeps.

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
        ValueError: a value out of its range, neither a momentum nor a
            half-life, or two warm-ups.
    """

    momentum: float | None = None
    half_life: float | None = None
    momentum_warmup: float | None = None
    warmup_iters: int | None = None
    power_warmup: tuple[float, float] | None = None
    start_iteration: int = 0

    def __post_init__(self) -> None:
        if (self.momentum is None) == (self.half_life is None):
            raise ValueError(
                f"a schedule needs exactly one of momentum and half_life; found momentum={self.momentum}, "
                f"half_life={self.half_life}"
            )
        if self.momentum is not None and not 0.0 < self.momentum < 1.0:
            raise ValueError(f"momentum must lie in (0, 1); found {self.momentum}")
        if self.half_life is not None and not (math.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life must be positive and finite; found {self.half_life}")
        if (self.momentum_warmup is None) != (self.warmup_iters is None):
            raise ValueError("the linear warm-up needs both momentum_warmup and warmup_iters")
        if self.momentum_warmup is not None and not 0.0 <= self.momentum_warmup <= 1.0:
            raise ValueError(f"momentum_warmup must lie in [0, 1]; found {self.momentum_warmup}")
        if self.warmup_iters is not None and self.warmup_iters < 1:
            raise ValueError(f"warmup_iters must be at least 1; found {self.warmup_iters}")
        if self.power_warmup is not None:
            if self.momentum_warmup is not None:
                raise ValueError("choose one warm-up: power_warmup or the linear one (momentum_warmup)")
            if not all(math.isfinite(v) and v > 0 for v in self.power_warmup):
                raise ValueError(f"power_warmup (gamma, power) must both be positive; found {self.power_warmup}")
        if self.start_iteration < 0:
            raise ValueError(f"start_iteration must be at least 0; found {self.start_iteration}")

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
