"""How the student's conv weights move, and how much their EMA shrinks: the mechanism behind the copy teacher's loss.

Averaging weights that rotate shrinks them. For weights of constant norm that
take a random-walk step of angle ``delta`` per iteration, an EMA of rate
``rate = 1 - decay`` keeps ``(1 + delta^2 / (2 rate))^(-1/2)`` of their norm
(Wan et al. 2021, "Spherical Motion Dynamics", for the equilibrium that weight
decay brings about). A teacher that borrows the student's BatchNorm
statistics normalises by the student's scale, so its activations come out
that much too small, layer after layer.

``ConvMotion`` measures, for each conv layer: the angle between consecutive
student weights (``angle_per_step``, radians, the RMS over the iterations
since the last snapshot), the angle between the weights now and ``horizon``
iterations ago divided by ``sqrt(horizon)`` (``angle_per_step_over_horizon``:
the per-step angle of a random walk that would travel as far in that time;
Adam's steps are correlated, so the two differ), the teacher/student norm
ratio, and what the formula predicts from either angle. The horizon is the
EMA's, ``1 / rate`` iterations, by default.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["ConvMotion", "predicted_norm_ratio"]


def predicted_norm_ratio(angle_per_step: float, rate: float) -> float:
    """``(1 + angle^2 / (2 rate))^(-1/2)``: the norm an EMA of rate ``rate`` keeps of a random walk on a sphere.

    >>> round(predicted_norm_ratio(0.0632, 0.002), 3)  # angle^2 = 0.004 = 2 rate: half the squared norm
    0.707
    """
    return 1.0 / math.sqrt(1.0 + angle_per_step**2 / (2.0 * rate))


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return math.acos(max(-1.0, min(1.0, float(cosine))))


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


class ConvMotion:
    """Angular motion of the student's conv weights and the norm ratio of their EMA, per conv layer.

    Args:
        student: the model being trained (unwrapped).
        teacher: its EMA, or ``None`` (no ratios then).
        rate: the EMA's rate, ``1 - decay`` (for the prediction).
        horizon: iterations over which ``angle_per_step_over_horizon`` is measured (default ``1 / rate``),
            a multiple of ``every``.
        every: iterations between the kept snapshots of the weights.
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, rate: float, horizon: int | None = None, every: int = 50
    ) -> None:
        self.student, self.teacher, self.rate, self.every = student, teacher, rate, every
        self.horizon = horizon or max(every, round(1 / rate / every) * every)
        self._previous = self._flat_student()
        self._snapshots: deque[list[torch.Tensor]] = deque([self._previous], maxlen=self.horizon // every + 1)
        self._squares = [0.0] * len(self._previous)
        self._horizon_squares = [0.0] * len(self._previous)
        self._steps = self._horizons = 0

    def _flat_student(self) -> list[torch.Tensor]:
        return [w.detach().flatten().clone() for w in _conv_weights(self.student)]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)

    def _step(self, engine: Engine) -> None:
        current = self._flat_student()
        for i, (now, before) in enumerate(zip(current, self._previous, strict=True)):
            self._squares[i] += _angle(now, before) ** 2
        self._steps += 1
        self._previous = current
        if engine.state.iteration % self.every == 0:
            self._snapshots.append(current)
            if len(self._snapshots) == self._snapshots.maxlen:  # the oldest is ``horizon`` iterations ago
                for i, (now, before) in enumerate(zip(current, self._snapshots[0], strict=True)):
                    self._horizon_squares[i] += _angle(now, before) ** 2 / self.horizon
                self._horizons += 1

    def snapshot(self) -> dict[str, list[float]]:
        """The measurements since the last snapshot (then starts again), one value per conv layer."""
        with torch.no_grad():
            student_norms = [float(torch.linalg.vector_norm(w)) for w in _conv_weights(self.student)]
            out: dict[str, list[float]] = {"student_norm": student_norms}
            per_step = [math.sqrt(s / max(self._steps, 1)) for s in self._squares]
            # empty until the run is ``horizon`` iterations long
            over_horizon = [math.sqrt(s / self._horizons) for s in self._horizon_squares] if self._horizons else []
            out["angle_per_step"] = per_step
            out["angle_per_step_over_horizon"] = over_horizon
            if self.teacher is not None:
                teacher_norms = [float(torch.linalg.vector_norm(w)) for w in _conv_weights(self.teacher)]
                out["norm_ratio"] = [t / s for t, s in zip(teacher_norms, student_norms, strict=True)]
                out["predicted_ratio"] = self._predict(per_step)
                out["predicted_ratio_over_horizon"] = self._predict(over_horizon)
        self._squares = [0.0] * len(self._squares)
        self._horizon_squares = [0.0] * len(self._horizon_squares)
        self._steps = self._horizons = 0
        return out

    def _predict(self, angles: Sequence[float]) -> list[float]:
        return [predicted_norm_ratio(a, self.rate) for a in angles]
