"""The training job of the PostHocEMA resume test: ``python -m tests.posthoc.resume_job PHASE DIR``.

PHASE is ``full`` (40 iterations, never stopped), ``first`` (saves a
checkpoint at iteration 17, between two EMA updates and two snapshots, then
crashes at iteration 26, after it wrote a snapshot at 21) or ``resume``
(loads that checkpoint and finishes). The test runs ``resume`` in a fresh
process and the other two in its own. Batches are derived from the iteration
number, so the resumed run sees the same data. Run as a script, a phase that
finishes writes ``DIR/<phase>.pt``: the handler's state, its EMA models, the
trainer's published momenta and the warnings.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_ema import PostHocEMA

CHECKPOINT_AT, CRASH_AT, EPOCH_LENGTH, MAX_EPOCHS = 17, 26, 10, 4


class SimulatedCrash(RuntimeError):
    """Raised by the ``first`` phase after its checkpoint."""


def _build(snapshot_dir: Path) -> tuple[Engine, dict[str, object], PostHocEMA]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=10, snapshot_dir=snapshot_dir, handle_buffers="update")

    def step(engine: Engine, batch: object) -> float:
        gen = torch.Generator().manual_seed(engine.state.iteration)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
        model.train()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    posthoc.attach(trainer, event=Events.ITERATION_COMPLETED(every=3))
    return trainer, {"model": model, "optimizer": optimizer, "trainer": trainer, "posthoc": posthoc}, posthoc


def run_phase(phase: str, workdir: Path) -> dict[str, object] | None:
    """Run one phase in ``workdir`` and return what it finished with (``None`` for ``first``)."""
    snapshot_dir = workdir / ("snapshots-full" if phase == "full" else "snapshots")
    trainer, to_save, posthoc = _build(snapshot_dir)
    momenta: list[tuple[int, object]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: momenta.append((e.state.iteration, e.state.posthoc_momentum))
    )
    if phase == "first":
        saver = Checkpoint(to_save, DiskSaver(str(workdir / "ckpt"), require_empty=False), n_saved=1)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=CHECKPOINT_AT), saver)

        def crash(engine: Engine) -> None:
            raise SimulatedCrash(f"simulated crash at iteration {engine.state.iteration}")

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=CRASH_AT), crash)
        try:
            trainer.run(range(EPOCH_LENGTH), max_epochs=MAX_EPOCHS)
        except SimulatedCrash:
            return None
        raise AssertionError("the first phase should have crashed")
    if phase == "resume":
        (path,) = (workdir / "ckpt").glob("*.pt")
        Checkpoint.load_objects(to_save, torch.load(path, weights_only=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run(range(EPOCH_LENGTH), max_epochs=MAX_EPOCHS)
    return {
        "state": posthoc.state_dict(),
        "ema_models": posthoc.model_state_dicts(),
        "momenta": momenta,
        "warnings": [str(w.message) for w in caught],
    }


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    result = run_phase(phase, workdir)
    if result is not None:
        torch.save(result, workdir / f"{phase}.pt")
