"""benchmarks/gpu_check.py, run on the CPU: the checks that mean something on a CPU pass, the others say they need a
CUDA device, so the script a GPU machine runs keeps working."""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu_check import main

#: The checks that run on a CPU: bf16 shadows, the swap, skip_nonfinite, the floor, model_state_dict's references.
RUN_ON_CPU = 5
#: The ones that need a GPU: the races, host synchronisations, device memory, NCCL, device indices, the CPU EMA, the
#: bandwidth floor, kernel launches, and the asynchronous updates' bits and step overhead.
NEED_CUDA = 20


@pytest.mark.slow
def test_the_gpu_checks_pass_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "--models", "small"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(line.startswith("ok    ") for line in lines) == RUN_ON_CPU, out
    skipped = [line for line in lines if line.startswith("skip  ")]
    assert len(skipped) == NEED_CUDA, out
    assert all(line.endswith("{'skipped': 'needs a CUDA device'}") for line in skipped), skipped
    assert "FAIL" not in out
    summary = json.loads(out[out.index("\n{") :])
    assert summary["counts"] == {"ok": RUN_ON_CPU, "skipped": NEED_CUDA, "failed": 0}


def test_a_failing_check_is_reported_and_the_next_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """An error of any kind in one check is a FAIL line; the checks after it still run."""
    # On the meta device tensors have no values: these two checks raise RuntimeError and NotImplementedError.
    assert main(["--device", "meta", "--only", "skip_nonfinite", "model_state_dict"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line[:6].strip() in ("ok", "skip", "FAIL")]
    assert [line[:6].strip() for line in lines] == ["FAIL", "FAIL"], out
    summary = json.loads(out[out.index("\n{") :])
    assert summary["counts"]["failed"] == 2
