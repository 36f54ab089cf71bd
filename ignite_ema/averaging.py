"""The numeric core, on tensor lists: running averages and copies, one multi-tensor call per group.

Nothing here knows about modules or Ignite. :class:`ShadowAverager` keeps
each *shadow* the running average of its student,
``shadow = (1 - m) * shadow + m * student``; :class:`TensorCopier` copies
tensors by value. Both group their pairs once, by the device and dtype of
each side, so that a call is one multi-tensor kernel per group:

>>> import torch
>>> student = [torch.ones(2), torch.full((3,), 2.0)]
>>> shadows = [torch.zeros(2), torch.zeros(3)]
>>> averager = ShadowAverager(shadows, student)
>>> averager.update(0.25)
>>> shadows
[tensor([0.2500, 0.2500]), tensor([0.5000, 0.5000, 0.5000])]
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = [
    "WIDENING_CHUNK",
    "WIDENING_CHUNK_CPU",
    "FiniteCheck",
    "ShadowAverager",
    "TensorCopier",
    "Transfer",
    "ValueSwap",
    "check_momentum",
    "chunks_in",
    "shadow_dtype_for",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def shadow_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype the running average of a ``dtype`` tensor is kept in by default: float32 for bf16/fp16."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float, or an error unless it is a real number in [0, 1]."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # the per-update case, without the ABC check
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number in [0, 1]; found {type(momentum).__name__} {momentum!r}")
    value = float(momentum)
    if not (0.0 <= value <= 1.0):  # NaN fails this too
        raise ValueError(f"momentum must lie in [0, 1] (the weight of the student); found {value}")
    return value


@dataclass(frozen=True)
class Transfer:
    """How tensors are copied from one device to another so that the copy has landed before anyone reads it.

    Attributes:
        non_blocking: passed to the copies.
        wait_on: the device whose current stream the host waits for after the
            copies, once (``None``: no wait is needed).
    """

    non_blocking: bool
    wait_on: torch.device | None

    @staticmethod
    def between(source: torch.device, target: torch.device, pinned_source: bool) -> Transfer:
        """The transfer for copies from ``source`` to ``target`` (two devices).

        - Device to host: asynchronous into the (pinned) host memory, so the
          host must wait before reading it: one stream synchronisation.
        - Host to device from pageable memory: safe asynchronously (the copy
          is staged before the call returns, and the device stream orders
          later kernels after it). From pinned memory the DMA reads the source
          later, and the host may write it first (an optimiser step on an
          offloaded student): blocking.
        - Device to device: stream-ordered, no wait.
        """
        if source.type == "cpu":
            return Transfer(non_blocking=not pinned_source, wait_on=None)
        return Transfer(non_blocking=True, wait_on=source if target.type == "cpu" else None)

    def copy(self, targets: list[Tensor], sources: list[Tensor]) -> None:
        """``targets[i].copy_(sources[i])`` for every pair; complete for the host when it returns."""
        torch._foreach_copy_(targets, sources, non_blocking=self.non_blocking)
        if self.wait_on is not None:
            _wait_for(self.wait_on)


def _wait_for(device: torch.device) -> None:
    """Block the host until the work queued on ``device``'s current stream is done."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)


class _Pairs:
    """``(dst, src)`` pairs that share the device and dtype of each side: one multi-tensor call updates them all.

    torch's ``_group_tensors_by_device_and_dtype`` keys on the first list alone and refuses, for one, an fp16
    source beside a float32 destination, so the pairs are grouped here on both sides. Pairs across two devices
    copy through :class:`Transfer`, and their sources are staged in memory of their own, allocated once.
    """

    def __init__(self, dst: list[Tensor], src: list[Tensor], mirror: list[Tensor] | None = None) -> None:
        self.dst, self.src, self.mirror = dst, src, mirror
        self.same_dtype = dst[0].dtype == src[0].dtype
        self.same_device = dst[0].device == src[0].device
        self.transfer = (
            None
            if self.same_device
            else Transfer.between(src[0].device, dst[0].device, any(s.is_pinned() for s in src))
        )
        self._staging: list[Tensor] | None = None
        self._widening: list[tuple[int, int, list[Tensor]]] | None = None

    @staticmethod
    def group(
        dst: Sequence[Tensor], src: Sequence[Tensor], mirrors: Sequence[Tensor | None] | None = None
    ) -> list[_Pairs]:
        """The pairs grouped; with ``mirrors``, each destination's narrower copy (or ``None``) kept in its group."""
        # Multi-tensor kernels take their fast path only when every pair has equal strides (aten's
        # check_fast_path_restrictions): a pair laid out otherwise (a channels_last student beside a contiguous
        # EMA) goes to a group of its own instead of sending the whole group to per-tensor kernels.
        buckets: dict[tuple[object, ...], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for d, s, m in zip(dst, src, mirrors or [None] * len(dst), strict=True):
            mirrored = None if m is None else (m.device, m.dtype, m.stride() == d.stride())
            key = (d.device, d.dtype, s.device, s.dtype, d.stride() == s.stride(), mirrored)
            lists = buckets.setdefault(key, ([], [], []))
            lists[0].append(d)
            lists[1].append(s)
            if m is not None:
                lists[2].append(m)
        return [_Pairs(d, s, m or None) for d, s, m in buckets.values()]

    def sources_here(self) -> list[Tensor]:
        """The sources, on the destinations' device and ready to read: themselves, or their staged copies."""
        if self.transfer is None:
            return self.src
        self.transfer.copy(self.staging(), self.src)
        return self.staging()

    def staging(self) -> list[Tensor]:
        """Views of the sources' shapes and layouts into one buffer on the destinations' device, allocated at the
        first call and kept: pinned on the host for copies off a device, so that they can be asynchronous (one
        buffer, since pinned memory is allocated in powers of two)."""
        if self._staging is None:
            pin = self.dst[0].device.type == "cpu" and self.src[0].device.type != "cpu"
            flat = torch.empty(
                sum(s.numel() for s in self.src), dtype=self.src[0].dtype, device=self.dst[0].device, pin_memory=pin
            )
            offsets = itertools.accumulate((s.numel() for s in self.src[:-1]), initial=0)
            self._staging = [_view_like(flat, offset, s) for offset, s in zip(offsets, self.src, strict=True)]
        return self._staging

    def runs(self) -> list[tuple[int, int]]:
        """Consecutive ranges ``[start, end)`` of pairs, each of at most ``WIDENING_CHUNK`` elements or one larger
        tensor: the chunks that a pipelined update stages and averages one after the other (for narrower sources,
        the chunks that :meth:`lerp_widened` widens, which must be the same)."""
        if not self.same_dtype:
            if self._widening is None:
                self._widening = _widening_plan(self.dst)
            return [(start, end) for start, end, _ in self._widening]
        return [(start, end) for start, end, _ in _runs(self.dst, _capacity(self.dst))]

    def __getstate__(self) -> dict[str, object]:
        """Pickled without its scratch and staging memory (made again at first use, pinned as it must be)."""
        return {**self.__dict__, "_staging": None, "_widening": None}

    def stage(self, start: int, end: int) -> None:
        """Queue the copy of sources ``[start, end)`` into :meth:`staging`, without waiting for it to land."""
        torch._foreach_copy_(self.staging()[start:end], self.src[start:end], non_blocking=True)

    def average(self, sources: list[Tensor], weight: float, start: int = 0, end: int | None = None) -> None:
        """``dst[i].lerp_(sources[i], weight)`` for the pairs ``[start, end)`` (all by default; otherwise one of
        :meth:`runs`)."""
        if self.same_dtype and start == 0 and end is None:
            torch._foreach_lerp_(self.dst, sources, weight)
            self.copy_to_mirror(start, end)
        elif self.same_dtype:
            torch._foreach_lerp_(self.dst[start:end], sources[start:end], weight)
            self.copy_to_mirror(start, end)
        else:
            self.lerp_widened(sources, weight, start, len(self.dst) if end is None else end)

    def copy_to_mirror(self, start: int = 0, end: int | None = None) -> None:
        """``mirror[i].copy_(dst[i])`` for the pairs ``[start, end)``, if the destinations have mirrors."""
        if self.mirror is not None:
            torch._foreach_copy_(self.mirror[start:end], self.dst[start:end])

    def lerp_widened(self, sources: list[Tensor], weight: float, start: int, end: int) -> None:
        """``dst[i].lerp_(sources[i], weight)`` for the pairs ``[start, end)`` whose sources are of a narrower dtype
        (bf16 students, float32 shadows).

        ``lerp`` needs equal dtypes, and a mixed-dtype ``add_`` runs one tensor at a time (on a GPU: aten's slow
        path; on this CPU: 2.6x the time of what follows). Instead each chunk of sources is widened into scratch
        memory of the destinations' dtype, then averaged, then copied to the mirrors: three same-dtype
        multi-tensor calls per chunk, on a chunk small enough that the second and third read what the one before
        wrote from the cache, so that memory sees about one pass. The scratch is allocated at the first call and
        kept: the largest tensor, or up to ``WIDENING_CHUNK`` elements.
        """
        if self._widening is None:
            self._widening = _widening_plan(self.dst)
        for first, last, widened in self._widening:
            if start <= first and last <= end:
                torch._foreach_copy_(widened, sources[first:last])
                torch._foreach_lerp_(self.dst[first:last], widened, weight)
                self.copy_to_mirror(first, last)

    def copy_sources(self) -> None:
        """``dst[i].copy_(src[i])`` for every pair, landed before the host reads the destinations."""
        if self.transfer is None:
            torch._foreach_copy_(self.dst, self.src)
        else:
            self.transfer.copy(self.dst, self.src)


#: Elements of a widening chunk on an accelerator (float32 scratch: 16 MB): large enough that its three launches are
#: worth their cost.
WIDENING_CHUNK = 1 << 22
#: On a CPU (4 MB): small enough that a chunk's scratch, shadows and mirrors stay in the last-level cache between its
#: three calls.
WIDENING_CHUNK_CPU = 1 << 20


def _capacity(like: Sequence[Tensor]) -> int:
    """Elements of a chunk of ``like``: the largest tensor, or up to ``WIDENING_CHUNK`` for its device."""
    chunk = WIDENING_CHUNK_CPU if like[0].device.type == "cpu" else WIDENING_CHUNK
    return max(max(t.numel() for t in like), min(sum(t.numel() for t in like), chunk))


def _widening_plan(like: Sequence[Tensor]) -> list[tuple[int, int, list[Tensor]]]:
    """:func:`chunks_in` a scratch buffer of ``like``'s dtype, of :func:`_capacity` elements."""
    return chunks_in(like, torch.empty(_capacity(like), dtype=like[0].dtype, device=like[0].device))


def chunks_in(like: Sequence[Tensor], flat: Tensor) -> list[tuple[int, int, list[Tensor]]]:
    """Consecutive runs ``[start, end)`` of ``like`` that fit the flat buffer ``flat`` together, each with views into
    ``flat`` laid out like its tensors (so that multi-tensor kernels keep their fast path). Each tensor must fit
    ``flat`` alone."""
    return [
        (start, end, [_view_like(flat, offset, t) for offset, t in placed])
        for start, end, placed in _runs(like, flat.numel())
    ]


def _runs(like: Sequence[Tensor], capacity: int) -> list[tuple[int, int, list[tuple[int, Tensor]]]]:
    """Consecutive runs ``[start, end)`` of ``like`` of at most ``capacity`` elements together, each with the offset
    of each of its tensors in a buffer of that size."""
    plan, start = [], 0
    while start < len(like):
        end, used, placed = start, 0, []
        while end < len(like) and used + like[end].numel() <= capacity:
            placed.append((used, like[end]))
            used += like[end].numel()
            end += 1
        plan.append((start, end, placed))
        start = end
    return plan


def _view_like(flat: Tensor, offset: int, tensor: Tensor) -> Tensor:
    """A view of ``flat`` from ``offset`` with ``tensor``'s shape, and its strides where they span exactly its
    elements (dense: contiguous, channels_last, ...); contiguous otherwise."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    if tensor.numel() > 0 and span == tensor.numel():
        return flat.as_strided(tensor.shape, tensor.stride(), flat.storage_offset() + offset)
    return flat[offset : offset + tensor.numel()].view(tensor.shape)


def _check_pairs(dst: Sequence[Tensor], src: Sequence[Tensor], what: str) -> None:
    if len(src) != len(dst):
        raise ValueError(f"expected {len(dst)} {what} tensors, found {len(src)}")
    for i, (d, s) in enumerate(zip(dst, src, strict=True)):
        if d.shape != s.shape:
            raise ValueError(f"pair {i}: shape {tuple(d.shape)} here, {tuple(s.shape)} in the {what} tensor")


class TensorCopier:
    """Copy ``sources`` into ``targets`` by value (``copy_``), one ``_foreach_copy_`` per group.

    Args:
        targets: the tensors written, in place.
        sources: the tensors read, in the same order and of the same shapes
            (any dtype or device: ``copy_`` converts).
    """

    def __init__(self, targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
        _check_pairs(targets, sources, "source")
        self.targets = [t.detach() for t in targets]
        self.sources = [s.detach() for s in sources]
        self._groups = _Pairs.group(self.targets, self.sources)

    @property
    def groups(self) -> list[_Pairs]:
        """The ``(target, source)`` pairs as grouped for one multi-tensor call each."""
        return self._groups

    @torch.no_grad()
    def copy(self) -> None:
        """``target.copy_(source)`` for every pair."""
        for group in self._groups:
            group.copy_sources()


class ShadowAverager:
    """Keep ``shadows`` an exponential moving average of ``students``, in place.

    Args:
        shadows: the running averages, written in place by every call (for
            bf16/fp16 students, float32 tensors; see :func:`shadow_dtype_for`).
        students: the tensors averaged, in the same order and of the same
            shapes; :meth:`bind` pairs the shadows with new ones.
        mirrors: for each shadow, ``None`` or a tensor of a narrower dtype
            set to the shadow's value, rounded, after every write (the bf16
            EMA model of a float32 shadow): written chunk by chunk with it.

    The pairs are grouped once, at :meth:`bind`; an update is then one
    multi-tensor call per group, with nothing looked up and, unless shadow and
    student are on different devices, nothing allocated.
    """

    def __init__(
        self, shadows: Sequence[Tensor], students: Sequence[Tensor], mirrors: Sequence[Tensor | None] | None = None
    ) -> None:
        # Plain (detached) views of the same storage: the multi-tensor kernels dispatch measurably faster on them
        # than on nn.Parameter objects.
        self.shadows = [s.detach() for s in shadows]
        mirrors = [None] * len(self.shadows) if mirrors is None else list(mirrors)
        if len(mirrors) != len(self.shadows):
            raise ValueError(f"expected {len(self.shadows)} mirrors (a tensor or None each), found {len(mirrors)}")
        paired = [(s, m) for s, m in zip(self.shadows, mirrors, strict=True) if m is not None]
        _check_pairs([s for s, _ in paired], [m for _, m in paired], "mirror")
        self.mirrors = [None if m is None else m.detach() for m in mirrors]
        self.students: list[Tensor] = []
        self._groups: list[_Pairs] = []
        self.bind(students)

    def bind(self, students: Sequence[Tensor]) -> None:
        """Pair the shadows with (possibly new) student tensors of the same shapes."""
        _check_pairs(self.shadows, students, "student")
        self.students = [s.detach() for s in students]
        self._groups = _Pairs.group(self.shadows, self.students, self.mirrors)

    @property
    def groups(self) -> list[_Pairs]:
        """The ``(shadow, student)`` pairs as grouped for one multi-tensor call each."""
        return self._groups

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """``shadow = (1 - momentum) * shadow + momentum * student``, with ``momentum`` in [0, 1]."""
        momentum = check_momentum(momentum)
        for group in self._groups:
            group.average(group.sources_here(), momentum)

    @torch.no_grad()
    def copy_students(self) -> None:
        """Set every shadow to its student's current value: the average restarts there."""
        for group in self._groups:
            group.copy_sources()
            group.copy_to_mirror()


class FiniteCheck:
    """Whether fixed tensors are free of NaN and Inf: one multi-tensor 2-norm per (device, dtype) group.

    Args:
        tensors: the tensors checked (floating or complex ones; others are ignored).
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = [t.detach() for t in tensors if t.is_floating_point() or t.is_complex()]
        grouped = _group_tensors_by_device_and_dtype([list(self.tensors)]).values() if self.tensors else []
        self._groups: list[list[Tensor]] = [[t for t in members if t is not None] for (members,), _ in grouped]

    @torch.no_grad()
    def all_finite(self) -> Tensor | None:
        """A 0-dim bool tensor, ``True`` when no element is NaN or infinite; ``None`` without tensors.

        Nothing is read back to the host: the caller decides when to pay that
        synchronisation. ``False`` also when a 2-norm overflows (float32:
        elements around 1e19), so confirm with :meth:`first_nonfinite`.
        """
        flags = []
        for members in self._groups:
            # The 2-norm is the fast multi-tensor norm on CPU (the max-abs norm took 20x longer on 10M float32
            # elements); fp16/bf16 are summed in float32.
            dtype = torch.float32 if members[0].dtype in LOW_PRECISION else None
            flags.append(torch.stack(torch._foreach_norm(members, 2, dtype=dtype)).isfinite().all())
        if not flags:
            return None
        if len(flags) == 1:
            return flags[0]
        # Gathered on an accelerator if there is one: a copy to it needs no host wait, a copy off it would.
        device = next((f.device for f in flags if f.device.type != "cpu"), flags[0].device)
        return torch.stack([f.to(device) for f in flags]).all()

    @torch.no_grad()
    def first_nonfinite(self) -> int | None:
        """Index (in ``tensors``) of the first tensor with a NaN or an Inf, or ``None``: exact, one at a time."""
        for index, tensor in enumerate(self.tensors):
            if not bool(torch.isfinite(tensor).all()):
                return index
        return None


class ValueSwap:
    """Exchange the values of ``first[i]`` and ``second[i]`` in place (same shapes and dtypes, any devices).

    The scratch memory is one byte buffer per device of ``first``, the size of
    the largest tensor, allocated here, before anything is written, and kept:
    :meth:`exchange` allocates nothing, so the exchange back at the end of a
    swap cannot fail for memory. Within that size, tensors are exchanged in
    chunks: three multi-tensor copies per chunk.

    Args:
        first, second: the tensors whose values are exchanged, pair by pair.
    """

    def __init__(self, first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
        _check_pairs(first, second, "second")
        self._groups = _Pairs.group([t.detach() for t in first], [t.detach() for t in second])
        scratch: dict[torch.device, Tensor] = {}
        for group in self._groups:
            size = max(t.numel() * t.element_size() for t in group.dst)
            device = group.dst[0].device
            if device not in scratch or scratch[device].numel() < size:
                scratch[device] = torch.empty(size, dtype=torch.uint8, device=device)
        # Each group's chunks and their views into its device's buffer, read as the group's dtype, planned once.
        self._plans = []
        for group in self._groups:
            buffer, itemsize = scratch[group.dst[0].device], group.dst[0].element_size()
            flat = buffer[: buffer.numel() // itemsize * itemsize].view(group.dst[0].dtype)
            self._plans.append((group, chunks_in(group.dst, flat)))

    @torch.no_grad()
    def exchange(self) -> None:
        """Exchange the values; a second call puts them back."""
        for group, plan in self._plans:
            for start, end, held in plan:
                a, b = group.dst[start:end], group.src[start:end]
                # Blocking copies: across devices, each has landed before the next reads its target.
                torch._foreach_copy_(held, a)
                torch._foreach_copy_(a, b)
                torch._foreach_copy_(b, held)
