"""What the EMA needs to know about modules: wrappers, tensors by name, a copy placed on a device, and the checks of
a module the caller builds.

Nothing here holds state: :class:`~ignite_ema.ModelEMA` calls these while it is built and when it looks its
student up again.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ignite_ema._checks import check_same_shapes
from ignite_ema.distributed import local, sharding_mismatch

__all__ = [
    "check_caller_ema_model",
    "check_initialised",
    "copy_module",
    "excluded_names",
    "named_tensors",
    "unwrap_model",
    "wait_for_host_reads",
    "with_index",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel, DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner  # torch.compile's OptimizedModule
        else:
            return model


def named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters then buffers, by name, each shared tensor once (tied weights are averaged once)."""
    tensors: dict[str, Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def excluded_names(exclude: object, student: Mapping[str, Tensor]) -> set[str]:
    """The names of ``student`` that ``exclude``'s names or ``fnmatch`` patterns match; each must match one."""
    patterns = [exclude] if isinstance(exclude, str) else exclude
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"exclude must be a name or pattern, or a sequence of them; found {exclude!r}")
    matched: set[str] = set()
    for pattern in patterns:
        names = fnmatch.filter(student, pattern)
        if not names:
            raise ValueError(
                f"exclude pattern {pattern!r} matches none of the model's tensors (such as "
                f"{', '.join(list(student)[:3])}): a typo would average what was meant to be copied"
            )
        matched.update(names)
    return matched


def with_index(requested: torch.device, student: torch.device) -> torch.device:
    """``requested`` with a device index: the student's where both are of one type (``"cuda"`` for a student on
    ``cuda:3`` is ``cuda:3``, on every rank of a job that never called ``set_device``), else the current one."""
    if requested.index is not None or requested.type == "cpu":
        return requested
    if student.type == requested.type and student.index is not None:
        return student
    module = getattr(torch, requested.type, None)
    current = getattr(module, "current_device", None)
    return torch.device(requested.type, current()) if callable(current) else requested


def copy_module(model: nn.Module, device: torch.device | None) -> nn.Module:
    """A deep copy of ``model``; with ``device``, its tensors are copied straight there.

    ``deepcopy`` then ``.to(device)`` would first copy every tensor on the
    student's device: a whole extra model of GPU memory for an EMA kept on the
    CPU because the model barely fits. Here each parameter and buffer is copied
    once, to ``device``, and ``deepcopy`` reuses these copies (its memo) while it
    copies the rest of the module; tied tensors stay tied.
    """
    if device is None:
        return deepcopy(model)
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            copied = tensor.detach().to(device, copy=True)
            is_param = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(copied, requires_grad=tensor.requires_grad) if is_param else copied
    return deepcopy(model, memo)


def wait_for_host_reads(tensors: Iterable[Tensor]) -> None:
    """Before writing pinned host tensors (an FSDP2 student offloaded to the CPU), wait for the device copies that
    may still be reading them: a host-to-device copy from pinned memory runs after the call that queued it."""
    if torch.cuda.is_initialized() and any(t.device.type == "cpu" and t.is_pinned() for t in tensors):  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def check_initialised(module: nn.Module, what: str) -> None:
    for name, sub in module.named_modules():
        if _is_uninitialised(sub):
            where = f"'{name}'" if name else f"the {what} itself"
            raise ValueError(
                f"{what} has a lazy module that is not initialised yet ({where}, {type(sub).__name__}): its shapes "
                "are known only after a first forward pass. Run one batch through the model before building the EMA"
            )


def _is_uninitialised(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and bool(module.has_uninitialized_params())


def check_caller_ema_model(student_module: nn.Module, ema_model: nn.Module, student: Mapping[str, Tensor]) -> None:
    """A caller's EMA model must be a separate module with the student's names and shapes, and fitting dtypes."""
    if ema_model is student_module:
        raise ValueError("ema_model is the student itself: pass a separate module (a second instance of the model)")
    ema = named_tensors(ema_model)
    check_same_shapes(
        {n: t.shape for n, t in student.items()},
        {n: t.shape for n, t in ema.items()},
        "ema_model",
        hint="ema_model must be built like the student (wrappers are unwrapped on both)",
        reference="the student",
    )
    storages = {local(t).untyped_storage().data_ptr(): n for n, t in student.items() if t.numel() > 0}
    for name, tensor in ema.items():
        pointer = local(tensor).untyped_storage().data_ptr()
        if tensor.numel() > 0 and pointer in storages:
            raise ValueError(
                f"ema_model's tensor '{name}' shares storage with the student's '{storages[pointer]}': the EMA would "
                "overwrite the student. Pass a module with tensors of its own (copy.deepcopy(student), or a second "
                "instance)"
            )
        want = student[name].dtype
        if tensor.dtype != want and not _holds(tensor.dtype, want):
            raise ValueError(
                f"ema_model's tensor '{name}' is {tensor.dtype}, the student's is {want}: an EMA model must have the "
                "student's dtypes or wider floating ones (a float32 EMA of a bf16 student, say)"
            )
        mismatch = sharding_mismatch(student[name], tensor)
        if mismatch is not None:
            raise ValueError(
                f"ema_model's tensor '{name}' is not sharded like the student's: {mismatch}. Shard ema_model as the "
                "student (the same fully_shard calls on the same mesh) so that each rank averages its own shards"
            )


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether ``wide`` is a floating (or complex) dtype that represents every ``narrow`` value."""
    floating = (wide.is_floating_point or wide.is_complex) and (narrow.is_floating_point or narrow.is_complex)
    return floating and torch.promote_types(wide, narrow) == wide
