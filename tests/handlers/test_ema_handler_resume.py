"""Resume through Ignite's Checkpoint in fresh processes ends bit-identical to a run that never stopped.

The same file is the job the test starts: ``python -m tests.handlers.test_ema_handler_resume PHASE DIR``
with PHASE one of ``full`` (15 iterations), ``first`` (stops after the checkpoint
at iteration 7, mid-epoch, between two EMA updates) and ``resume`` (loads that
checkpoint and finishes). Batches are derived from the iteration number, so
the resumed run sees the same data without a deterministic data loader.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from ignite_ema import EMAHandler
from tests.helpers import assert_same_state

CONFIGS = {
    "copy-fp32": ("copy", torch.float32),
    "update-fp32": ("update", torch.float32),
    "ema_train-fp32": ("ema_train", torch.float32),
    "ema_train-bf16": ("ema_train", torch.bfloat16),
}
CHECKPOINT_AT, EPOCH_LENGTH, MAX_EPOCHS = 7, 5, 3


def _build(mode: str, dtype: torch.dtype) -> tuple[Engine, dict[str, object], EMAHandler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Linear warm-up over 10 iterations, a half-life, and updates every 3 iterations: every counter matters.
    handler = EMAHandler(model, momentum_warmup=0.9, warmup_iters=10, handle_buffers=mode, half_life=6)
    teacher = handler.ema_model

    def step(engine: Engine, batch: object) -> float:
        gen = torch.Generator().manual_seed(engine.state.iteration)
        x = torch.randn(8, 3, 6, 6, generator=gen).to(dtype)
        y = torch.randn(8, 2, generator=gen).to(dtype)
        model.train()
        out = model(x)
        loss = nn.functional.mse_loss(out, y)
        if mode == "ema_train":  # a mean-teacher consistency term: the teacher's statistics move too
            with torch.no_grad():
                target = teacher(x)
            loss = loss + nn.functional.mse_loss(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    handler.attach(trainer, name="teacher_momentum", event=Events.ITERATION_COMPLETED(every=3))
    return trainer, {"model": model, "optimizer": optimizer, "trainer": trainer, "ema": handler}, handler


def _job(phase: str, workdir: Path) -> None:
    finals = {}
    for name, (mode, dtype) in CONFIGS.items():
        trainer, to_save, handler = _build(mode, dtype)
        ckpt_dir = workdir / f"ckpt-{name}"
        if phase == "first":
            saver = Checkpoint(to_save, DiskSaver(str(ckpt_dir), require_empty=False), n_saved=1)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=CHECKPOINT_AT), saver)
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=CHECKPOINT_AT), lambda e: e.terminate())
        if phase == "resume":
            (path,) = ckpt_dir.glob("*.pt")
            Checkpoint.load_objects(to_save, torch.load(path, weights_only=False))
        trainer.run(range(EPOCH_LENGTH), max_epochs=MAX_EPOCHS)
        if phase != "first":
            finals[name] = {
                "handler": handler.state_dict(),
                "ema_model": handler.ema_model.state_dict(),
                "momentum": trainer.state.teacher_momentum,
            }
    if finals:
        torch.save(finals, workdir / f"{phase}.pt")


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_identical(tmp_path: Path) -> None:
    for phase in ("full", "first", "resume"):
        subprocess.run(
            [sys.executable, "-m", "tests.handlers.test_ema_handler_resume", phase, str(tmp_path)],
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=False)
    for name in CONFIGS:
        a, b = full[name], resumed[name]
        assert a["momentum"] == b["momentum"], name
        assert_same_state(b["handler"], a["handler"], name)
        assert a["handler"]["num_averaged"] == MAX_EPOCHS * EPOCH_LENGTH // 3
        for tensor_name, tensor in a["ema_model"].items():
            assert torch.equal(tensor, b["ema_model"][tensor_name]), (name, tensor_name)


if __name__ == "__main__":
    _job(sys.argv[1], Path(sys.argv[2]))
