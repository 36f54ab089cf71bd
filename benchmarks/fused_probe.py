"""What a fused single-pass bf16 update would give, and what it would cost: ``python -m benchmarks.fused_probe``.

Not a feature of the package: a probe for the fused update that issue 21 asks for. ``torch.compile`` (inductor) of
the whole update of a bf16 student, ``shadow.lerp_(student.float(), w); mirror.copy_(shadow)`` for every tensor in
one function, with the momentum a 0-dim tensor so that a schedule does not recompile: the compile time of the first
call, then the time per update against the floor (one float32 ``lerp_`` over as many elements: 12 bytes each) and
against ``ModelEMA.update`` of the same model, side by side. One thread, the models of ``benchmarks.models``
chosen with ``--models`` (default: (a) and (b); (c)'s 1,200 tensors take many minutes to compile).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from benchmarks.measure import calls_for, interleaved, mean_call_seconds, median, use_cpu_clock
from benchmarks.models import MODELS
from benchmarks.report import paired_ratio, print_table
from ignite_ema import ModelEMA

MOMENTUM = 2e-4


@torch.no_grad()
def fused_update(shadows: list[Tensor], students: list[Tensor], mirrors: list[Tensor], weight: Tensor) -> None:
    for shadow, student, mirror in zip(shadows, students, mirrors, strict=True):
        shadow.lerp_(student.float(), weight)
        mirror.copy_(shadow)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=[m.key for m in MODELS], default=["conv", "transformer"])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    use_cpu_clock(True)
    rows = []
    for spec in (m for m in MODELS if m.key in args.models):
        torch.manual_seed(0)
        student = spec.build().to(torch.bfloat16)
        ema = ModelEMA(student)
        students = [p.detach() for p in student.parameters()]
        shadows, mirrors = [p.float() for p in students], [p.clone() for p in students]
        weight = torch.tensor(MOMENTUM)
        compiled = torch.compile(fused_update, fullgraph=True)
        start = time.perf_counter()
        compiled(shadows, students, mirrors, weight)
        compile_s = time.perf_counter() - start
        elements = sum(s.numel() for s in shadows)
        flat, ones = torch.zeros(elements), torch.ones(elements)
        calls: dict[str, Callable[[], object]] = {
            "floor": partial(flat.lerp_, ones, MOMENTUM),
            "compiled": partial(compiled, shadows, students, mirrors, weight),
            "ModelEMA": partial(ema.update, MOMENTUM),
        }
        runs = {name: partial(mean_call_seconds, fn, calls_for(fn)) for name, fn in calls.items()}
        times = interleaved(runs, args.rounds)
        rows.append(
            [
                f"{spec.title} ({len(students)} tensors)",
                round(compile_s, 1),
                round(1e3 * median(times["compiled"]), 2),
                paired_ratio(times["compiled"], times["floor"]),
                paired_ratio(times["ModelEMA"], times["floor"]),
            ]
        )
    print_table(
        "bf16 update, torch.compile'd single pass against the floor and ModelEMA.update (x floor)",
        ["model", "compile s", "compiled ms", "compiled x floor", "ModelEMA x floor"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
