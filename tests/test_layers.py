"""The layers the files show: tensor lists, then modules, then the Ignite adapters. The core imports no Ignite."""

from __future__ import annotations

import subprocess
import sys

# Runs in a fresh interpreter where importing Ignite fails: the core must import, and run, without it.
_WITHOUT_IGNITE = """
import sys

class NoIgnite:
    def find_spec(self, name, path=None, target=None):
        if name == "ignite" or name.startswith("ignite."):
            raise ImportError("ignite is blocked in this test")

sys.meta_path.insert(0, NoIgnite())
import torch
from ignite_ema import ModelEMA, frozen_bn_stats, recalibrate_bn
import ignite_ema.averaging, ignite_ema.distributed, ignite_ema.schedules, ignite_ema.posthoc.power
import ignite_ema.posthoc.snapshots, ignite_ema.posthoc.reconstruct, ignite_ema.posthoc.core

model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
torch.nn.init.zeros_(model[0].weight)
ema = ModelEMA(model, decay=0.75)
with torch.no_grad():
    model[0].weight.fill_(1.0)
assert ema.update() == 0.25
assert torch.equal(ema.ema_model[0].weight, torch.full((2, 2), 0.25))
assert recalibrate_bn(ema.ema_model, [torch.ones(4, 2)]) == 1
with frozen_bn_stats(model):
    model(torch.ones(4, 2))

# PostHocEMA in a plain loop: updates, snapshot files (written without Ignite's DiskSaver), a reconstruction.
import pathlib, tempfile
from ignite_ema import PostHocEMA
student = torch.nn.Linear(1, 1, bias=False)
with tempfile.TemporaryDirectory() as directory:
    posthoc = PostHocEMA(student, (0.05, 0.10), snapshot_every=2, snapshot_dir=directory)
    for t in range(1, 6):
        student.weight.data.fill_(float(t))
        posthoc.update()
    posthoc.snapshot()
    assert [i.iteration for i in posthoc.snapshots] == [2, 2, 4, 4, 5, 5]
    assert sorted(p.name for p in pathlib.Path(directory).iterdir()) == sorted(i.path.name for i in posthoc.snapshots)
    tracked = posthoc.model_state_dicts()[0]["weight"]  # reconstructed from its own float16 snapshot at step 5
    assert torch.allclose(posthoc.reconstruct(0.05)["weight"], tracked, rtol=2.0**-11, atol=0)
assert not [name for name in sys.modules if name == "ignite" or name.startswith("ignite.")]
"""


def test_the_core_imports_and_runs_with_ignite_blocked() -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_IGNITE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_adapters_are_imported_on_first_use() -> None:
    script = (
        "import sys, ignite_ema; assert 'ignite_ema.handlers.ema_handler' not in sys.modules; "
        "from ignite_ema import EMAHandler; assert EMAHandler.__module__ == 'ignite_ema.handlers.ema_handler'; "
        "assert 'run_on_processes' not in ignite_ema.__all__"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
