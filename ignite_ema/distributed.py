"""What needs ranks, through ``torch.distributed``: averaging over them, agreeing on a flag, sharded tensors.

Every function is a no-op (or the local answer) without an initialised
process group or with one process, so single-process code can call them
unconditionally. Each one that communicates is a collective: call it on every
rank at the same point. Sharded tensors are DTensors (FSDP2's parameters):
the EMA works on each rank's local shard and needs a collective only to
assemble whole tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Placement, distribute_tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ignite_ema.averaging import chunks_in

__all__ = [
    "RankAverage",
    "ShardSpec",
    "all_ranks",
    "any_rank",
    "collective_device",
    "fsdp_modules",
    "is_sharded",
    "local",
    "rank",
    "reshard",
    "sharding_mismatch",
    "world_size",
]


def world_size() -> int:
    """Processes in the default group, 1 without ``torch.distributed``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group, 0 without ``torch.distributed``."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def device_types_of(backend_config: str) -> set[str]:
    """The device types a process group's backends reduce tensors on, from ``dist.get_backend_config()``:
    ``"nccl"`` gives ``{"cuda"}``, ``"cpu:gloo,cuda:nccl"`` gives ``{"cpu", "cuda"}``."""
    types: set[str] = set()
    for entry in backend_config.lower().split(","):
        device_type, _, backend = entry.strip().rpartition(":")
        types.update([device_type] if device_type else dist.Backend.backend_capability.get(backend, ["cpu"]))
    return types


def collective_device(device: torch.device, backend_config: str | None = None) -> torch.device:
    """``device`` if the default group can reduce tensors there, else a device it can: the current CUDA device
    for NCCL (an EMA kept on the CPU beside an NCCL group), the CPU for a CPU-only backend.

    Args:
        device: where the tensors to reduce live.
        backend_config: the group's backends, ``dist.get_backend_config()`` by default.
    """
    types = device_types_of(dist.get_backend_config() if backend_config is None else backend_config)
    if device.type in types:
        return device
    if "cuda" in types:
        return _group_cuda_device()
    if "cpu" in types:
        return torch.device("cpu")
    raise RuntimeError(f"the process group reduces tensors on {sorted(types)} only, and the EMA is on {device}")


def all_ranks(flag: Tensor) -> Tensor:
    """``flag``, a 0-dim bool tensor, and-ed over the ranks: one all-reduce, with no host synchronisation (the
    caller reads the answer when it needs it). ``flag`` itself with one process."""
    if world_size() == 1:
        return flag
    votes = flag.to(device=collective_device(flag.device), dtype=torch.float32).reshape(1)
    dist.all_reduce(votes, op=dist.ReduceOp.MIN)
    return votes[0] > 0


def _group_cuda_device() -> torch.device:
    """The GPU the default group communicates on: the one it was bound to (``init_process_group(device_id=...)``),
    else the current one, as NCCL itself takes it (each rank's ``torch.cuda.set_device``)."""
    group = dist.distributed_c10d._get_default_group() if dist.is_available() and dist.is_initialized() else None
    bound = getattr(group, "bound_device_id", None)
    return bound if isinstance(bound, torch.device) else torch.device("cuda")


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on at least one rank (one all-reduce of one number, on ``device`` if the group
    reduces there)."""
    if world_size() == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], device=collective_device(device))
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return bool(votes.item() > 0)


class RankAverage:
    """Set fixed tensors to their mean over the ranks: one all-reduce per (device, dtype) group.

    The tensors are packed into one flat buffer per group, allocated at the
    first call, so an average is one copy in, one collective, one division and
    one copy out per group, whatever the number of tensors. The buffer lives
    where the group can reduce (:func:`collective_device`: on the GPU for the
    CPU buffers of an EMA beside an NCCL group). Every rank ends with the same
    bits: the reduced sum is the same everywhere, and so is its division.

    Args:
        tensors: the tensors averaged in place (floating ones).
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = [t.detach() for t in tensors]
        self._groups: list[tuple[list[Tensor], Tensor, list[Tensor]]] | None = None

    def _pack(self) -> list[tuple[list[Tensor], Tensor, list[Tensor]]]:
        if not self.tensors:
            return []
        groups = []
        for (device, dtype), ((members,), _) in _group_tensors_by_device_and_dtype([list(self.tensors)]).items():
            tensors = [t for t in members if t is not None]
            flat = torch.empty(sum(t.numel() for t in tensors), device=collective_device(device), dtype=dtype)
            ((_, _, views),) = chunks_in(tensors, flat)  # one chunk: flat holds them all
            groups.append((tensors, flat, views))
        return groups

    @torch.no_grad()
    def __call__(self) -> None:
        """Average now over the default group (a no-op with one process)."""
        world = world_size()
        if world == 1:
            return
        if self._groups is None:
            self._groups = self._pack()
        for members, flat, views in self._groups:
            torch._foreach_copy_(views, members)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            torch._foreach_copy_(members, views)  # blocking: a copy off the device has landed when it returns


# ----------------------------------------------------------------------------- sharded (DTensor) tensors


def is_sharded(tensor: Tensor) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter, say)."""
    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view, without autograd), else the tensor."""
    return tensor.to_local().detach() if is_sharded(tensor) else tensor.detach()


@dataclass(frozen=True)
class ShardSpec:
    """How a DTensor is laid out over its mesh: enough to rebuild it from its local shard, or cut a full tensor.

    Args:
        mesh: the device mesh.
        placements: one placement per mesh dimension (``Shard(0)`` under FSDP2).
        shape, stride: the global shape and stride.
    """

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: DTensor) -> ShardSpec:
        return cls(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))

    def dtensor(self, shard: Tensor) -> DTensor:
        """A DTensor over ``shard`` (no copy), laid out like the original; correct for uneven shards."""
        return DTensor.from_local(
            shard, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def full(self, shard: Tensor) -> Tensor:
        """The whole tensor, assembled from every rank's shard: a collective."""
        return self.dtensor(shard).full_tensor()

    def full_on_cpu(self, shard: Tensor, *, keep: bool) -> Tensor | None:
        """The whole tensor on the CPU if ``keep`` (else ``None``): a collective, after which the device holds no
        whole copy. Call it on every rank, one tensor at a time, so that device memory peaks at one whole tensor."""
        whole = self.full(shard)
        return whole.cpu() if keep else None

    def shard_of(self, full: Tensor, device: torch.device) -> Tensor:
        """This rank's part of a whole tensor that every rank holds (no communication)."""
        return distribute_tensor(full.to(device), self.mesh, self.placements, src_data_rank=None).to_local()

    def describe(self) -> str:
        return f"{list(self.placements)} over {self.mesh}"


def sharding_mismatch(student: Tensor, ema: Tensor) -> str | None:
    """What differs between how two tensors are sharded (``None`` if nothing), in words for an error."""
    if is_sharded(student) and is_sharded(ema):
        mine, theirs = ShardSpec.of(student), ShardSpec.of(ema)
        if mine.mesh != theirs.mesh:
            return f"the student's mesh is {mine.mesh}, ema_model's {theirs.mesh}"
        if mine.placements != theirs.placements:
            return f"the student's placements are {list(mine.placements)}, ema_model's {list(theirs.placements)}"
        return None
    if is_sharded(student):
        return f"it is sharded in the student ({ShardSpec.of(student).describe()}) and not in ema_model"
    if is_sharded(ema):
        return f"it is sharded in ema_model ({ShardSpec.of(ema).describe()}) and not in the student"
    return None


def fsdp_modules(module: nn.Module | None) -> list[FSDPModule]:
    """The submodules of ``module`` that ``fully_shard`` made (none for an unsharded one, or ``None``)."""
    return [] if module is None else [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Sequence[FSDPModule]) -> None:
    """Drop the gathered (unsharded) parameters of FSDP2 modules, so that their next forward gathers the shards.

    After a forward without backward (evaluation, a teacher) FSDP2 keeps the
    root's parameters gathered, and a later forward would reuse them: after
    the EMA writes into the shards, the gathered copies are stale. No
    communication.
    """
    for module in modules:
        module.reshard()
