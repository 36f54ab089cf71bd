"""The numeric core on tensor lists: averages against a plain per-element loop, copies, finiteness, swaps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ignite_ema import ModelEMA
from ignite_ema.averaging import FiniteCheck, ShadowAverager, TensorCopier, ValueSwap, shadow_dtype_for


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
        # float32 shadows all: the group's first pair has equal dtypes and later ones do not, so the pairs must be
        # grouped on the student's dtype too (one lerp of a float32 shadow and a bf16 student would raise)
        [torch.float32, torch.bfloat16, torch.float16, torch.float32],
    ],
)
def test_update_matches_a_plain_loop(dtypes: list[torch.dtype]) -> None:
    students = _tensors(dtypes, 1)
    shadows = [t.to(shadow_dtype_for(t.dtype)) for t in _tensors(dtypes, 0)]
    expected = [t.double().clone() for t in shadows]  # .double() of a float64 tensor is the tensor itself
    averager = ShadowAverager(shadows, students)
    for step, momentum in enumerate([0.5, 0.1, 0.01, 0.3]):
        with torch.no_grad():
            for s in students:
                s.add_(0.125 * (step + 1))
        averager.update(momentum)
        expected = [(1 - momentum) * e + momentum * s.double() for e, s in zip(expected, students, strict=True)]
    for student, shadow, exp in zip(students, shadows, expected, strict=True):
        assert shadow.dtype == {torch.float16: torch.float32, torch.bfloat16: torch.float32}.get(
            student.dtype, student.dtype
        )
        torch.testing.assert_close(shadow.double(), exp, rtol=1e-6, atol=1e-6)  # shadows are >= fp32


def test_a_bf16_model_whose_first_tensor_is_float32_averages_like_a_plain_loop() -> None:
    # A float32 LayerNorm first (kept in float32 on purpose), bf16 layers after it: every shadow is float32.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3).to(torch.bfloat16))
    ema = ModelEMA(model)
    expected = {n: t.detach().double() for n, t in model.named_parameters()}
    for momentum in (0.5, 0.25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        ema.update(momentum)
        expected = {n: (1 - momentum) * e + momentum * model.get_parameter(n).double() for n, e in expected.items()}
    shadows = ema.state_dict()["tensors"]
    for name, want in expected.items():
        assert shadows[name].dtype == torch.float32, name
        torch.testing.assert_close(shadows[name].double(), want, rtol=1e-6, atol=1e-6)


def test_a_float32_shadow_of_a_bf16_student_absorbs_steps_below_bf16_resolution() -> None:
    shadow = torch.zeros(8)
    student = torch.ones(8, dtype=torch.bfloat16)
    averager = ShadowAverager([shadow], [student])
    momentum, steps = 2e-4, 2000
    for _ in range(steps):
        averager.update(momentum)
    expected = 1 - (1 - momentum) ** steps
    torch.testing.assert_close(shadow, torch.full((8,), expected), rtol=2e-4, atol=0)  # fp32 rounding over 2000 steps


def test_copy_students_restarts_the_average_there() -> None:
    students = _tensors([torch.float32, torch.bfloat16], 1)
    shadows = [torch.zeros(3, 4), torch.zeros(5)]
    averager = ShadowAverager(shadows, students)
    averager.copy_students()
    for shadow, student in zip(shadows, students, strict=True):
        assert torch.equal(shadow, student.float())


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_a_momentum_outside_0_1_is_refused_and_nothing_moves(momentum: float) -> None:
    shadow, student = torch.zeros(3), torch.ones(3)
    averager = ShadowAverager([shadow], [student])
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
        averager.update(momentum)
    assert torch.equal(shadow, torch.zeros(3))
    with pytest.raises(TypeError, match="momentum must be a real number in"):
        averager.update("0.1")  # type: ignore[arg-type]


def test_copier_copies_by_value() -> None:
    targets, sources = _tensors([torch.float32, torch.int64], 0), _tensors([torch.float32, torch.int64], 1)
    TensorCopier(targets, sources).copy()
    copied = [t.clone() for t in targets]
    for t, s in zip(targets, sources, strict=True):
        assert torch.equal(t, s)
        s.add_(1)  # the source moves on: the copy must not follow it
    for t, c in zip(targets, copied, strict=True):
        assert torch.equal(t, c)


def test_bind_rejects_other_shapes_and_counts() -> None:
    averager = ShadowAverager([torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"pair 0: shape \(3,\) here, \(4,\) in the student tensor"):
        averager.bind([torch.zeros(4)])
    with pytest.raises(ValueError, match="expected 1 student tensors, found 2"):
        averager.bind([torch.zeros(3), torch.zeros(3)])


def test_finite_check_finds_the_first_bad_tensor_and_ignores_integers() -> None:
    tensors = [torch.ones(3), torch.arange(4), torch.ones(2, dtype=torch.bfloat16), torch.ones(5, dtype=torch.float64)]
    check = FiniteCheck(tensors)
    assert bool(check.all_finite())
    tensors[3][2] = float("inf")
    tensors[2][0] = float("nan")
    assert not bool(check.all_finite())
    assert check.first_nonfinite() == 1  # of the three floating tensors: the bf16 one
    assert FiniteCheck([torch.arange(3)]).all_finite() is None


def test_finite_check_tells_an_overflowing_norm_from_a_nonfinite_element() -> None:
    big = torch.full((4,), 1e20)  # finite, but its 2-norm overflows float32
    check = FiniteCheck([big])
    assert not bool(check.all_finite())
    assert check.first_nonfinite() is None


def test_value_swap_exchanges_bit_for_bit_with_chunks_of_the_largest_tensor() -> None:
    dtypes = [torch.float32, torch.int64, torch.float32, torch.bfloat16, torch.float32]
    shapes = [(7,), (3,), (2, 2), (5,), (0,)]
    first = [torch.randn(shape).to(dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    second = [torch.randn(shape).to(dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    was_first, was_second = [t.clone() for t in first], [t.clone() for t in second]
    ValueSwap(first, second).exchange()
    for a, b, a0, b0 in zip(first, second, was_first, was_second, strict=True):
        assert torch.equal(a, b0) and torch.equal(b, a0)
    ValueSwap(first, second).exchange()
    for a, b, a0, b0 in zip(first, second, was_first, was_second, strict=True):
        assert torch.equal(a, a0) and torch.equal(b, b0)


def test_value_swap_needs_equal_shapes() -> None:
    with pytest.raises(ValueError, match=r"pair 0: shape \(2,\) here, \(3,\)"):
        ValueSwap([torch.zeros(2)], [torch.zeros(3)])


def test_pairs_laid_out_otherwise_go_to_a_group_of_their_own() -> None:
    # The fast path of a multi-tensor kernel needs equal strides in every pair: a channels_last student beside a
    # contiguous shadow must not demote the other pairs of its group.
    contiguous = torch.randn(2, 3, 4, 4)
    channels_last = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    students = [contiguous, channels_last, torch.randn(5)]
    shadows = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(5)]
    averager = ShadowAverager(shadows, students)
    assert sorted(len(group.dst) for group in averager._groups) == [1, 2]
    averager.update(0.5)
    for shadow, student in zip(shadows, students, strict=True):
        torch.testing.assert_close(shadow, 0.5 * student)


def test_low_precision_students_are_widened_in_chunks_of_bounded_scratch() -> None:
    # bf16 students, float32 shadows: each chunk widened into scratch memory kept from the first update, at most
    # WIDENING_CHUNK_CPU elements or the largest tensor, then one same-dtype lerp per chunk.
    from ignite_ema.averaging import WIDENING_CHUNK_CPU as WIDENING_CHUNK

    gen = torch.Generator().manual_seed(0)
    sizes = [WIDENING_CHUNK // 2 + 1, WIDENING_CHUNK // 2, 3, WIDENING_CHUNK // 4]
    students = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in sizes]
    students.append(torch.randn(64, 32, generator=gen).to(torch.bfloat16).t())  # not contiguous
    shadows = [torch.zeros_like(s, dtype=torch.float32) for s in students]  # laid out like their students
    averager = ShadowAverager(shadows, students)
    averager.update(0.25)
    (group,) = averager._groups
    plan = group._widening
    assert plan is not None and len(plan) == 2  # the first tensor and half a chunk do not fit one chunk together
    scratch = {v.untyped_storage().data_ptr() for _, _, views in plan for v in views}
    assert (
        len(scratch) == 1 and max(v.untyped_storage().nbytes() for _, _, vs in plan for v in vs) == 4 * WIDENING_CHUNK
    )
    averager.update(0.5)
    assert group._widening is plan  # kept, not allocated again
    for shadow, student in zip(shadows, students, strict=True):
        expected = 0.5 * (0.25 * student.double()) + 0.5 * student.double()  # two updates from zero, closed form
        torch.testing.assert_close(shadow.double(), expected, rtol=1e-6, atol=1e-7)


def test_mirrors_hold_each_shadow_rounded_after_every_write() -> None:
    # A bf16 EMA model beside float32 shadows: the averager writes each mirror with its chunk, after updates and
    # after copies of the students alike; pairs without a mirror are left to themselves.
    gen = torch.Generator().manual_seed(0)
    students = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (5, 3, 7)]
    shadows = [torch.zeros(s.shape) for s in students]
    mirrors: list[torch.Tensor | None] = [
        torch.zeros(5, dtype=torch.bfloat16),
        None,
        torch.zeros(7, dtype=torch.bfloat16),
    ]
    averager = ShadowAverager(shadows, students, mirrors)
    averager.update(0.3)
    for shadow, student, mirror in zip(shadows, students, mirrors, strict=True):
        torch.testing.assert_close(shadow, 0.3 * student.float(), rtol=1e-6, atol=1e-7)
        if mirror is not None:
            assert torch.equal(mirror, shadow.to(torch.bfloat16))
    for student in students:
        student.add_(1)
    averager.copy_students()
    assert torch.equal(mirrors[0], students[0]) and torch.equal(mirrors[2], students[2])
    with pytest.raises(ValueError, match="expected 3 mirrors"):
        ShadowAverager(shadows, students, mirrors[:2])
    with pytest.raises(ValueError, match=r"shape \(5,\) here, \(4,\) in the mirror"):
        ShadowAverager(shadows, students, [torch.zeros(4, dtype=torch.bfloat16), None, None])
