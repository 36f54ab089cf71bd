"""Where the EMA's tensors live and how they move, as far as a CPU can show it.

The GPU itself is exercised by ``benchmarks/gpu_check.py`` (races made
deterministic, host synchronisations and peak memory counted); these tests
pin down the decisions that script relies on: which copies wait, that staging
memory is allocated once, which device a collective runs on, which index
``device="cuda"`` means, that a copy placed elsewhere never passes through
the student's device, and that giving the student back after a swap
allocates nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ignite_ema import ModelEMA
from ignite_ema.averaging import ShadowAverager, TensorCopier, Transfer
from ignite_ema.distributed import collective_device, device_types_of
from ignite_ema.modules import copy_module, with_index
from tests.helpers import BNNet

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("source", "target", "pinned", "expected"),
    [
        # A copy off a GPU lands later: asynchronous into pinned memory, then one wait on the source's stream.
        (CUDA0, CPU, False, Transfer(non_blocking=True, wait_on=CUDA0)),
        # Onto a GPU from pageable memory: staged before the call returns, and the stream orders the kernels after it.
        (CPU, CUDA1, False, Transfer(non_blocking=True, wait_on=None)),
        # From pinned memory the DMA reads the source later, while the host may already write it: blocking.
        (CPU, CUDA1, True, Transfer(non_blocking=False, wait_on=None)),
        (CUDA0, CUDA1, False, Transfer(non_blocking=True, wait_on=None)),
    ],
)
def test_a_copy_across_devices_has_landed_before_anything_reads_it(
    source: torch.device, target: torch.device, pinned: bool, expected: Transfer
) -> None:
    assert Transfer.between(source, target, pinned) == expected


def test_cross_device_sources_are_staged_in_memory_allocated_once() -> None:
    # "meta" stands for a second device: the cross-device path runs (shapes and dtypes, no values).
    students = [torch.ones(3), torch.ones(2, 2)]
    averager = ShadowAverager([torch.zeros(3, device="meta"), torch.zeros(2, 2, device="meta")], students)
    (group,) = averager._groups
    assert group.transfer == Transfer.between(CPU, torch.device("meta"), pinned_source=False)
    averager.update(0.5)
    staging = group._staging
    assert staging is not None and [t.device.type for t in staging] == ["meta", "meta"]
    averager.update(0.5)
    averager.copy_students()
    assert group._staging is staging and all(a is b for a, b in zip(group._staging, staging, strict=True))
    copier = TensorCopier([torch.zeros(3, device="meta")], [torch.ones(3)])
    copier.copy()  # copies straight into their targets, no staging
    assert copier._groups[0]._staging is None


@pytest.mark.parametrize(
    ("config", "device", "expected"),
    [
        ("gloo", CPU, CPU),
        ("nccl", CPU, torch.device("cuda")),  # an EMA kept on the CPU beside an NCCL group reduces on the GPU
        ("nccl", CUDA1, CUDA1),
        ("cpu:gloo,cuda:nccl", CPU, CPU),
        ("cpu:gloo,cuda:nccl", CUDA0, CUDA0),
        ("gloo", CUDA0, CUDA0),
    ],
)
def test_collectives_run_on_a_device_the_group_reduces_on(
    config: str, device: torch.device, expected: torch.device
) -> None:
    assert collective_device(device, config) == expected


def test_backend_device_types_follow_torch() -> None:
    assert device_types_of("nccl") == {"cuda"}
    assert device_types_of("gloo") == {"cpu", "cuda"}
    assert device_types_of("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    with pytest.raises(RuntimeError, match=r"reduces tensors on \['xpu'\] only, and the EMA is on cpu"):
        collective_device(CPU, "xccl")


@pytest.mark.parametrize(
    ("requested", "student", "expected"),
    [
        (torch.device("cuda"), torch.device("cuda", 3), torch.device("cuda", 3)),  # the student's GPU, not cuda:0
        (torch.device("cuda", 1), torch.device("cuda", 3), torch.device("cuda", 1)),  # an index given is kept
        (CPU, torch.device("cuda", 3), CPU),
    ],
)
def test_a_device_without_index_means_the_students(
    requested: torch.device, student: torch.device, expected: torch.device
) -> None:
    assert with_index(requested, student) == expected


class _NoDeepCopy(nn.Parameter):
    """A parameter that must not be deep-copied: on a GPU, a deep copy is one more model on the student's device."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        raise AssertionError("the student's tensor was deep-copied on its own device")


def test_an_ema_placed_elsewhere_is_copied_straight_there() -> None:
    student = BNNet()
    student.conv.weight = _NoDeepCopy(student.conv.weight.detach().clone())
    student.tied = nn.Linear(4, 2)
    student.tied.weight = student.head.weight  # tied tensors stay tied in the copy
    with pytest.raises(AssertionError, match="deep-copied"):
        ModelEMA(student)  # beside the student: a deep copy, which is right there
    ema = ModelEMA(student, device="cpu")
    copy = ema.ema_model
    assert type(copy.conv.weight) is nn.Parameter and not copy.conv.weight.requires_grad
    assert copy.tied.weight is copy.head.weight and copy.head.weight is not student.head.weight
    for name, tensor in student.state_dict().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
        assert copy.state_dict()[name].data_ptr() != tensor.data_ptr(), name
    assert copy_module(nn.Linear(2, 2), None).weight.requires_grad  # without a device, a plain deep copy


def _allocated_bytes(fn: Any) -> int:
    """Bytes the CPU allocator handed out while ``fn`` ran (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, event.cpu_memory_usage) for event in prof.events())


def test_giving_the_student_back_after_a_swap_allocates_nothing() -> None:
    # All scratch is taken on entry: an out-of-memory error can stop a swap from starting, never from ending.
    student = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    ema = ModelEMA(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    own = {k: v.clone() for k, v in student.state_dict().items()}
    swap = ema.swapped()
    entered = _allocated_bytes(swap.__enter__)
    assert entered >= 64 * 64 * 4  # the scratch of the largest tensor, taken on entry
    assert not torch.equal(student[0].weight, own["0.weight"])
    left = _allocated_bytes(lambda: swap.__exit__(None, None, None))
    assert left == 0
    assert all(torch.equal(student.state_dict()[k], v) for k, v in own.items())
