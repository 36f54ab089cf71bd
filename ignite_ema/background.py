"""Averaging that runs beside the training step: ``ModelEMA(..., asynchronous=True)``.

An update is started, and the caller goes on (the next forward and backward
passes) while it runs. Two kinds of waits keep it unobservable:

- :meth:`Background.release_student`: before the student is written. Every
  ``Optimizer.step()`` calls it through one global step pre-hook, so an update
  has read the weights before the optimiser changes them.
- :meth:`Background.wait`: before the EMA is read or written (the package
  calls it in every method that touches the EMA, and in a forward pre-hook
  on the EMA model); user code that reads the EMA's tensors directly calls
  ``ModelEMA.wait()``.

Where the work runs depends on the devices:

- EMA and student on the CPU: a worker thread (torch's kernels release the
  GIL, so it runs on another core while the caller's thread computes).
- EMA and student on one CUDA device: a side stream. The host only queues
  kernels; the waits are stream waits on an event, with no host
  synchronisation.
- An EMA on the CPU of a student on a CUDA device: the student is copied
  chunk by chunk into pinned host memory on a side stream, each chunk with an
  event; a worker thread averages chunk ``k`` as soon as it has landed, while
  the later ones are in flight. The optimiser waits (on the device) for the
  copies only, not for the host's averaging.

Buffers, which forward passes write, are read before the call returns: on the
host or the GPU's current stream, and for an EMA on the CPU of a CUDA student,
by copies queued on the current stream (ordered before the next forward pass,
with no host synchronisation) that the worker thread finishes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ignite_ema.averaging import ShadowAverager, TensorCopier

__all__ = ["Background", "WaitBeforeForward", "release_students"]


class Background:
    """Where an EMA's updates run when they do not run in the caller's thread; at most one in flight.

    :meth:`place` says where, from the tensors averaged, before the first start.
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.staged = False  # an EMA on the CPU of a CUDA student: copied through pinned memory, averaged on the host
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._side: torch.cuda.Stream | None = None
        self._running: Future[None] | None = None  # the host part of the update in flight
        # The device part of the last update: the student's writers wait for it (staged: for the copies), and so does
        # every reader, on whatever stream it reads, so it is kept until the next update replaces it.
        self._done: torch.cuda.Event | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled idle: the update in flight is finished first, threads and streams are made anew."""
        self.wait()
        return {"device": self.device, "staged": self.staged}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def place(self, students: list[Tensor], shadows: list[Tensor]) -> None:
        """Run the updates of ``shadows`` towards ``students`` where their devices allow; ``ValueError`` for devices
        it does not run on (students on several devices, an accelerator other than CUDA, an EMA on a device other
        than the student's or the CPU), with nothing changed."""
        found = sorted({(str(s.device), str(t.device)) for s, t in zip(students, shadows, strict=True)})
        if not found:  # nothing averaged in the background: updates finish at once
            found = [("cpu", "cpu")]
        student, ema = (torch.device(d) for d in found[0])
        if len(found) > 1 or not (
            (student.type == ema.type == "cpu") or (student.type == "cuda" and ema in (student, torch.device("cpu")))
        ):
            pairs = ", ".join(f"student on {s} with its EMA on {e}" for s, e in found)
            raise ValueError(
                "asynchronous=True runs updates beside the training step for a student on the CPU or on one CUDA "
                f"device, with its EMA on the same device or on the CPU; found {pairs}. Leave asynchronous=False here"
            )
        self.wait()
        if student != self.device:  # the stream and the event belong to the old device
            self._side, self._done = None, None
        self.device, self.staged = student, student.type == "cuda" and ema.type == "cpu"

    def start(
        self,
        averager: ShadowAverager,
        momentum: float,
        finish: Callable[[], None],
        *,
        buffers: ShadowAverager,
        copies: TensorCopier,
    ) -> None:
        """Start ``averager.update(momentum)`` then ``finish()``, and return; the previous update must be waited for.

        ``buffers.update(momentum)`` and ``copies.copy()`` read what the next forward pass may write (buffers): they
        read it in the call, or, off a GPU, through copies queued on the current stream before it.
        """
        assert self._running is None, "wait() for the update in flight before starting another"
        # Registered first: whatever of the update gets queued, the next optimiser step waits for it.
        _STARTED.add(self)
        _install_step_hook()
        if self.staged:
            self._start_staged(averager, momentum, finish, buffers, copies)
            return
        buffers.update(momentum)
        copies.copy()
        if self.device.type == "cpu":
            self._running = self._thread().submit(_run, averager, momentum, finish)
            return
        side = self._stream()
        side.wait_stream(torch.cuda.current_stream(self.device))  # the optimiser's writes come first
        with torch.cuda.stream(side):
            try:
                _run(averager, momentum, finish)
            finally:  # also after an error part-way: what was queued is waited for
                self._done = _recorded(side)

    @torch.no_grad()
    def _start_staged(
        self,
        averager: ShadowAverager,
        momentum: float,
        finish: Callable[[], None],
        buffers: ShadowAverager,
        copies: TensorCopier,
    ) -> None:
        current = torch.cuda.current_stream(self.device)
        # What forward passes write is copied on their stream, so before the next one is queued; on the host, the
        # worker finishes it once it has landed.
        off_device = []
        for group, average in [(g, True) for g in buffers.groups] + [(g, False) for g in copies.groups]:
            if group.transfer is not None:
                group.stage(0, len(group.src))
                off_device.append((group, average))
            elif average:  # host to host, at once
                group.average(group.src, momentum)
            else:
                group.copy_sources()
        read = _recorded(current) if off_device else None
        side = self._stream()
        side.wait_stream(current)
        chunks = []
        with torch.cuda.stream(side):
            try:
                for group in averager.groups:
                    for start, end in group.runs():
                        group.stage(start, end)
                        chunks.append((group, start, end, _recorded(side)))
            finally:
                self._done = _recorded(side)
        device = self.device

        @torch.no_grad()  # grad mode is per thread
        def average_on_host() -> None:
            with torch.cuda.device(device):  # a new thread's current device is the first GPU
                if read is not None:
                    read.synchronize()
                for group, average in off_device:
                    if average:
                        group.average(group.staging(), momentum)
                    else:
                        torch._foreach_copy_(group.dst, group.staging())
                for group, start, end, landed in chunks:
                    landed.synchronize()
                    group.average(group.staging(), momentum, start, end)
            finish()

        self._running = self._thread().submit(average_on_host)

    def release_student(self) -> None:
        """Return when the student may be written: the last update has read it, or the caller's current stream (the
        one that writes it) will wait until it has."""
        self._order_current_stream()
        if not self.staged:  # on the host, the worker reads the student to the end
            self._join()

    def wait(self) -> None:
        """Return when the last update is over for every reader: its host part done, and the caller's current stream
        ordered after its device part. An error raised by the update is raised here."""
        self._order_current_stream()
        self._join()

    def _order_current_stream(self) -> None:
        if self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)

    def _join(self) -> None:
        # Several threads may wait (an evaluator's forward beside the training loop): each waits for the result,
        # and the update counts as finished only once it is.
        running = self._running
        if running is None:
            return
        try:
            running.result()
        finally:  # done, or failed: its error is raised once
            if self._running is running:
                self._running = None

    def _thread(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ignite-ema")
        return self._pool

    def _stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return self._side


def _run(averager: ShadowAverager, momentum: float, finish: Callable[[], None]) -> None:
    averager.update(momentum)
    finish()


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    # Blocking: a host thread that synchronises on it sleeps instead of spinning on a core.
    event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


# Every EMA that has started an update, weakly held (a collected EMA has nothing left to wait for): before each
# optimiser step, each makes the step's stream wait for its last update's reads of the student (a no-op once done).
# They stay here, rather than leaving once released, because a release on one stream (an evaluator's) says nothing
# of the stream that will write the student.
_STARTED: weakref.WeakSet[Background] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hook_installed = False


def _install_step_hook() -> None:
    """One global ``Optimizer`` step pre-hook for every asynchronous EMA of the process, installed at first use."""
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            register_optimizer_step_pre_hook(_release_students)
            _hook_installed = True


def release_students() -> None:
    """Return when every asynchronous update of the process has read its student: before writing a student by other
    means than an optimiser (a swap of another EMA into it, say)."""
    for background in list(_STARTED):
        background.release_student()


def _release_students(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    release_students()


class WaitBeforeForward:
    """A forward pre-hook for the EMA model: a forward pass (a teacher's, an evaluator's) waits for the update in
    flight. Pickled (with the module) together with its :class:`Background`."""

    def __init__(self, background: Background) -> None:
        self.background = background

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.background.wait()
