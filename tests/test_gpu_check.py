"""benchmarks/gpu_check.py, run on the CPU: every check but the cross-device one passes, so the script a GPU
machine runs keeps working."""

from __future__ import annotations

import pytest

from benchmarks.gpu_check import main


@pytest.mark.slow
def test_the_gpu_checks_pass_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cpu", "--models", "small"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok    ") == 5 and "FAIL" not in out
    assert "'skipped': 'needs a CUDA device'" in out
