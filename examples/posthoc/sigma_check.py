"""The width an EMA really has, measured from the weights it gives each iteration of a run.

``python -m examples.posthoc.sigma_check``: a student whose weight vector at
iteration ``t`` is the one-hot vector ``e_t`` makes any EMA's weight vector
the weight it gives each iteration. From those weights, ``sigma_rel`` is
their standard deviation (in iterations) over the run's length. Measured for

- ``PostHocEMA`` (``beta = (1 - delta / t) ** (gamma + 1)``) on an Ignite
  engine, updating every iteration and every 100;
- ema-pytorch's ``KarrasEMA`` (the EMA inside its ``PostHocEMA``), whose
  ``beta = (1 - 1 / (step + 1)) ** (gamma + 1)`` counts calls, not
  iterations, with ``update_every`` 1 and 100 (its default), if ema-pytorch
  can be imported;
- ``EMAHandler(power_warmup=(gamma + 1, 1))``, the power EMA that the example
  trains directly for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import Tensor, nn

from ignite_ema import EMAHandler, PostHocEMA, sigma_rel_to_gamma


def measured_sigma_rel(weights: Tensor) -> float:
    """The std of the iteration under ``weights`` (entry ``i`` is iteration ``i + 1``), over the run's length."""
    w = weights.double()
    t = torch.arange(1, len(w) + 1, dtype=torch.float64)
    mean = float((w * t).sum() / w.sum())
    var = float((w * (t - mean) ** 2).sum() / w.sum())
    return math.sqrt(var) / len(w)


def _probe(iterations: int) -> nn.Linear:
    """A bias-free linear layer whose weight row is set to ``e_t`` at iteration ``t``."""
    probe = nn.Linear(iterations, 1, bias=False)
    nn.init.zeros_(probe.weight)
    return probe


def _set_one_hot(probe: nn.Linear, iteration: int) -> None:
    with torch.no_grad():
        probe.weight.zero_()
        probe.weight[0, iteration - 1] = 1.0


def _weight_row(module: nn.Module) -> Tensor:
    """The averaged probe's weight row: the weight each iteration has in the EMA."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.detach()[0].clone()


def _one_hot_step(probe: nn.Linear) -> Callable[[Engine, object], None]:
    return lambda engine, batch: _set_one_hot(probe, engine.state.iteration)


def posthoc_weights(sigma_rel: float, iterations: int, every: int) -> Tensor:
    """The weight of each iteration in ``PostHocEMA``'s EMA after ``iterations``, updated every ``every``."""
    probe = _probe(iterations)
    trainer = Engine(_one_hot_step(probe))
    with tempfile.TemporaryDirectory() as snapshots:
        posthoc = PostHocEMA(probe, (sigma_rel,), snapshot_every=iterations, snapshot_dir=snapshots)
        posthoc.attach(trainer, event=Events.ITERATION_COMPLETED(every=every))
        trainer.run(range(iterations), max_epochs=1)
    weight = posthoc.model_state_dicts()[0]["weight"]
    assert isinstance(weight, Tensor)
    return weight[0].clone()


def ema_handler_weights(sigma_rel: float, iterations: int) -> Tensor:
    """The same for ``EMAHandler(power_warmup=(gamma + 1, 1))``; the initial weights' share is left out."""
    probe = _probe(iterations)
    trainer = Engine(_one_hot_step(probe))
    gamma = sigma_rel_to_gamma(sigma_rel)
    handler = EMAHandler(probe, momentum=1e-12, power_warmup=(gamma + 1.0, 1.0))
    handler.attach(trainer)
    trainer.run(range(iterations), max_epochs=1)
    return _weight_row(handler.ema_model)


def karras_ema_weights(sigma_rel: float, iterations: int, update_every: int) -> Tensor | None:
    """The same for ema-pytorch's ``KarrasEMA`` called once per iteration, or ``None`` without ema-pytorch."""
    try:
        from ema_pytorch.post_hoc_ema import KarrasEMA
    except ImportError:
        return None
    probe = _probe(iterations)
    ema = KarrasEMA(probe, sigma_rel=sigma_rel, update_every=update_every)
    for t in range(1, iterations + 1):
        _set_one_hot(probe, t)
        ema.update()
    return _weight_row(ema.ema_model)


def run(iterations: int, handler_iterations: int, sigma_rels: Sequence[float]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for sigma in sigma_rels:
        for every in (1, 100):
            w = posthoc_weights(sigma, iterations, every)
            rows.append(_row("ignite_ema PostHocEMA", every, sigma, w))
        for every in (1, 100):
            theirs = karras_ema_weights(sigma, iterations, every)
            if theirs is not None:
                rows.append(_row("ema-pytorch KarrasEMA", every, sigma, theirs))
        w = ema_handler_weights(sigma, handler_iterations)
        rows.append(_row("ignite_ema EMAHandler(power_warmup=(gamma + 1, 1))", 1, sigma, w))
    return rows


def _row(ema: str, every: int, nominal: float, weights: Tensor) -> dict[str, object]:
    return {
        "ema": ema,
        "every": every,
        "iterations": len(weights),
        "nominal": nominal,
        "measured": measured_sigma_rel(weights),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(prog="python -m examples.posthoc.sigma_check", description=__doc__)
    parser.add_argument("--iters", type=int, default=20_000, help="run length (default 20,000)")
    parser.add_argument("--handler-iters", type=int, default=1000, help="run length for EMAHandler (default 1,000)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run(args.iters, args.handler_iters, (0.05, 0.10))
    print("| EMA | updates every | iterations | nominal sigma_rel | measured sigma_rel |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ema']} | {r['every']} | {r['iterations']:,} | {r['nominal']:.3f} | {r['measured']:.5f} |")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
