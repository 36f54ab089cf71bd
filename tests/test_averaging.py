"""ShadowAverager: the multi-tensor update against a plain per-element reference."""

from __future__ import annotations

import pytest
import torch

from ignite_ema.averaging import ShadowAverager


def _tensors(dtypes: list[torch.dtype], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    return [torch.randn(shapes[i % len(shapes)], generator=gen).to(dtype) for i, dtype in enumerate(dtypes)]


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32] * 4,
        [torch.float64, torch.float32, torch.float64],
        [torch.float16, torch.bfloat16, torch.float32],
    ],
)
def test_update_matches_a_plain_loop(dtypes: list[torch.dtype]) -> None:
    targets, students = _tensors(dtypes, 0), _tensors(dtypes, 1)
    expected = [t.double().clone() for t in targets]  # .double() of a float64 tensor is the tensor itself
    averager = ShadowAverager(targets, students)
    for step, momentum in enumerate([0.5, 0.1, 0.01, 0.3]):
        with torch.no_grad():
            for s in students:
                s.add_(0.125 * (step + 1))
        averager.update(momentum)
        expected = [(1 - momentum) * e + momentum * s.double() for e, s in zip(expected, students, strict=True)]
    for target, shadow, exp in zip(targets, averager.shadows, expected, strict=True):
        assert shadow.dtype == (torch.float32 if target.dtype in (torch.float16, torch.bfloat16) else target.dtype)
        torch.testing.assert_close(shadow.double(), exp, rtol=1e-6, atol=1e-6)  # shadows are >= fp32
        torch.testing.assert_close(target, exp.to(target.dtype))  # targets hold the rounded shadow


def test_low_precision_targets_get_float32_shadows_and_keep_their_dtype() -> None:
    target = torch.zeros(8, dtype=torch.bfloat16)
    student = torch.ones(8, dtype=torch.bfloat16)
    averager = ShadowAverager([target], [student])
    assert averager.has_separate_shadows and averager.shadows[0].dtype == torch.float32
    momentum, steps = 2e-4, 2000
    for _ in range(steps):
        averager.update(momentum)
    expected = 1 - (1 - momentum) ** steps
    torch.testing.assert_close(averager.shadows[0], torch.full((8,), expected), rtol=2e-4, atol=0)  # fp32 rounding
    assert target.dtype == torch.bfloat16
    torch.testing.assert_close(target.float(), torch.full((8,), expected), rtol=2**-8, atol=0)


def test_copy_is_by_value() -> None:
    targets, students = _tensors([torch.float32, torch.int64], 0), _tensors([torch.float32, torch.int64], 1)
    averager = ShadowAverager(targets, students)
    averager.copy()
    copied = [t.clone() for t in targets]
    for t, s in zip(targets, students, strict=True):
        assert torch.equal(t, s)
        s.add_(1)  # the student moves on: the copy must not follow it
    for t, c in zip(targets, copied, strict=True):
        assert torch.equal(t, c)


def test_bind_rejects_other_shapes_and_counts() -> None:
    averager = ShadowAverager([torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"target shape \(3,\) differs from student shape \(4,\)"):
        averager.bind([torch.zeros(4)])
    with pytest.raises(ValueError, match="expected 1 student tensors, found 2"):
        averager.bind([torch.zeros(3), torch.zeros(3)])
