"""The framework-free core: shadow tensors and one multi-tensor update.

Nothing here knows about Ignite. :class:`ShadowAverager` pairs each averaged
tensor of the student with a *shadow* that holds the running average, and
applies ``shadow = (1 - m) * shadow + m * student`` with one multi-tensor call
per group of tensors that share a device and dtypes. It can drive an EMA from a
plain training loop:

>>> import torch
>>> student = torch.nn.Linear(2, 1)
>>> ema = torch.nn.Linear(2, 1).requires_grad_(False)
>>> averager = ShadowAverager(list(ema.parameters()), list(student.parameters()))
>>> averager.copy()                      # start from the student
>>> with torch.no_grad():
...     _ = student.weight.add_(1.0)
>>> averager.update(0.25)
>>> torch.allclose(ema.weight, student.weight - 0.75)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ShadowAverager", "shadow_dtype_for"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def shadow_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype the running average of a ``dtype`` tensor is kept in by default.

    A bf16 or fp16 average cannot absorb steps far below its resolution (bf16
    has 8 significant bits, so ``ema * (1 - 2e-4)`` rounds back to ``ema``),
    so those are averaged in float32; every other dtype is kept as it is.
    """
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class _Group:
    """Tensors that one multi-tensor call can update together."""

    def __init__(self, shadows: list[Tensor], students: list[Tensor]) -> None:
        self.shadows = shadows
        self.students = students
        self.same_dtype = shadows[0].dtype == students[0].dtype
        self.same_device = shadows[0].device == students[0].device

    def lerp(self, momentum: float) -> None:
        students = self.students
        if not self.same_device:
            # The only path that allocates: the student's tensors must be
            # brought to the shadow's device before they can be read there.
            students = [s.to(self.shadows[0].device, non_blocking=True) for s in students]
        if self.same_dtype:
            torch._foreach_lerp_(self.shadows, students, momentum)
        else:
            # lerp needs equal dtypes; mul + add promotes the (low-precision)
            # student element by element, without a full-size temporary.
            torch._foreach_mul_(self.shadows, 1.0 - momentum)
            torch._foreach_add_(self.shadows, students, alpha=momentum)

    def copy(self) -> None:
        torch._foreach_copy_(self.shadows, self.students, non_blocking=True)

    def students_finite(self) -> Tensor | None:
        """See :meth:`ShadowAverager.students_finite`; ``None`` for a group of integer tensors."""
        student = self.students[0]
        if not (student.is_floating_point() or student.is_complex()):
            return None
        # The 2-norm is NaN or Inf whenever an element is, and it is the fast multi-tensor norm on CPU (the max-abs
        # norm, which cannot overflow, took 20x longer on 10M float32 elements). fp16/bf16 are summed in float32.
        dtype = torch.float32 if student.dtype in _LOW_PRECISION else None
        norms = torch._foreach_norm(self.students, 2, dtype=dtype)
        return torch.stack(norms).isfinite().all()


class ShadowAverager:
    """Keep ``targets`` an exponential moving average of ``students``.

    Args:
        targets: the EMA model's tensors, updated in place after every call.
        students: the student's tensors, in the same order and of the same shapes.
        shadow_dtypes: per pair, the dtype to average in; ``None`` uses
            :func:`shadow_dtype_for` of the target's dtype. Where it differs
            from the target's dtype, a separate shadow tensor holds the
            average and is copied into the target after each update (the
            target then stays in the student's dtype, so the EMA model takes
            the student's inputs unchanged).

    Tensors are grouped once, here, by (device, dtypes); an update is then one
    multi-tensor call per group, plus one copy per group that has separate
    shadows. Nothing is looked up by name and nothing is allocated per update
    unless shadow and student live on different devices.
    """

    def __init__(
        self,
        targets: Sequence[Tensor],
        students: Sequence[Tensor],
        shadow_dtypes: Sequence[torch.dtype] | None = None,
    ) -> None:
        if shadow_dtypes is None:
            shadow_dtypes = [shadow_dtype_for(t.dtype) for t in targets]
        # Plain (detached) views of the same storage: the multi-tensor kernels
        # dispatch measurably faster on them than on nn.Parameter objects.
        self.targets = [t.detach() for t in targets]
        # A separate shadow only where its dtype differs from the target's.
        self.shadows = [
            t if dtype == t.dtype else t.detach().to(dtype=dtype, copy=True)
            for t, dtype in zip(self.targets, shadow_dtypes, strict=True)
        ]
        separate = [i for i, (t, s) in enumerate(zip(self.targets, self.shadows, strict=True)) if t is not s]
        # Groups whose "shadows" are the targets and whose "students" are the
        # separate shadows: copy() on them writes each average into its target.
        self._mirrors = self._group([self.targets[i] for i in separate], [self.shadows[i] for i in separate])
        self.students: list[Tensor] = []
        self._groups: list[_Group] = []
        self.bind(students)

    def bind(self, students: Sequence[Tensor]) -> None:
        """Pair the shadows with (possibly new) student tensors of the same shapes.

        Called again when the student's tensors were replaced, for instance by
        ``model.to(device)``, which gives buffers new tensor objects.
        """
        if len(students) != len(self.targets):
            raise ValueError(f"expected {len(self.targets)} student tensors, found {len(students)}")
        for i, (target, student) in enumerate(zip(self.targets, students, strict=True)):
            if target.shape != student.shape:
                raise ValueError(
                    f"pair {i}: target shape {tuple(target.shape)} differs from student shape {tuple(student.shape)}"
                )
        self.students = [s.detach() for s in students]
        self._groups = self._group(self.shadows, self.students)

    @staticmethod
    def _group(shadows: Sequence[Tensor], students: Sequence[Tensor]) -> list[_Group]:
        buckets: dict[tuple[torch.device, torch.dtype, torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]
        buckets = {}
        for shadow, student in zip(shadows, students, strict=True):
            key = (shadow.device, shadow.dtype, student.device, student.dtype)
            pair = buckets.setdefault(key, ([], []))
            pair[0].append(shadow)
            pair[1].append(student)
        return [_Group(sh, st) for sh, st in buckets.values()]

    @property
    def has_separate_shadows(self) -> bool:
        """Whether some averages live in tensors other than the targets."""
        return bool(self._mirrors)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """``shadow = (1 - momentum) * shadow + momentum * student``, then sync the targets."""
        for group in self._groups:
            group.lerp(momentum)
        self.sync_targets()

    @torch.no_grad()
    def copy(self) -> None:
        """Set every shadow (and target) to the student's current value."""
        for group in self._groups:
            group.copy()
        self.sync_targets()

    @torch.no_grad()
    def students_finite(self) -> Tensor | None:
        """A 0-dim bool tensor: ``True`` proves that no student element is NaN or infinite.

        One ``_foreach_norm`` per group (no Python loop over tensors) and
        nothing read back to the host: the caller decides when to pay that
        synchronisation (``bool(result)``). ``False`` means that some tensor
        has a NaN or an Inf, or a 2-norm beyond its dtype's range (float32:
        elements around 1e19): :meth:`first_nonfinite_student` tells which.
        ``None`` when there is no floating student tensor.
        """
        flags = [flag for group in self._groups if (flag := group.students_finite()) is not None]
        if not flags:
            return None
        if len(flags) == 1:
            return flags[0]
        device = flags[0].device
        return torch.stack([flag.to(device) for flag in flags]).all()

    @torch.no_grad()
    def first_nonfinite_student(self) -> int | None:
        """Index of the first student tensor with a NaN or an Inf, or ``None``: exact, one tensor at a time."""
        for index, student in enumerate(self.students):
            if (student.is_floating_point() or student.is_complex()) and not bool(torch.isfinite(student).all()):
                return index
        return None

    @torch.no_grad()
    def sync_targets(self) -> None:
        """Copy the separate shadows into their targets (after loading shadows, say)."""
        for mirror in self._mirrors:
            mirror.copy()
