"""The checks and the update benchmark on a CUDA device, in one short script: ``python -m benchmarks.gpu_check``.

What a CPU machine cannot show, each check asserting its result against a
closed form or a plain-loop reference and printing its figures:

1. bf16 students on the device: float32 shadows keep an EMA with momentum 2e-4 moving;
2. the swap on the device: bit-exact in and out, its time, and the peak extra
   device memory against the largest tensor;
3. an EMA kept on the CPU for a CUDA student (the cross-device update path);
4. ``skip_nonfinite``: a NaN skipped on the device, and what its host
   synchronisation costs per update;
5. the update against the floor (one ``lerp_`` over a flat buffer of as many
   elements), timed with CUDA events, on the benchmark models.

``--device cpu`` runs the same checks on the CPU (the cross-device one is then
skipped), which the test suite does to keep this script working. It prints one
line per check and a JSON summary; it exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from benchmarks.measure import mean_call_seconds
from benchmarks.models import MODELS, describe
from benchmarks.swap_bench import swap_once
from ignite_ema import EMAHandler, ModelEMA, named_tensors


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Mean microseconds per call: CUDA events on a GPU, the wall clock elsewhere."""
    fn()
    _synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return 1000.0 * start.elapsed_time(end) / calls
    return 1e6 * mean_call_seconds(fn, calls)


def check_bf16(device: torch.device) -> dict[str, Any]:
    model = nn.Linear(256, 256, bias=False).to(device, torch.bfloat16)
    nn.init.zeros_(model.weight)
    handler = EMAHandler(model, momentum=2e-4)
    nn.init.ones_(model.weight)
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    trainer.run(range(3000), max_epochs=1)
    assert handler.ema_model is not None
    expected = 1 - (1 - 2e-4) ** 3000
    found = handler.ema_model.weight.float().mean().item()
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
    assert ema.ema_model is not None
    averaged = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    largest = max(t.numel() * t.element_size() for t in named_tensors(model).values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with ema.swapped():
        for name, value in averaged.items():
            assert torch.equal(model.state_dict()[name], value), name
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    for name, value in own.items():
        assert torch.equal(model.state_dict()[name], value), name

    result: dict[str, Any] = {
        "swap in and out, us": _time_us(partial(swap_once, ema), device, 10),
        "largest tensor B": largest,
    }
    if peak is not None:
        assert peak <= largest, (peak, largest)
        result["peak extra device memory B"] = peak
    return result


def check_cpu_ema_of_a_cuda_student(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "needs a CUDA device"}
    model = nn.Linear(64, 64).to(device)
    handler = EMAHandler(model, momentum=0.25, device="cpu")
    assert handler.ema_model is not None
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
    t_skip = _time_us(lambda: skipping.nonfinite_student() or skipping.update(1e-3), device, calls)
    with torch.no_grad():
        model[3].bias[7] = float("nan")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--models", nargs="+", default=[m.key for m in MODELS], help="models for the floor check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu, or on a machine with a GPU")
        return 2
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "bf16 shadows": lambda: check_bf16(device),
        "swap": lambda: check_swap(device),
        "CPU EMA of a CUDA student": lambda: check_cpu_ema_of_a_cuda_student(device),
        "skip_nonfinite": lambda: check_skip_nonfinite(device),
        "update against the floor": lambda: check_floor(device, args.models),
    }
    summary: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    failed = 0
    for name, check in checks.items():
        try:
            summary[name] = check()
            print(f"ok    {name}: {summary[name]}")
        except AssertionError as error:
            failed += 1
            summary[name] = {"failed": repr(error)}
            print(f"FAIL  {name}: {error!r}")
    print(json.dumps(summary, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
