"""The checks and the update benchmark on a CUDA device, in one short script: ``python -m benchmarks.gpu_check``.

What a CPU machine cannot show, each check asserting its result against a
closed form, a plain-loop reference or the student's own bits, and printing
its figures and wall time:

1. bf16 students on the device: float32 shadows keep an EMA with momentum 2e-4 moving;
2. the swap on the device: bit-exact in and out, its time, its peak extra
   device memory against the largest tensor, and nothing allocated on exit;
3. an EMA kept on the CPU for a CUDA student (the cross-device update path);
4. ``skip_nonfinite``: a NaN skipped on the device, and what its host
   synchronisation costs per update;
5. the update against the floor (one ``lerp_`` over a flat buffer of as many
   elements), timed with CUDA events, on the benchmark models;
6. ``update_vs_floor``: fp32 and bf16 students (float32 shadows, bf16 mirrors)
   against the bandwidth floor, the 12 bytes per element one pass moves at the
   speed of a flat 1 GiB device copy measured in the same run (the goal, at
   most 1.2x, is reported, not asserted);
7. ``launches_per_update``: the kernels (and copies) one update runs on the
   GPU, counted with ``torch.profiler``: fp32 and bf16, synchronous and
   asynchronous;
8. races made deterministic: the student's write is queued behind ~70 ms of
   GPU work (``torch.cuda._sleep``), then the EMA call runs and the host reads
   the EMA at once. With ``update(1.0)`` (or ``copy_student``) the EMA must be
   the student's new values bit for bit; a device-to-host copy that is not
   waited for gives the old ones. Cases: fp32 and bf16 students with
   ``device="cpu"``, copied buffers and ``copy_student`` into a pinned CPU
   ``ema_model``, an update into one, the swap with a CPU EMA, and the swap of a
   pinned (CPU-offloaded) student while an upload of it is queued;
9. ``async_bit_identical``: ``asynchronous=True`` (a side stream beside the
   student; for ``device="cpu"`` the pinned pipeline and its worker thread)
   gives the synchronous EMA bit for bit, fp32 and bf16: over a few SGD steps
   of a convnet with BatchNorm (tensors, ``state_dict()``, teacher outputs),
   and when the EMA's reads of the student are held back by queued GPU work
   while an optimiser step, on the same stream or another, writes it (its
   step pre-hook must order the write after the reads); and ``wait()`` orders
   the caller's stream after the update's writes even when the step's hook
   released the student on another stream first;
10. host synchronisations (``torch.cuda.set_sync_debug_mode("warn")``): none
    in a same-device update, synchronous or asynchronous (with the optimiser's
    wait for it and ``wait()``), one per group of pairs in a cross-device one;
11. peak device memory: ``ModelEMA(..., device="cpu")`` construction and
    ``model_state_dict()`` (about zero), a one-GPU FSDP2 ``state_dict()``
    (tensors on the CPU, peak at most the largest tensor);
12. ``async_step_overhead``: the training step of a ~100M-parameter bf16
    transformer (tens of ms) with no EMA, a synchronous and an asynchronous
    EMA on the GPU, and an EMA on the CPU updated at every step and at every
    50th, synchronous and asynchronous: times and ratios, side by side;
13. a one-GPU NCCL group with a CPU EMA and ``sync_buffers="update"``;
14. ``device="cuda"`` resolved to the student's GPU.

Every check is isolated: an error of any kind is reported as a FAIL line and
the next check runs. ``--device cpu`` runs the checks that mean something on
a CPU and reports the others as skipped, which the test suite does to keep
this script working. It prints one line per check and a JSON summary; it
exits non-zero if a check fails. ``--only`` runs the checks whose names
contain one of the given words.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from benchmarks.measure import mean_call_seconds
from benchmarks.models import MODELS, describe
from benchmarks.swap_bench import swap_once
from ignite_ema import EMAHandler, ModelEMA, named_tensors
from ignite_ema.distributed import RankAverage

#: GPU clock cycles of work queued before a raced write: 50 to 90 ms at an H100's 1.1 to 2 GHz.
SLEEP_CYCLES = 100_000_000
#: Width of the raced Linear layers: 4096 x 4096 = 16.8M elements, 64 MiB in float32.
WIDTH = 4096
#: What the caching allocator may add to a request (it hands out a whole cached block when splitting it would
#: leave less than 1 MiB).
SLACK_BYTES = 1 << 20
#: Updates per counted run of host synchronisations, and per profiled run of kernel launches.
UPDATES = 3
#: Bytes an update moves per averaged element at least, in one pass: a float32 student is read (4) and its shadow
#: read and written (4 + 4); a bf16 student is read (2), its float32 shadow read and written (4 + 4) and the shadow's
#: bf16 mirror in the EMA model written (2).
BYTES_PER_ELEMENT = 12
#: Bytes of the flat device copy whose speed sets the bandwidth floor.
COPY_BYTES = 1 << 30
#: Steps timed per configuration of the step-overhead check, and steps between the updates of its sparse CPU EMA.
TIMED_STEPS, SPARSE_EVERY = 15, 50
#: The step-overhead check's transformer (width, layers: ~100M parameters) and batch (sequences, tokens): a step of
#: tens of ms on an H100.
STEP_WIDTH, STEP_LAYERS, STEP_BATCH = 1024, 8, (32, 512)


class Skipped(Exception):
    """A check that does not apply on this device."""


def _needs_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skipped("needs a CUDA device")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Mean microseconds per call: CUDA events on a GPU, the wall clock elsewhere."""
    fn()
    _synchronize(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return 1000.0 * float(start.elapsed_time(end)) / calls
    return 1e6 * mean_call_seconds(fn, calls)


def _allocations(device: torch.device) -> int:
    """Device allocations requested so far (each tensor the caching allocator hands out, cached or not)."""
    return int(torch.cuda.memory_stats(device)["allocation.all.allocated"])


@contextmanager
def _peak_extra(device: torch.device) -> Iterator[list[int]]:
    """The peak device memory taken inside the block beyond what was held before it: appended, on exit, to the
    list this yields."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    found: list[int] = []
    yield found
    torch.cuda.synchronize(device)
    found.append(torch.cuda.max_memory_allocated(device) - before)


def _bump(tensors: Iterable[Tensor]) -> None:
    """The student's write, for an optimiser step: values that the EMA has never held."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(1)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copies of ``module``'s tensors, taken now: for CPU tensors the host reads them without waiting for anything."""
    return {name: tensor.detach().clone() for name, tensor in named_tensors(module).items()}


def _assert_same_bits(found: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    for name, want in expected.items():
        got, want = found[name].detach().cpu(), want.detach().cpu()
        if not torch.equal(got, want):
            wrong = int((got != want).sum())
            raise AssertionError(f"{what}: tensor '{name}' differs in {wrong} of {want.numel()} elements")


def _pinned(module: nn.Module) -> nn.Module:
    """``module`` (on the CPU) with its parameters and buffers in pinned host memory, as an offloaded model's are."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(param.detach().pin_memory(), requires_grad=param.requires_grad))
        for name, buffer in list(sub.named_buffers(recurse=False)):
            setattr(sub, name, buffer.pin_memory())
    assert all(t.is_pinned() for t in named_tensors(module).values()), "the tensors could not be pinned"
    return module


def _behind_queued_work(write: Callable[[], object]) -> None:
    """Queue ~70 ms of GPU work, then ``write`` behind it on the same stream.

    Whatever the host does next runs while the write has not happened on the
    GPU yet: a device-to-host copy the host does not wait for reads stale
    values, and a host-to-device copy from pinned memory reads its source
    only after the host has gone on. Every time, whatever the machine.
    """
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # type: ignore[no-untyped-call]
    write()
    if torch.cuda.current_stream().query():
        raise AssertionError("the GPU finished its queued work at once, so the race did not happen: raise SLEEP_CYCLES")


def _raced(student: nn.Module, ema: ModelEMA, call: Callable[[], object]) -> dict[str, Any]:
    """The student's write queued behind GPU work, then ``call`` (``update(1.0)`` or ``copy_student``), then the
    EMA model read by the host at once: it must hold the student's new values, bit for bit."""
    _behind_queued_work(partial(_bump, named_tensors(student).values()))
    call()
    found = _snapshot(ema.ema_model)  # no wait for the GPU before this read: the call must have waited
    _assert_same_bits(found, named_tensors(student), "the EMA read right after the call")
    return {"elements": sum(t.numel() for t in found.values()), "EMA read at once": "the student's, bit for bit"}


def _host_syncs(fn: Callable[[], object]) -> int:
    """How many host synchronisations ``fn`` makes, as torch's sync debug mode reports them (one warning each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, not once per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def _updates(ema: ModelEMA, count: int) -> None:
    for _ in range(count):
        ema.update(0.1)


def _updates_then_wait(ema: ModelEMA, count: int) -> None:
    _updates(ema, count)
    ema.wait()


def _device_activities(fn: Callable[[], object], per: int) -> dict[str, float]:
    """What ``fn`` runs on the GPU, by kind (``kernel``, ``gpu_memcpy``, ``gpu_memset``), as ``torch.profiler``
    records it on every stream, divided by ``per``; an error if it recorded no kernel at all (no CUPTI)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = Counter(str(event.activity_type) for event in prof.events())
    found = {kind: kinds[kind] / per for kind in ("kernel", "gpu_memcpy", "gpu_memset") if kinds[kind]}
    if "kernel" not in found:
        raise AssertionError(f"the profiler recorded no CUDA kernel (activities: {dict(kinds)}): is CUPTI available?")
    return found


def _copy_bandwidth(device: torch.device) -> float:
    """Bytes per second (read plus written) that a flat device-to-device ``copy_`` of ``COPY_BYTES`` moves."""
    source = torch.ones(COPY_BYTES, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * COPY_BYTES / (1e-6 * _time_us(partial(target.copy_, source), device, 20))


@contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """cuDNN kernels chosen the same way at every call, so two runs of one input give the same bits."""
    kept = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = kept


def _convnet() -> nn.Module:
    """A small convnet with BatchNorm: 3 x 16 x 16 images in, 10 logits out."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


@contextmanager
def _nccl_group(device: torch.device) -> Iterator[None]:
    """A one-process NCCL group on ``device`` and a free local port, destroyed on the way out whatever happens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the checks


def check_bf16(device: torch.device) -> dict[str, Any]:
    model = nn.Linear(256, 256, bias=False).to(device, torch.bfloat16)
    nn.init.zeros_(model.weight)
    handler = EMAHandler(model, momentum=2e-4)
    nn.init.ones_(model.weight)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    trainer.run(range(3000), max_epochs=1)
    expected = 1 - (1 - 2e-4) ** 3000
    found = named_tensors(handler.ema_model)["weight"].float().mean().item()
    assert abs(found - expected) <= 2**-8 * expected, (found, expected)
    assert handler.state_dict()["tensors"]["weight"].dtype == torch.float32
    return {"bf16 EMA after 3000 updates": found, "closed form": expected}


def check_swap(device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = next(spec for spec in MODELS if spec.key == "conv").build().to(device)
    ema = ModelEMA(model, handle_buffers="update")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    ema.update(0.3)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    largest = max(t.numel() * t.element_size() for t in named_tensors(model).values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with ema.swapped():
        for name, value in averaged.items():
            assert torch.equal(model.state_dict()[name], value), name
        allocated = _allocations(device) if device.type == "cuda" else 0
    # The exit allocates nothing (its scratch memory was taken on entry), so it cannot fail for memory.
    on_exit = _allocations(device) - allocated if device.type == "cuda" else None
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    for name, value in own.items():
        assert torch.equal(model.state_dict()[name], value), name

    result: dict[str, Any] = {
        "swap in and out, us": _time_us(partial(swap_once, ema), device, 10),
        "largest tensor B": largest,
    }
    if peak is not None:
        assert peak <= largest + SLACK_BYTES, (peak, largest)
        assert on_exit == 0, f"giving the student back allocated {on_exit} device tensors"
        result["peak extra device memory B"] = peak
        result["device allocations on exit"] = on_exit
    return result


def check_cpu_ema_of_a_cuda_student(device: torch.device) -> dict[str, Any]:
    _needs_cuda(device)
    model = nn.Linear(64, 64).to(device)
    handler = EMAHandler(model, momentum=0.25, device="cpu")
    expected = {k: v.detach().cpu().double() for k, v in model.named_parameters()}
    trainer = Engine(lambda e, b: [p.data.add_(1.0) for p in model.parameters()])
    seen: list[float] = []

    def reference(engine: Engine) -> None:
        for name, param in model.named_parameters():
            expected[name] = 0.75 * expected[name] + 0.25 * param.detach().cpu().double()
        seen.append(1.0)

    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, reference)
    trainer.run(range(20), max_epochs=1)
    for name, param in handler.ema_model.named_parameters():
        assert param.device.type == "cpu"
        torch.testing.assert_close(param.double(), expected[name], rtol=1e-5, atol=1e-5)
    # An EMA built beside a CPU student, the student moved to the GPU afterwards: an error naming the tensor.
    moved = nn.Linear(4, 4)
    beside = ModelEMA(moved)
    moved.to(device)
    try:
        beside.rebind()
    except ValueError as error:
        assert "moved from cpu to cuda" in str(error), error
    else:
        raise AssertionError("a student moved off its EMA's device was not refused")
    return {"cross-device updates checked": len(seen), "student moved after the EMA was built": "refused"}


def check_skip_nonfinite(device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(10)]).to(device)
    plain, skipping = ModelEMA(model), ModelEMA(model)
    calls = 20
    t_plain = _time_us(lambda: plain.update(1e-3), device, calls)

    def check_then_update() -> None:
        if skipping.nonfinite_student() is None:
            skipping.update(1e-3)

    t_skip = _time_us(check_then_update, device, calls)
    with torch.no_grad():
        named_tensors(model)["3.bias"][7] = float("nan")
    assert skipping.nonfinite_student() == "the student's tensor '3.bias'"
    return {
        "update, us": t_plain,
        "check + update, us": t_skip,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def check_floor(device: torch.device, keys: Sequence[str]) -> dict[str, Any]:
    results = {}
    for spec in MODELS:
        if spec.key not in keys:
            continue
        torch.manual_seed(0)
        model = spec.build().to(device)
        ema = ModelEMA(model, handle_buffers="update")
        elements = describe(model)["averaged_elements"]
        flat_ema, flat_student = torch.zeros(elements, device=device), torch.ones(elements, device=device)
        calls = 50 if device.type == "cuda" else 5
        ours = _time_us(partial(ema.update, 2e-4), device, calls)
        floor = _time_us(partial(flat_ema.lerp_, flat_student, 2e-4), device, calls)
        results[spec.title] = {"ours us": ours, "floor us": floor, "x floor": ours / floor}
    return results


def check_update_vs_floor(device: torch.device, keys: Sequence[str]) -> dict[str, Any]:
    """The update of fp32 and bf16 students (float32 shadows, bf16 mirrors) against the bandwidth floor: the
    ``BYTES_PER_ELEMENT`` that one pass must move, at the speed of a flat device copy measured in the same run.

    No eager kernel does a bf16 update in one pass (``lerp_`` takes one dtype), so the floor is a bandwidth, not
    a kernel; for fp32 the flat ``lerp_`` of as many elements is timed too. The goal (at most 1.2x the floor) is
    reported, not asserted.
    """
    _needs_cuda(device)
    bandwidth = _copy_bandwidth(device)
    results: dict[str, Any] = {"device copy GB/s (read + written)": bandwidth / 1e9}
    for spec in MODELS:
        if spec.key not in keys:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = spec.build().to(device, dtype)
            ema = ModelEMA(model, handle_buffers="update")
            elements = describe(model)["averaged_elements"]
            moved = BYTES_PER_ELEMENT * elements
            ours = _time_us(partial(ema.update, 2e-4), device, 50)
            floor = 1e6 * moved / bandwidth
            row = {
                "elements": elements,
                "ours us": ours,
                "floor us": floor,
                "x floor": ours / floor,
                "ours GB/s": moved / ours / 1e3,
            }
            if dtype == torch.float32:
                flat_ema, flat_student = torch.zeros(elements, device=device), torch.ones(elements, device=device)
                lerp = _time_us(partial(flat_ema.lerp_, flat_student, 2e-4), device, 50)
                row |= {"flat lerp_ us": lerp, "x flat lerp_": ours / lerp}
            results[f"{spec.title}, {str(dtype).removeprefix('torch.')}"] = row
    return results


def check_launches_per_update(device: torch.device, keys: Sequence[str]) -> dict[str, Any]:
    """What one update runs on the GPU (kernels, copies, fills), on every stream, as ``torch.profiler`` records it:
    fp32 and bf16 students, synchronous and asynchronous updates (their waits included)."""
    _needs_cuda(device)
    results: dict[str, Any] = {}
    for spec in MODELS:
        if spec.key not in keys:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            model = spec.build().to(device, dtype)
            counts: dict[str, Any] = {"tensors": describe(model)["tensors"]}
            for asynchronous in (False, True):
                ema = ModelEMA(model, handle_buffers="update", asynchronous=asynchronous)
                ema.update(0.1)  # scratch memory, streams and events are made at the first update
                ema.wait()
                # The waits are part of the cost: an asynchronous update waits for the one before it.
                counts["asynchronous" if asynchronous else "synchronous"] = _device_activities(
                    partial(_updates_then_wait, ema, UPDATES), UPDATES
                )
            results[f"{spec.title}, {str(dtype).removeprefix('torch.')}"] = counts
    return results


def check_race_cpu_ema(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``device="cpu"``: the update copies the student off the GPU, and must wait for that copy before averaging."""
    _needs_cuda(device)
    student = nn.Linear(WIDTH, WIDTH, device=device, dtype=dtype)
    ema = ModelEMA(student, device="cpu")
    ema.update(1.0)  # the staging memory is taken here, not in the raced update
    return _raced(student, ema, partial(ema.update, 1.0))


def check_race_copied_buffers(device: torch.device) -> dict[str, Any]:
    """Buffers copied by value (``handle_buffers="copy"``) into a pinned CPU EMA model: a copy into pinned memory
    returns before it lands, so it must be waited for."""
    _needs_cuda(device)
    # No affine parameters: every tensor is a buffer, copied, none averaged.
    student = nn.BatchNorm1d(WIDTH * WIDTH, affine=False).to(device)
    ema = ModelEMA(student, handle_buffers="copy", ema_model=_pinned(nn.BatchNorm1d(WIDTH * WIDTH, affine=False)))
    ema.update(1.0)
    return _raced(student, ema, partial(ema.update, 1.0))


def check_race_pinned_ema_model(device: torch.device) -> dict[str, Any]:
    """An update into a caller's EMA model held in pinned CPU memory."""
    _needs_cuda(device)
    student = nn.Linear(WIDTH, WIDTH, device=device)
    ema = ModelEMA(student, ema_model=_pinned(nn.Linear(WIDTH, WIDTH)))
    ema.update(1.0)
    return _raced(student, ema, partial(ema.update, 1.0))


def check_race_copy_student(device: torch.device) -> dict[str, Any]:
    """``copy_student()`` into a caller's EMA model held in pinned CPU memory."""
    _needs_cuda(device)
    student = nn.Linear(WIDTH, WIDTH, device=device)
    ema = ModelEMA(student, ema_model=_pinned(nn.Linear(WIDTH, WIDTH)))
    return _raced(student, ema, ema.copy_student)


def check_race_swap_cpu_ema(device: torch.device) -> dict[str, Any]:
    """The swap of a CUDA student with its CPU EMA, entered while the student's last write is still queued: bit-exact
    both ways, peak extra device memory at most the largest tensor, and nothing allocated on exit."""
    _needs_cuda(device)
    student = nn.Linear(WIDTH, WIDTH, device=device)
    ema = ModelEMA(student, device="cpu")
    averaged = _snapshot(ema.ema_model)
    # The student's values after the raced write, computed on the CPU (adding 1 rounds alike on both devices).
    own = {name: tensor.detach().cpu() + 1 for name, tensor in named_tensors(student).items()}
    largest = max(t.numel() * t.element_size() for t in own.values())
    with _peak_extra(device) as peak:
        _behind_queued_work(partial(_bump, named_tensors(student).values()))
        with ema.swapped():
            held = _snapshot(ema.ema_model)  # read at once: the entry must have waited for its copies
            inside = {name: tensor.to("cpu", copy=True) for name, tensor in named_tensors(student).items()}
            allocated = _allocations(device)
        on_exit = _allocations(device) - allocated
    _assert_same_bits(held, own, "the CPU EMA model inside the swap (the student's values)")
    _assert_same_bits(inside, averaged, "the student inside the swap (the EMA's values)")
    _assert_same_bits(named_tensors(student), own, "the student after the swap")
    _assert_same_bits(named_tensors(ema.ema_model), averaged, "the EMA model after the swap")
    assert peak[0] <= largest + SLACK_BYTES, f"peak extra device memory {peak[0]} B, largest tensor {largest} B"
    assert on_exit == 0, f"giving the student back allocated {on_exit} device tensors: it could fail for memory"
    return {"peak extra device memory B": peak[0], "largest tensor B": largest, "device allocations on exit": 0}


def check_race_swap_pinned_student(device: torch.device) -> dict[str, Any]:
    """A student in pinned CPU memory (FSDP2 with CPU offload), swapped while an upload of it is queued on the GPU:
    the swap must let the upload read the student's values before it writes the EMA's there."""
    _needs_cuda(device)
    student = _pinned(nn.Linear(1024, 1024))
    ema = ModelEMA(student)
    _bump(named_tensors(student).values())  # on the CPU, at once: the student now differs from its EMA
    own = _snapshot(student)
    uploads = {name: torch.empty_like(tensor, device=device) for name, tensor in own.items()}
    # From pinned memory the copy engine reads the source when the copy runs, after the queued work: as FSDP2's
    # uploads of offloaded shards before a forward.
    sources = {name: tensor.detach() for name, tensor in named_tensors(student).items()}
    _behind_queued_work(lambda: [uploads[name].copy_(sources[name], non_blocking=True) for name in uploads])
    with ema.swapped():
        torch.cuda.synchronize(device)  # the uploads run now, reading whatever the student's memory holds
    _assert_same_bits(uploads, own, "uploads of the student queued before the swap")
    _assert_same_bits(named_tensors(student), own, "the student after the swap")
    return {"elements": sum(t.numel() for t in own.values()), "queued uploads read": "the student's values"}


def _trained_beside(device: torch.device, ema_device: str | None, dtype: torch.dtype, steps: int) -> dict[str, Any]:
    """One student trained with SGD and two EMAs of it, one synchronous and one asynchronous: both must hold the
    same bits at the end (tensors, ``state_dict()``) and give the same teacher outputs on the way.

    One student rather than two trained alike: its backward passes need not be deterministic. The teacher runs
    on every other step only, so that on the others the optimiser's step pre-hook alone orders the step after the
    asynchronous update's reads of the student.
    """
    torch.manual_seed(0)
    student = _convnet().to(device, dtype)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    emas = [
        ModelEMA(student, "update", momentum=0.25, device=ema_device, asynchronous=asynchronous)
        for asynchronous in (False, True)
    ]
    teacher_device = torch.device(ema_device) if ema_device is not None else device
    batches = [torch.randn(8, 3, 16, 16, device=device, dtype=dtype) for _ in range(steps)]
    outputs: list[list[Tensor]] = [[], []]
    for step, batch in enumerate(batches):
        student(batch).float().square().mean().backward()
        if step % 2:
            with torch.no_grad():
                for ema, found in zip(emas, outputs, strict=True):
                    found.append(ema.ema_model(batch.to(teacher_device)))
        optimizer.step()
        optimizer.zero_grad()
        for ema in emas:
            ema.update()
    plain, beside = emas
    beside.wait()  # before reading its tensors directly
    _assert_same_bits(named_tensors(beside.ema_model), named_tensors(plain.ema_model), "the asynchronous EMA model")
    _assert_same_bits(beside.state_dict()["tensors"], plain.state_dict()["tensors"], "the asynchronous state_dict()")
    assert beside.num_averaged == plain.num_averaged == steps, (beside.num_averaged, plain.num_averaged)
    probe = torch.randn(8, 3, 16, 16, dtype=dtype, device=teacher_device)
    with torch.no_grad():
        outputs[0].append(plain.ema_model(probe))
        outputs[1].append(beside.ema_model(probe))
    teachers = [{str(i): out for i, out in enumerate(found)} for found in outputs]
    _assert_same_bits(teachers[1], teachers[0], "the asynchronous teacher's output")
    return {"steps": steps, "teacher forward passes compared": len(outputs[0])}


def _raced_step(device: torch.device, ema_device: str | None, dtype: torch.dtype, other_stream: bool) -> None:
    """``update(1.0)`` started while ~70 ms of GPU work holds back its reads of the student, then an optimiser step
    that writes the student: its step pre-hook must order the write after those reads, and the EMA must hold the
    student's values from before the step, bit for bit.

    With ``other_stream`` the step runs on a second stream, which the queued work does not hold back: without
    the hook its write lands ~70 ms before the EMA's reads, every time. On the same stream both wait for the
    queued work, and only the hook keeps them in order once it is done.
    """
    student = nn.Linear(WIDTH, WIDTH, device=device, dtype=dtype)
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    ema = ModelEMA(student, device=ema_device, asynchronous=True)
    ema.update(1.0)  # the staging memory, the side stream and the step hook are made here, not in the race
    ema.wait()
    for param in student.parameters():
        param.grad = torch.ones_like(param)
    before = _snapshot(student)
    torch.cuda.synchronize(device)  # the gradients are ready for a step on any stream
    torch.cuda._sleep(SLEEP_CYCLES)  # type: ignore[no-untyped-call]
    ema.update(1.0)  # its reads of the student wait for the queued work
    writer = torch.cuda.current_stream(device)
    if other_stream:
        writer = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    with torch.cuda.stream(writer):
        optimizer.step()
    if torch.cuda.current_stream(device).query():
        raise AssertionError("the GPU finished its queued work at once, so the race did not happen: raise SLEEP_CYCLES")
    if writer.query():
        raise AssertionError("the optimiser's step ran before the asynchronous EMA had read the student")
    ema.wait()
    torch.cuda.synchronize(device)
    _assert_same_bits(named_tensors(ema.ema_model), before, "the EMA after a step raced against its update")
    _assert_same_bits(named_tensors(student), {n: t - 1 for n, t in before.items()}, "the student after the step")


def check_async_bit_identical(device: torch.device) -> dict[str, Any]:
    """Asynchronous updates equal synchronous ones bit for bit: on the same device (a side stream) and with
    ``device="cpu"`` (copies through pinned memory, averaged by a worker thread), fp32 and bf16 students; in a short
    training run, and with the optimiser's step raced against the update's reads of the student."""
    _needs_cuda(device)
    results: dict[str, Any] = {}
    with _deterministic_cudnn():
        for ema_device in (None, "cpu"):
            where = "device='cpu'" if ema_device else "same device"
            for dtype in (torch.float32, torch.bfloat16):
                name = str(dtype).removeprefix("torch.")
                results[f"training, {where}, {name}"] = _trained_beside(device, ema_device, dtype, steps=6)
                for other_stream in (False, True):
                    _raced_step(device, ema_device, dtype, other_stream)
                results[f"raced step, {where}, {name}"] = "the student's values from before the step, bit for bit"
    return results


def check_async_wait_orders_readers(device: torch.device) -> dict[str, Any]:
    """``wait()`` orders the caller's stream after an asynchronous same-device update's writes, also when the
    optimiser's step pre-hook has already released the student on another stream (an optimiser run on a stream of
    its own, say): the EMA read on the default stream right after ``wait()`` must hold the update's values.

    The update is started on a third stream behind ~70 ms of queued work, so its kernels wait for that work and a
    read not ordered after them runs first, every time.
    """
    _needs_cuda(device)
    student = nn.Linear(WIDTH, WIDTH, device=device)
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    ema = ModelEMA(student, asynchronous=True)
    ema.update(1.0)  # the side stream, its events and the step hook are made here, not in the race
    ema.wait()
    _bump(student.parameters())  # the student now differs from its EMA
    expected = _snapshot(student)  # what update(1.0) must give
    for param in student.parameters():
        param.grad = torch.ones_like(param)
    held = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    writer = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    torch.cuda.synchronize(device)
    with torch.cuda.stream(held):
        torch.cuda._sleep(SLEEP_CYCLES)  # type: ignore[no-untyped-call]
        ema.update(1.0)  # its kernels wait for the queued work
    with torch.cuda.stream(writer):
        optimizer.step()  # the step hook makes `writer` wait for the update's reads of the student
    ema.wait()  # on the default stream
    found = _snapshot(ema.ema_model)  # queued on the default stream at once: after the update, if wait() ordered it
    if held.query():
        raise AssertionError("the GPU finished its queued work at once, so the race did not happen: raise SLEEP_CYCLES")
    torch.cuda.synchronize(device)
    _assert_same_bits(found, expected, "the EMA read on the default stream right after wait()")
    return {"EMA read right after wait()": "the update's values, bit for bit"}


def check_syncs_same_device(device: torch.device) -> dict[str, Any]:
    """No host synchronisation in an update with the EMA beside the student, float32 or bf16 (float32 shadows)."""
    _needs_cuda(device)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        student = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256)).to(device, dtype)
        ema = ModelEMA(student)
        ema.update(0.1)
        found[str(dtype)] = syncs = _host_syncs(partial(_updates, ema, UPDATES))
        assert syncs == 0, f"{syncs} host synchronisations in {UPDATES} same-device {dtype} updates"
    return {f"host synchronisations in {UPDATES} updates": found}


def _updates_and_steps(ema: ModelEMA, optimizer: torch.optim.Optimizer, count: int) -> None:
    for _ in range(count):
        ema.update(0.1)
        optimizer.step()  # its pre-hook orders the step after the update's reads
    ema.wait()


def _steps(optimizer: torch.optim.Optimizer, count: int) -> None:
    for _ in range(count):
        optimizer.step()


def check_syncs_asynchronous(device: torch.device) -> dict[str, Any]:
    """No host synchronisation in an asynchronous same-device update, float32 or bf16: nor in the optimiser's wait
    for it (its step pre-hook), nor in ``wait()``; the syncs the optimiser makes on its own are subtracted."""
    _needs_cuda(device)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        student = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256)).to(device, dtype)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        for param in student.parameters():
            param.grad = torch.ones_like(param)
        ema = ModelEMA(student, "update", asynchronous=True)
        _updates_and_steps(ema, optimizer, 1)  # the side stream, its events and the step hook are made here
        alone = _host_syncs(partial(_steps, optimizer, UPDATES))
        syncs = _host_syncs(partial(_updates_and_steps, ema, optimizer, UPDATES)) - alone
        found[str(dtype)] = syncs
        assert syncs == 0, f"{syncs} host synchronisations in {UPDATES} asynchronous same-device {dtype} updates"
    return {f"host synchronisations in {UPDATES} updates, steps and a wait, less the steps'": found}


def check_syncs_cross_device(device: torch.device) -> dict[str, Any]:
    """An EMA on the CPU waits for its copies off the GPU once per group of pairs, not per tensor and not never."""
    _needs_cuda(device)
    student = nn.Sequential(
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Linear(256, 256).to(torch.bfloat16), nn.Linear(256, 256)
    ).to(device)
    ema = ModelEMA(student, device="cpu")
    ema.update(0.1)
    # The pairs group by the dtypes on both sides: the averaged parameters in two groups (float32, bf16 into
    # float32 shadows), the copied buffers in two (float32 statistics, the int64 count).
    groups = len({p.dtype for p in student.parameters()}) + len({b.dtype for b in student.buffers()})
    syncs = _host_syncs(partial(_updates, ema, UPDATES))
    assert syncs == groups * UPDATES, f"{syncs} host synchronisations in {UPDATES} updates, expected {groups} each"
    return {"tensors": len(named_tensors(student)), "groups": groups, f"host synchronisations in {UPDATES}": syncs}


def check_memory_construction(device: torch.device) -> dict[str, Any]:
    """``device="cpu"`` copies the student straight to the CPU: no second model on the GPU, even for a moment."""
    _needs_cuda(device)
    student = nn.Linear(WIDTH, WIDTH, device=device)
    model_bytes = sum(t.numel() * t.element_size() for t in named_tensors(student).values())
    with _peak_extra(device) as peak:
        ema = ModelEMA(student, device="cpu")
    assert all(t.device.type == "cpu" for t in named_tensors(ema.ema_model).values())
    _assert_same_bits(named_tensors(ema.ema_model), named_tensors(student), "the EMA model as built")
    assert peak[0] <= SLACK_BYTES, f"building a CPU EMA took {peak[0]} B of device memory; the model is {model_bytes} B"
    return {"peak extra device memory B": peak[0], "model B": model_bytes}


def check_model_state_dict(device: torch.device) -> dict[str, Any]:
    """``model_state_dict()`` of a float32 EMA: references to the EMA's tensors, no device copy."""
    student = nn.Linear(WIDTH, WIDTH, device=device)
    ema = ModelEMA(student)
    _bump(student.parameters())
    ema.update(0.5)  # the EMA differs from the student
    if device.type == "cuda":
        with _peak_extra(device) as peak:
            exported = ema.model_state_dict()
    else:
        exported, peak = ema.model_state_dict(), []
    own = ema.ema_model.state_dict()
    assert exported.keys() == own.keys(), (list(exported), list(own))
    _assert_same_bits(exported, own, "model_state_dict()")
    copied = [k for k, t in exported.items() if t.data_ptr() != own[k].data_ptr()]
    assert not copied, f"model_state_dict() copied {copied}: references were due"
    result: dict[str, Any] = {"tensors": len(exported), "references": "all"}
    if peak:
        assert peak[0] <= SLACK_BYTES, f"model_state_dict() took {peak[0]} B of device memory"
        result["peak extra device memory B"] = peak[0]
    return result


def check_async_step_overhead(device: torch.device) -> dict[str, Any]:
    """What an EMA adds to a training step of tens of ms: a bf16 stack of ``STEP_LAYERS`` TransformerEncoder layers
    of width ``STEP_WIDTH`` (~100M parameters, float32 shadows), AdamW, ``STEP_BATCH`` sequences x tokens.

    Side by side: no EMA (before and after the EMAs on the GPU, their mean the baseline), an EMA on the GPU
    updated synchronously and asynchronously, and one on the CPU (``device="cpu"``) updated at every step and at
    every ``SPARSE_EVERY``-th, synchronously and asynchronously. Each time runs from a synchronised GPU to the end of
    the last update (``wait()``), over whole periods of updates.
    """
    _needs_cuda(device)
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        STEP_WIDTH, 16, 4 * STEP_WIDTH, dropout=0.0, batch_first=True, device=device, dtype=torch.bfloat16
    )
    model = nn.TransformerEncoder(layer, num_layers=STEP_LAYERS, enable_nested_tensor=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = torch.randn(*STEP_BATCH, STEP_WIDTH, device=device, dtype=torch.bfloat16)

    def step_ms(ema: ModelEMA | None, every: int, steps: int) -> float:
        def step(index: int) -> None:
            model(batch).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None and (index + 1) % every == 0:
                ema.update(2e-4)

        for index in range(3):  # warm-up
            step(index)
        if ema is not None:
            ema.wait()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for index in range(steps):
            step(index)
        if ema is not None:
            ema.wait()
        torch.cuda.synchronize(device)
        return 1e3 * (time.perf_counter() - start) / steps

    def with_ema(where: str | None, every: int, asynchronous: bool) -> tuple[str, float]:
        ema = ModelEMA(model, device=where, asynchronous=asynchronous)
        ema.update(2e-4)  # scratch and pinned staging memory are taken here, not in the timed steps
        ema.wait()
        label = f"EMA on the {'CPU' if where else 'GPU'}, every {every} step(s), "
        # One update in a sparse EMA's timed steps; several in an every-step one's.
        steps = every if every > 1 else TIMED_STEPS
        return label + ("asynchronous" if asynchronous else "synchronous"), step_ms(ema, every, steps)

    # The EMAs beside the student between two runs without: the ratios closest to 1 are measured side by side.
    before = step_ms(None, 1, TIMED_STEPS)
    timed = dict(with_ema(None, 1, asynchronous) for asynchronous in (False, True))
    after = step_ms(None, 1, TIMED_STEPS)
    timed |= dict(with_ema("cpu", every, asynchronous) for every in (1, SPARSE_EVERY) for asynchronous in (False, True))
    baseline = (before + after) / 2
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "no EMA, ms per step (before, after)": (before, after),
        **{label: {"ms per step": ms, "x no EMA": ms / baseline} for label, ms in timed.items()},
    }


def check_fsdp2_state_dict(device: torch.device) -> dict[str, Any]:
    """A sharded EMA's ``state_dict()`` on one GPU under NCCL: whole tensors on the CPU, gathered one at a time."""
    _needs_cuda(device)
    with _nccl_group(device):
        mesh = init_device_mesh("cuda", (1,))
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(4)]).to(device)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ema = ModelEMA(model)
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values()), "fully_shard left a parameter unsharded"
        expected = {name: cast(DTensor, param).full_tensor().cpu() for name, param in params.items()}
        largest = max(t.numel() * t.element_size() for t in expected.values())
        with _peak_extra(device) as peak:
            state = ema.state_dict()
        tensors = state["tensors"]
        on_device = [n for n, t in tensors.items() if t.device.type != "cpu"]
        assert not on_device, f"state_dict() kept {on_device} on the device: whole tensors belong on the CPU"
        _assert_same_bits(tensors, expected, "state_dict() of the sharded EMA")
        assert peak[0] <= largest + SLACK_BYTES, f"state_dict() peaked at {peak[0]} B, largest tensor {largest} B"
    return {"tensors": len(tensors), "peak extra device memory B": peak[0], "largest tensor B": largest}


def check_nccl_cpu_ema(device: torch.device) -> dict[str, Any]:
    """A CPU EMA beside an NCCL group (which reduces CUDA tensors only): ``sync_buffers="update"`` runs, and the
    buffers it averages over ranks go through the group."""
    _needs_cuda(device)
    with _nccl_group(device):
        model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)).to(device)
        handler = EMAHandler(
            model, momentum=0.5, handle_buffers="update", device="cpu", sync_buffers="update", skip_nonfinite=True
        )
        trainer = Engine(lambda e, b: model(torch.randn(8, 16, device=device)))
        handler.attach(trainer)
        trainer.run(range(4), max_epochs=1)
        # With one process the handler's average is a no-op (and NCCL takes one process per GPU), so the buffers
        # that average would reduce are packed as it packs them and reduced through this group, as with more ranks.
        buffers = [b for b in handler.ema_model.buffers() if b.is_floating_point()]
        before = [b.clone() for b in buffers]
        reduced = 0
        with torch.no_grad():
            for members, flat, views in RankAverage(buffers)._pack():
                torch._foreach_copy_(views, members)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                torch._foreach_copy_(members, views)
                reduced += flat.numel()
        for kept, now in zip(before, buffers, strict=True):
            assert torch.equal(kept, now), "the sum over one rank changed the buffers"
    return {"updates": trainer.state.iteration, "buffer elements reduced": reduced}


def check_device_index(device: torch.device) -> dict[str, Any]:
    """``device="cuda"`` means the student's GPU: checked on another GPU than the current one when there are two."""
    _needs_cuda(device)
    current = torch.device("cuda", torch.cuda.current_device())
    student = nn.Linear(8, 8).to(current)
    placed = ModelEMA(student, device="cuda").ema_model.weight.device
    assert placed == current, f"device='cuda' put the EMA of a student on {current} on {placed}"
    result: dict[str, Any] = {"student on the current GPU": str(placed)}
    if torch.cuda.device_count() < 2:
        result["student on another GPU"] = "skipped: one GPU"
        return result
    other = torch.device("cuda", (current.index + 1) % torch.cuda.device_count())
    placed = ModelEMA(nn.Linear(8, 8).to(other), device="cuda").ema_model.weight.device
    assert placed == other, f"device='cuda' put the EMA of a student on {other} on {placed} (the current GPU)"
    result["student on another GPU"] = str(placed)
    return result


def _tidy(device: torch.device) -> str | None:
    """Leave nothing behind for the next check; say what was left, if anything."""
    left = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        left = "a process group was left initialised"
    if device.type == "cuda":  # what the next check measures starts from what this one held
        gc.collect()
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return left


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--models", nargs="+", default=[m.key for m in MODELS], help="models for the floor and launch checks"
    )
    parser.add_argument("--only", nargs="+", default=[], help="run only the checks whose names contain one of these")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu, or on a machine with a GPU")
        return 2
    if device.type == "cuda":
        # One indexed device, and the current one: the queued work of the races runs on the current device's stream.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "bf16 shadows": partial(check_bf16, device),
        "swap": partial(check_swap, device),
        "CPU EMA of a CUDA student": partial(check_cpu_ema_of_a_cuda_student, device),
        "skip_nonfinite": partial(check_skip_nonfinite, device),
        "update against the floor": partial(check_floor, device, args.models),
        "update_vs_floor: fp32 and bf16 against the bandwidth floor": partial(
            check_update_vs_floor, device, args.models
        ),
        "launches_per_update: on the GPU, per update": partial(check_launches_per_update, device, args.models),
        "race: fp32 student, device=cpu": partial(check_race_cpu_ema, device, torch.float32),
        "race: bf16 student, device=cpu": partial(check_race_cpu_ema, device, torch.bfloat16),
        "race: copied buffers into a pinned EMA model": partial(check_race_copied_buffers, device),
        "race: update into a pinned EMA model": partial(check_race_pinned_ema_model, device),
        "race: copy_student into a pinned EMA model": partial(check_race_copy_student, device),
        "race: swap with a CPU EMA": partial(check_race_swap_cpu_ema, device),
        "race: swap of a pinned student": partial(check_race_swap_pinned_student, device),
        "async_bit_identical: side stream and pinned pipeline": partial(check_async_bit_identical, device),
        "async_wait_orders_readers: wait() after a step on another stream": partial(
            check_async_wait_orders_readers, device
        ),
        "host syncs: same-device update": partial(check_syncs_same_device, device),
        "host syncs: asynchronous same-device update": partial(check_syncs_asynchronous, device),
        "host syncs: cross-device update": partial(check_syncs_cross_device, device),
        "memory: construction with device=cpu": partial(check_memory_construction, device),
        "memory: model_state_dict": partial(check_model_state_dict, device),
        "memory: FSDP2 state_dict on one GPU": partial(check_fsdp2_state_dict, device),
        "async_step_overhead: a transformer's training step": partial(check_async_step_overhead, device),
        "NCCL group, CPU EMA, sync_buffers": partial(check_nccl_cpu_ema, device),
        "device='cuda' index": partial(check_device_index, device),
    }
    if args.only:
        checks = {k: v for k, v in checks.items() if any(w.lower() in k.lower() for w in args.only)}
    summary: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            result, status = check(), "ok"
        except Skipped as why:
            result, status = {"skipped": str(why)}, "skip"
        except Exception as error:  # any error is this check's failure; the next check runs
            result, status = {"failed": repr(error)}, "FAIL"
        try:
            left = _tidy(device)
        except Exception as error:
            left = f"cleaning up after it: {error!r}"
        if left is not None and status != "FAIL":
            result, status = {**result, "failed": left}, "FAIL"
        seconds = time.perf_counter() - start
        counts[{"ok": "ok", "skip": "skipped", "FAIL": "failed"}[status]] += 1
        results[name] = {"seconds": round(seconds, 3), **result}
        print(f"{status:<6}{name} ({seconds:.2f} s): {result}", flush=True)
    summary["checks"] = results
    summary["counts"] = counts
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, indent=2, default=str))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
