"""The EMA of an FSDP2 student, on 1 and 2 gloo processes: memory per rank and the cost of an update.

Each rank runs, interleaved round by round in the same (seeded) order so that
the collectives line up:

- ``ignite_ema`` shard-local: ``ModelEMA.update`` on a ``fully_shard``\\ ed
  model (``handle_buffers="update"``), no collective;
- the floor: one bare ``torch._foreach_lerp_`` over the same local shards and
  floating buffers;
- gather per update: each parameter gathered whole (``full_tensor()``) and
  lerped into a whole-size EMA on every rank, which is what an EMA that needs
  the full model at each update pays (Composer's and Lightning's under FSDP).

The timings are wall-clock (the gathers wait on the other rank) and rank 0's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from benchmarks.contenders import MOMENTUM
from benchmarks.measure import Settings, interleaved, mean_call_seconds, median, use_cpu_clock
from benchmarks.models import MODELS
from benchmarks.report import paired_ratio, print_table, us
from ignite_ema import ModelEMA
from ignite_ema._launch import run_on_processes
from ignite_ema.distributed import local, world_size

OURS, FLOOR, GATHER = "ignite_ema shard-local", "floor: _foreach_lerp_ over the local shards", "gather per update"


def _sharded(key: str) -> nn.Module:
    torch.manual_seed(0)
    model = next(spec for spec in MODELS if spec.key == key).build()
    mesh = init_device_mesh("cpu", (world_size(),))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _rank(key: str, rounds: int, calls: int) -> dict[str, Any]:
    use_cpu_clock(False)  # wall clock: the gathers wait on the other rank
    model = _sharded(key)
    ema = ModelEMA(model, handle_buffers="update")
    state = ema.sharded_state_dict()["tensors"]
    ema_bytes = sum(local(t).numel() * t.element_size() for t in state.values())

    params = list(model.parameters())
    students = [local(t) for t in params + [b for b in model.buffers() if b.is_floating_point()]]
    shadows = [s.clone() for s in students]
    whole_ema = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in params]

    @torch.no_grad()
    def floor() -> None:
        torch._foreach_lerp_(shadows, students, MOMENTUM)

    @torch.no_grad()
    def gather() -> None:
        gathered: list[Tensor] = [p.full_tensor() if isinstance(p, DTensor) else p for p in params]
        torch._foreach_lerp_(whole_ema, gathered, MOMENTUM)

    runs = {
        OURS: partial(mean_call_seconds, partial(ema.update, MOMENTUM), calls),
        FLOOR: partial(mean_call_seconds, floor, calls),
        GATHER: partial(mean_call_seconds, gather, max(1, calls // 4)),
    }
    times = interleaved(runs, rounds, warmup=1)
    return {
        "ema_bytes_per_rank": ema_bytes,
        "gather_ema_bytes_per_rank": sum(t.numel() * t.element_size() for t in whole_ema),
        "us": {name: us(median(t)) for name, t in times.items()},
        "x_floor": {name: paired_ratio(t, times[FLOOR]) for name, t in times.items()},
    }


def bench_fsdp(settings: Settings, key: str = "conv") -> dict[str, Any]:
    rounds, calls = (3, 2) if settings.quick else (max(5, settings.rounds // 2), 8)
    results = {}
    for world in (1, 2):
        results[world] = run_on_processes(world, _rank, key, rounds, calls)[0]
    title = next(spec.title for spec in MODELS if spec.key == key)
    return {"title": title, "worlds": results}


def print_fsdp(result: dict[str, Any]) -> None:
    header = ["world", "contender", "us/update", "x floor", "EMA bytes per rank"]
    rows: list[Sequence[object]] = []
    for world, r in result["worlds"].items():
        for name in (OURS, FLOOR, GATHER):
            memory = r["gather_ema_bytes_per_rank"] if name == GATHER else r["ema_bytes_per_rank"]
            rows.append([world, name, r["us"][name], r["x_floor"][name], memory])
    print_table(f"FSDP2 student ({result['title']}, fully_shard per layer, gloo on the CPU)", header, rows)
