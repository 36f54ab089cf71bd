"""What needs ranks: averaging tensors over them and agreeing on a flag, through ``torch.distributed``.

Every function is a no-op (or the local answer) without an initialised
process group or with one process, so single-process code can call them
unconditionally. Each one that communicates is a collective: call it on every
rank at the same point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

__all__ = ["RankAverage", "any_rank", "world_size"]


def world_size() -> int:
    """Processes in the default group, 1 without ``torch.distributed``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on at least one rank (one all-reduce of one number on ``device``)."""
    if world_size() == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return bool(votes.item() > 0)


class RankAverage:
    """Set fixed tensors to their mean over the ranks: one all-reduce per (device, dtype) group.

    The tensors are packed into one flat buffer per group, allocated at the
    first call, so an average is one copy in, one collective, one division and
    one copy out per group, whatever the number of tensors. Every rank ends
    with the same bits: the reduced sum is the same everywhere, and so is its
    division.

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
            flat = torch.empty(sum(t.numel() for t in tensors), device=device, dtype=dtype)
            views = [
                v.view_as(t) for v, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors, strict=True)
            ]
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
            torch._foreach_copy_(members, views)
