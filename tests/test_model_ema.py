"""ModelEMA from a plain loop: averages, modes, the swap, a caller-built EMA model, changes it cannot follow, state.

Expected values come from plain loops over the student's weights written here.
"""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ignite_ema import ModelEMA, recalibrate_bn
from tests.helpers import BNNet, image_batches, linear, no_warnings, saved_and_loaded

ROOT = Path(__file__).resolve().parents[1]


def _sgd_steps(model: nn.Module, ema: ModelEMA, momentum: float, steps: int, *, teacher: bool = False) -> None:
    """A small training loop: an SGD step on the student, the teacher's forward (when asked), an EMA update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in image_batches(steps, seed=3):
        loss = model(x).square().mean()
        if teacher:
            with torch.no_grad():
                ema.ema_model(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(momentum)


# ----------------------------------------------------------------------------- a plain loop


def test_update_follows_a_plain_loop_and_copy_student_restarts_it() -> None:
    model = linear(0.0)
    ema = ModelEMA(model)
    expected = 0.0
    for value, momentum in [(1.0, 0.5), (3.0, 0.25), (-2.0, 0.1)]:
        nn.init.constant_(model.weight, value)
        ema.update(momentum)
        expected = (1 - momentum) * expected + momentum * value
    torch.testing.assert_close(ema.ema_model.weight, torch.full((1, 2), expected))
    nn.init.constant_(model.weight, 7.0)
    ema.copy_student()
    assert torch.equal(ema.ema_model.weight, torch.full((1, 2), 7.0))


def test_ema_train_leaves_buffers_to_the_teachers_own_forwards() -> None:
    model = BNNet()
    ema = ModelEMA(model, handle_buffers="ema_train")
    assert ema.ema_model.training and not model.bn.num_batches_tracked
    _sgd_steps(model, ema, 0.5, 3, teacher=True)
    assert ema.ema_model.bn.num_batches_tracked.item() == 3  # its own three forwards, not the student's
    assert not torch.equal(ema.ema_model.bn.running_mean, model.bn.running_mean)


def test_a_momentum_outside_0_1_changes_nothing() -> None:
    ema = ModelEMA(linear(2.0))
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\] \(the weight of the student\); found 1.5"):
        ema.update(1.5)
    assert torch.equal(ema.ema_model.weight, torch.full((1, 2), 2.0))


# ----------------------------------------------------------------------------- swap


def _bn_pair() -> tuple[BNNet, ModelEMA]:
    """A student a few SGD steps away from its "update"-mode EMA, so that every tensor of the two differs."""
    torch.manual_seed(0)
    model = BNNet()
    ema = ModelEMA(model, handle_buffers="update")
    _sgd_steps(model, ema, 0.3, 4)
    return model, ema


def test_swap_puts_the_ema_into_the_student_in_place_and_restores_it_bit_for_bit() -> None:
    model, ema = _bn_pair()
    x = image_batches(1, seed=9)[0]
    model.eval()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    ema_values = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    expected = ema.ema_model(x)
    objects = {name: (t, t.data_ptr()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    with ema.swapped():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        for name, value in ema_values.items():
            assert torch.equal(model.state_dict()[name], value), name
        for name, (tensor, pointer) in objects.items():  # the same tensor objects, the same storage
            current = dict([*model.named_parameters(), *model.named_buffers()])[name]
            assert current is tensor and current.data_ptr() == pointer, name
    for name, value in own.items():
        assert torch.equal(model.state_dict()[name], value), name
    for name, value in ema_values.items():
        assert torch.equal(ema.ema_model.state_dict()[name], value), name


def test_the_student_is_restored_when_the_block_raises() -> None:
    model, ema = _bn_pair()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match="boom"), ema.swapped():
        raise KeyError("boom")
    for name, value in own.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not ema.is_swapped


def test_inside_a_swap_updates_state_calls_and_a_second_swap_are_refused_and_change_nothing() -> None:
    model, ema = _bn_pair()
    with ema.swapped():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
        for call in (lambda: ema.update(0.5), ema.copy_student, ema.state_dict, ema.swapped().__enter__):
            with pytest.raises(RuntimeError, match="while the EMA is swapped into the student"):
                call()
        for name, value in inside.items():
            assert torch.equal(model.state_dict()[name], value), name


def test_a_swap_before_any_update_is_allowed_and_silent() -> None:
    model = BNNet()
    ema = ModelEMA(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with no_warnings(), ema.swapped():
        for name, value in own.items():
            assert torch.equal(model.state_dict()[name], value), name


def test_the_optimiser_and_a_compiled_student_keep_working_across_a_swap() -> None:
    model, ema = _bn_pair()
    model.eval()
    compiled = torch.compile(model)
    x = image_batches(1, seed=4)[0]
    before, expected = compiled(x), ema.ema_model(x)  # inside the swap, ema_model holds the student's values
    with ema.swapped():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the same parameter objects
    model(x).sum().backward()
    weight = model.head.weight.detach().clone()
    optimizer.step()
    assert model.head.weight.grad is not None
    assert torch.equal(model.head.weight, weight.add(model.head.weight.grad, alpha=-0.1))  # SGD's own arithmetic


def test_a_float32_ema_of_a_bf16_student_swaps_in_rounded_and_restores_the_student_exactly() -> None:
    model = linear(0.0, torch.bfloat16)
    ema = ModelEMA(model, ema_model=linear(0.0, torch.float32))
    nn.init.constant_(model.weight, 1.0)
    for _ in range(5):
        ema.update(0.001)  # 1 - 0.999 ** 5: below bf16's resolution near 0.005, kept by the float32 EMA model
    average = ema.ema_model.weight.detach().clone()
    torch.testing.assert_close(average, torch.full((1, 2), 1 - 0.999**5), rtol=1e-6, atol=0)
    with ema.swapped():
        assert torch.equal(model.weight, average.to(torch.bfloat16))
    assert torch.equal(model.weight, torch.full((1, 2), 1.0, dtype=torch.bfloat16))
    assert torch.equal(ema.ema_model.weight, average)


# ----------------------------------------------------------------------------- a caller-built EMA model


@pytest.mark.parametrize("mode", ["copy", "update", "ema_train"])
def test_a_caller_built_ema_model_gives_the_deep_copys_ema_bit_for_bit(mode: str) -> None:
    torch.manual_seed(0)
    model_a = BNNet()
    model_b = copy.deepcopy(model_a)
    torch.manual_seed(1)
    mine = BNNet()  # other initial values: they must be overwritten by the student's
    by_copy, by_caller = ModelEMA(model_a, mode), ModelEMA(model_b, mode, ema_model=mine)
    assert by_caller.ema_model is mine and not any(p.requires_grad for p in mine.parameters())
    assert mine.training == (mode == "ema_train")
    _sgd_steps(model_a, by_copy, 0.3, 4, teacher=mode == "ema_train")
    _sgd_steps(model_b, by_caller, 0.3, 4, teacher=mode == "ema_train")
    for name, tensor in by_copy.ema_model.state_dict().items():
        assert torch.equal(mine.state_dict()[name], tensor), name


class _Wider(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.extra = nn.Linear(2, 2)


def _sharing() -> nn.Module:
    other = BNNet()
    other.head.weight = _STUDENT.head.weight
    return other


_STUDENT = BNNet()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _STUDENT, "ema_model is the student itself"),
        (lambda: nn.DataParallel(_STUDENT), "ema_model is the student itself"),
        (_sharing, "ema_model's tensor 'head.weight' shares storage with the student's 'head.weight'"),
        (_Wider, r"ema_model has a tensor 'extra.weight' \(shape \(2, 2\)\) that the student lacks"),
        (lambda: nn.Linear(4, 2), r"ema_model has no tensor 'conv.weight' \(shape \(4, 3, 3, 3\)\), which the student"),
        (lambda: BNNet().half(), "ema_model's tensor 'conv.weight' is torch.float16, the student's is torch.float32"),
    ],
)
def test_an_ema_model_that_does_not_fit_is_refused_naming_the_first_difference(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        ModelEMA(_STUDENT, ema_model=build())


def test_an_ema_model_of_another_shape_or_integer_dtype_is_refused() -> None:
    other = BNNet()
    other.head = nn.Linear(4, 3)
    with pytest.raises(
        ValueError, match=r"tensor 'head.weight' has shape \(3, 4\) in ema_model, \(2, 4\) in the student"
    ):
        ModelEMA(BNNet(), ema_model=other)
    other = BNNet()
    other.bn.num_batches_tracked = other.bn.num_batches_tracked.int()
    with pytest.raises(ValueError, match=r"'bn.num_batches_tracked' is torch.int32, the student's is torch.int64"):
        ModelEMA(BNNet(), ema_model=other)
    with pytest.raises(ValueError, match="give device= or ema_model=, not both"):
        ModelEMA(BNNet(), ema_model=BNNet(), device="cpu")


# ----------------------------------------------------------------------------- what the EMA cannot follow


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.double(), "the student's tensor 'conv.weight' is torch.float64 now, torch.float32 when the EMA"),
        (lambda m: setattr(m, "head", nn.Linear(4, 3)), r"tensor 'head.weight' has shape \(3, 4\) in the student"),
    ],
)
def test_a_student_changed_in_a_way_the_ema_cannot_follow_is_named(change, message: str) -> None:  # type: ignore[no-untyped-def]
    model = BNNet()
    ema = ModelEMA(model)
    change(model)
    with pytest.raises(ValueError, match=message):
        ema.rebind()


def test_uninitialised_lazy_modules_are_refused_before_any_copy() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    with pytest.raises(ValueError, match=r"lazy module that is not initialised yet \('0', LazyLinear\)"):
        ModelEMA(model)
    model(torch.zeros(2, 5))  # initialised now
    assert ModelEMA(model).ema_model[0].weight.shape == (3, 5)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_complex_parameters_get_a_complex_shadow_of_the_requested_precision() -> None:
    model = nn.Linear(2, 2, bias=False).to(torch.complex64)
    nn.init.zeros_(model.weight)
    ema = ModelEMA(model, shadow_dtype=torch.float64)
    assert ema.state_dict()["tensors"]["weight"].dtype == torch.complex128
    with torch.no_grad():
        model.weight.fill_(1 + 2j)
    ema.update(0.5)
    assert torch.equal(ema.ema_model.weight, torch.full((2, 2), 0.5 + 1j, dtype=torch.complex64))


# ----------------------------------------------------------------------------- the EMA model and its shadow


def _bf16_ema(mode: str = "copy") -> tuple[BNNet, ModelEMA]:
    torch.manual_seed(0)
    model = BNNet().to(torch.bfloat16)
    ema = ModelEMA(model, handle_buffers=mode)
    for x in image_batches(3):
        model(x.to(torch.bfloat16))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        ema.update(0.01)
    return model, ema


def test_values_written_into_a_bf16_ema_model_are_taken_not_silently_overwritten() -> None:
    model, ema = _bf16_ema()
    loaded = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    loaded["head.bias"] = torch.tensor([3.0, -3.0], dtype=torch.bfloat16)
    ema.ema_model.load_state_dict(loaded)  # Ignite's checkpoint pattern: to_save={"ema_model": ema.ema_model}
    with pytest.warns(UserWarning, match=r"'head.bias' \(1 in all\) was written from outside the EMA") as record:
        ema.update(0.5)
        ema.update(0.5)
    assert len(record) == 1
    student = model.head.bias.float()
    expected = 0.25 * torch.tensor([3.0, -3.0]) + 0.75 * student  # two updates from the loaded values
    torch.testing.assert_close(ema.state_dict()["tensors"]["head.bias"], expected, rtol=1e-6, atol=1e-6)
    assert record[0].filename == __file__  # the warning points at the caller, not into the package


def test_the_same_values_loaded_again_keep_the_float32_shadow() -> None:
    _, ema = _bf16_ema()
    shadow = ema.state_dict()["tensors"]["conv.weight"].clone()
    ema.ema_model.load_state_dict(ema.ema_model.state_dict())  # what a checkpoint of both handler and model does
    with no_warnings():
        ema.check_outside_writes()
        ema.update(0.0)
    assert torch.equal(ema.state_dict()["tensors"]["conv.weight"], shadow)


def test_recalibrated_statistics_of_a_bf16_update_mode_ema_survive_the_next_update() -> None:
    _, ema = _bf16_ema("update")
    batches = [x.to(torch.bfloat16) for x in image_batches(2, seed=5)]
    recalibrate_bn(ema.ema_model, batches)
    recalibrated = ema.ema_model.bn.running_mean.clone()
    with pytest.warns(UserWarning, match="'bn.running_mean' .* was written from outside the EMA"):
        ema.update(0.0)  # momentum 0: the average stays where it was, which is now the recalibrated value
    assert torch.equal(ema.ema_model.bn.running_mean, recalibrated)


# ----------------------------------------------------------------------------- state and a plain module


def test_state_round_trip_is_bit_identical_and_all_or_nothing() -> None:
    _, source = _bf16_ema("update")
    target = ModelEMA(BNNet().to(torch.bfloat16), handle_buffers="update")
    target.load_state_dict(source.state_dict())
    for name, tensor in source.state_dict()["tensors"].items():
        assert torch.equal(target.state_dict()["tensors"][name], tensor), name
    for name, tensor in source.ema_model.state_dict().items():
        assert torch.equal(target.ema_model.state_dict()[name], tensor), name
    # A state whose every tensor differs, the last one in the wrong shape: refused by the same EMA, which keeps
    # every average and every EMA-model tensor it had.
    state = source.state_dict()
    bad = {**state, "tensors": {k: v + 1 for k, v in state["tensors"].items()}}
    bad["tensors"]["head.bias"] = torch.zeros(5)
    before = {k: v.clone() for k, v in target.state_dict()["tensors"].items()}
    module_before = {k: v.clone() for k, v in target.ema_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'head.bias' has shape \(5,\) in the saved state"):
        target.load_state_dict(bad)
    for name, tensor in target.state_dict()["tensors"].items():
        assert torch.equal(tensor, before[name]), name
    for name, tensor in target.ema_model.state_dict().items():
        assert torch.equal(tensor, module_before[name]), name
    with pytest.raises(ValueError, match=r"unexpected \['step'\]. Nothing was loaded"):
        target.load_state_dict({**state, "tensors": bad["tensors"], "step": 3})
    for name, tensor in target.state_dict()["tensors"].items():
        assert torch.equal(tensor, before[name]), name


def test_the_ema_model_is_a_plain_module() -> None:
    model = BNNet()
    ema = ModelEMA(model, handle_buffers="ema_train")
    _sgd_steps(model, ema, 0.5, 2, teacher=True)
    buffer = io.BytesIO()
    torch.save(ema.ema_model, buffer)
    torch.jit.script(ema.ema_model)
    clone = copy.deepcopy(ema.ema_model)
    assert not clone._forward_hooks and not clone._forward_pre_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's own notes on weights_only
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.conv.weight, ema.ema_model.conv.weight)


# ---------------------------------------------------------------------- a student whose tensors are replaced


def _ema_of_bnnet() -> tuple[BNNet, ModelEMA]:
    model = BNNet()
    ema = ModelEMA(model)
    return model, ema


def test_a_new_head_of_the_same_shape_is_followed_not_the_old_one() -> None:
    model, ema = _ema_of_bnnet()
    ema.update(0.5)
    old = ema.ema_model.head.weight.detach().clone()
    model.head = nn.Linear(4, 2)  # same names and shapes, new tensors
    nn.init.constant_(model.head.weight, 7.0)
    ema.update(0.25)
    torch.testing.assert_close(ema.ema_model.head.weight, 0.75 * old + 0.25 * 7.0)
    with ema.swapped():  # the swap puts the EMA into the new head, and gives it back
        torch.testing.assert_close(model.head.weight, 0.75 * old + 0.25 * 7.0)
    assert torch.equal(model.head.weight, torch.full((2, 4), 7.0))


@pytest.mark.parametrize("how", ["assign", "data", "copy_student"])
def test_tensors_replaced_by_load_or_data_are_followed(how: str) -> None:
    model, ema = _ema_of_bnnet()
    old = ema.ema_model.conv.weight.detach().clone()
    new = torch.full_like(model.conv.weight, 3.0)
    if how == "assign":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict({**state, "conv.weight": new}, assign=True)
    else:
        model.conv.weight.data = new
    if how == "copy_student":
        ema.copy_student()
        assert torch.equal(ema.ema_model.conv.weight, new)
    else:
        ema.update(0.5)
        torch.testing.assert_close(ema.ema_model.conv.weight, 0.5 * old + 0.5 * new)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.double(), r"tensor 'conv.weight' is torch.float64 now, torch.float32 when the EMA was built"),
        (lambda m: setattr(m, "head", nn.Linear(4, 3)), r"tensor 'head.weight' has shape \(3, 4\) in the student"),
        (lambda m: setattr(m.conv.weight, "data", torch.zeros(4, 3, 2, 2)), r"'conv.weight' has shape \(4, 3, 2, 2\)"),
    ],
)
def test_a_replacement_the_ema_cannot_follow_is_named_at_the_next_update(change, message: str) -> None:  # type: ignore[no-untyped-def]
    model, ema = _ema_of_bnnet()
    before = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    change(model)
    with pytest.raises(ValueError, match=message):
        ema.update(0.5)
    assert all(torch.equal(ema.ema_model.state_dict()[k], v) for k, v in before.items())


def test_a_decay_passed_as_a_momentum_is_warned_about_once() -> None:
    _, ema = _ema_of_bnnet()
    with pytest.warns(UserWarning, match=r"If 0.999 is a decay .* pass momentum=0.001") as caught:
        ema.update(0.999)
        ema.update(0.999)
    assert len([w for w in caught if "decay" in str(w.message)]) == 1
    _, other = _ema_of_bnnet()
    with no_warnings():  # a copy (1.0) and ordinary momenta are not decays
        other.update(1.0)
        other.update(0.5)
        other.update(0.01)


def test_a_shadow_dtype_narrower_than_a_tensor_is_refused_before_anything_is_written() -> None:
    model = BNNet()
    ema_model = BNNet()
    before = {k: v.clone() for k, v in ema_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shadow_dtype=torch.bfloat16 is narrower than the torch.float32 tensor"):
        ModelEMA(model, ema_model=ema_model, shadow_dtype=torch.bfloat16)
    assert all(torch.equal(ema_model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=r"narrower than the torch.float64 tensor 'weight'"):
        ModelEMA(linear(dtype=torch.float64), shadow_dtype=torch.float32)
    wide = ModelEMA(linear(dtype=torch.bfloat16), shadow_dtype=torch.float64)  # wider is fine
    assert wide.state_dict()["tensors"]["weight"].dtype == torch.float64


def test_a_model_without_tensors_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model \(ReLU\) has no parameters or buffers, so it has nothing to average"):
        ModelEMA(nn.ReLU())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_on_a_torch_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"device='cuda' cannot hold tensors here .*CUDA available: False"):
        ModelEMA(linear(), device="cuda")


def test_ema_model_is_typed_as_a_module_and_says_when_there_is_none() -> None:
    _, ema = _ema_of_bnnet()
    teacher: nn.Module = ema.ema_model  # the README's usage, which mypy --strict checks in tests/typed_usage.py
    assert ema.has_ema_model and teacher(torch.zeros(1, 3, 6, 6)).shape == (1, 2)
    ema._ema_model = None  # what a sharded student without ema_model= has (tests/test_fsdp.py builds one)
    with pytest.raises(RuntimeError, match="holds its shards only, not a module"):
        _ = ema.ema_model
    assert not ema.has_ema_model


# ---------------------------------------------------------------------- the plain loop: the EMA's own schedule


def _set(model: nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


def _plain_loop(momenta: list[float], students: list[float], start: float) -> float:
    """``ema = (1 - m) * ema + m * student`` by hand, in float64."""
    ema = start
    for m, s in zip(momenta, students, strict=True):
        ema = (1 - m) * ema + m * s
    return ema


@pytest.mark.parametrize(
    ("kwargs", "momentum_at"),
    [
        ({"momentum": 0.1}, lambda step, n: 0.1),
        ({"decay": 0.9}, lambda step, n: 0.1),
        ({"half_life": 4}, lambda step, n: 1 - 0.5 ** (1 / 4)),
        ({"half_life": "4it"}, lambda step, n: 1 - 0.5 ** (1 / 4)),
        ({"momentum": 0.1, "mean_teacher_warmup": True}, lambda step, n: max(0.1, 1 / (n + 1))),
        ({"decay": 0.9, "power_warmup": (2.0, 0.5)}, lambda step, n: max(0.1, (1 + n / 2.0) ** -0.5)),
        ({"momentum": 0.5, "momentum_warmup": 0.0, "warmup_iters": 3}, lambda step, n: min(0.5, 0.25 * (step - 1))),
        ({"momentum": 0.1, "start_iteration": 2}, lambda step, n: 1.0 if step <= 2 else 0.1),
    ],
)
def test_update_counts_its_own_steps_and_follows_each_schedule(kwargs: dict[str, object], momentum_at) -> None:  # type: ignore[no-untyped-def]
    model = linear(0.0)
    ema = ModelEMA(model, **kwargs)  # type: ignore[arg-type]
    start = kwargs.get("start_iteration", 0)
    momenta, students, averaged = [], [], 0
    for step in range(1, 9):
        _set(model, float(step))
        applied = ema.update()
        n = averaged + 1  # the n-th averaging update
        expected = momentum_at(step, n)
        assert applied == pytest.approx(expected, rel=1e-12), step
        momenta.append(expected)
        students.append(float(step))
        averaged += step > start  # type: ignore[operator]
    assert ema.last_step == 8 and ema.num_averaged == averaged
    torch.testing.assert_close(
        ema.ema_model.weight.double(), torch.full((1, 2), _plain_loop(momenta, students, 0.0), dtype=torch.float64)
    )


def test_a_gap_of_k_steps_forgets_as_k_single_steps_would() -> None:
    model = linear(1.0)
    gapped, stepwise = ModelEMA(model, half_life=10), ModelEMA(model, half_life=10)
    for _ in range(6):
        stepwise.update()  # the student does not move: six one-step updates ...
    applied = gapped.update(step=6)  # ... forget exactly as much as one update six steps in
    assert applied == pytest.approx(1 - 0.5 ** (6 / 10), rel=1e-12)
    assert gapped.last_step == stepwise.last_step == 6
    _set(model, 3.0)
    gapped.update(step=9)
    stepwise.update(step=7), stepwise.update(step=8), stepwise.update(step=9)
    torch.testing.assert_close(gapped.ema_model.weight, stepwise.ema_model.weight, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"step=9 does not come after the last update's step, 9"):
        gapped.update(step=9)


def test_a_plain_loop_resumes_bit_for_bit_from_state_dict() -> None:
    def run(ema: ModelEMA, model: nn.Linear, steps: range) -> None:
        for step in steps:
            _set(model, float(step) ** 0.5)
            ema.update()

    kwargs = {"half_life": 3, "power_warmup": (1.0, 0.75), "start_iteration": 2}
    model = linear(0.0)
    whole = ModelEMA(model, **kwargs)  # type: ignore[arg-type]
    run(whole, model, range(1, 11))
    first_model = linear(0.0)
    first = ModelEMA(first_model, **kwargs)  # type: ignore[arg-type]
    run(first, first_model, range(1, 6))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = linear(0.0)
    resumed = ModelEMA(resumed_model, **kwargs)  # type: ignore[arg-type]
    resumed.load_state_dict(torch.load(buffer))
    assert (resumed.last_step, resumed.num_averaged) == (5, 3)
    run(resumed, resumed_model, range(6, 11))
    assert torch.equal(resumed.ema_model.weight, whole.ema_model.weight)
    assert (resumed.last_step, resumed.num_averaged) == (whole.last_step, whole.num_averaged) == (10, 8)


def test_an_explicit_momentum_leaves_the_schedule_alone_and_a_bare_update_needs_one() -> None:
    model = linear(0.0)
    ema = ModelEMA(model, decay=0.9)
    _set(model, 1.0)
    assert ema.update(0.5) == 0.5
    assert (ema.last_step, ema.num_averaged) == (0, 0)
    with pytest.raises(ValueError, match=r"give a momentum \(update\(0.5\)\) or a step"):
        ema.update(0.5, step=3)
    bare = ModelEMA(model)
    with pytest.raises(ValueError, match=r"update\(\) without a momentum needs a schedule: build the EMA with"):
        bare.update()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"momentum": 0.1, "decay": 0.9}, ValueError, r"not momentum \(0.1\) and decay \(0.9\)"),
        ({"decay": 1.0}, ValueError, r"Invalid decay: expected a value in \(0, 1\), found 1.0"),
        ({"half_life": "2ep"}, ValueError, "which only an engine knows: give it in iterations here"),
        ({"power_warmup": (1.0, 1.0)}, ValueError, "power_warmup needs a schedule to act on"),
        ({"start_iteration": 5}, ValueError, "start_iteration needs a schedule to act on"),
        ({"momentum": 0.1, "warmup_iters": 3}, ValueError, "needs both momentum_warmup and warmup_iters"),
        ({"exclude": "head.*"}, ValueError, "exclude pattern 'head.\\*' matches none of the model's tensors"),
        ({"exclude": 3}, TypeError, "exclude must be a name or pattern"),
    ],
)
def test_schedule_arguments_are_checked_before_anything_is_built(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ModelEMA(linear(), **kwargs)  # type: ignore[arg-type]


def test_a_decay_spelled_as_a_momentum_is_warned_about_at_construction() -> None:
    with pytest.warns(UserWarning, match="If 0.999 is a decay"):
        ModelEMA(linear(), momentum=0.999)
    with no_warnings():
        ModelEMA(linear(), decay=0.999)


def test_excluded_tensors_are_copied_from_the_student_not_averaged() -> None:
    model = BNNet()
    ema = ModelEMA(model, "update", momentum=0.5, exclude=("head.*", "bn.running_var"))
    assert not any(n.startswith("head.") or n == "bn.running_var" for n in ema.averaged_names)
    old = {k: v.clone() for k, v in ema.ema_model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
        model.bn.running_var.fill_(4.0)
        model.bn.running_mean.fill_(4.0)
    ema.update()
    now = ema.ema_model.state_dict()
    for name in ("head.weight", "head.bias", "bn.running_var"):  # copied by value
        assert torch.equal(now[name], model.state_dict()[name]), name
        assert now[name].data_ptr() != model.state_dict()[name].data_ptr(), name
    torch.testing.assert_close(now["conv.weight"], old["conv.weight"] + 1.0)  # averaged: halfway
    torch.testing.assert_close(now["bn.running_mean"], 0.5 * old["bn.running_mean"] + 2.0)


def test_an_ema_model_laid_out_otherwise_than_the_student_is_warned_about() -> None:
    student = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match=r"the EMA's tensor 'weight' \(1 in all\) is laid out with strides"):
        ema = ModelEMA(student, momentum=0.5, ema_model=nn.Conv2d(3, 4, 3))  # contiguous
    ema.update()
    torch.testing.assert_close(ema.ema_model.weight, student.weight.detach())  # copied in, then averaged with itself
    with no_warnings():
        ModelEMA(student, momentum=0.5)  # the deep copy keeps the student's layout


def test_a_head_replaced_then_changed_in_place_is_followed_both_times() -> None:
    # After following a new head, the EMA watches the new head's tensors, not the old ones.
    model, ema = _ema_of_bnnet()
    model.head = nn.Linear(4, 2)
    ema.update(0.5)
    before = ema.ema_model.head.weight.detach().clone()
    model.head.weight.data = torch.full_like(model.head.weight, 9.0)  # new storage, nothing registered
    ema.update(0.5)
    torch.testing.assert_close(ema.ema_model.head.weight, 0.5 * before + 4.5)


def test_an_unpickled_ema_still_notices_replaced_tensors(tmp_path: Path) -> None:
    model, ema = _ema_of_bnnet()
    torch.save({"model": model, "ema": ema}, tmp_path / "both.pt")
    script = f"""
import torch
from torch import nn
both = torch.load({str(tmp_path / "both.pt")!r}, weights_only=False)  # no EMA is built in this process
model, ema = both["model"], both["ema"]
old = ema.ema_model.head.weight.detach().clone()
model.head = nn.Linear(4, 2)
torch.nn.init.constant_(model.head.weight, 7.0)
ema.update(0.5)
assert torch.allclose(ema.ema_model.head.weight, 0.5 * old + 3.5), ema.ema_model.head.weight
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


_COPIES: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": saved_and_loaded,
}


@pytest.mark.parametrize("how", list(_COPIES))
@pytest.mark.parametrize(
    ("dtype", "kwargs"),
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.float32, {"tensors_only": True})],
    ids=["float32", "bf16 with float32 shadows", "tensors_only"],
)
def test_a_copied_ema_goes_on_averaging_its_own_student(how: str, dtype: torch.dtype, kwargs: dict[str, bool]) -> None:
    # A copy of the EMA holds a copy of its student (Python's copy semantics); it must keep averaging that one into
    # its own tensors, and leave the original alone. Copied parameters do not share storage with copied views of them.
    model = BNNet().to(dtype)
    ema = ModelEMA(model, "update", momentum=0.25, **kwargs)
    model(image_batches(1)[0].to(dtype))  # statistics the EMA has not seen
    ema.update()
    original = {k: v.clone() for k, v in ema.state_dict()["tensors"].items()}
    clone: ModelEMA = _COPIES[how](ema)
    assert clone.model is not model
    with torch.no_grad():
        for tensor in [*clone.model.parameters(), clone.model.bn.running_mean]:
            tensor.fill_(4.0)
    clone.update()
    got = clone.state_dict()["tensors"]
    for name in ("conv.weight", "head.bias", "bn.running_mean"):
        torch.testing.assert_close(got[name], 0.75 * original[name] + 0.25 * 4.0)  # in the shadow's dtype
    module = dict(clone.model_state_dict())
    torch.testing.assert_close(module["conv.weight"], got["conv.weight"].to(dtype))  # the mirror follows
    if clone.has_ema_model:
        assert torch.equal(clone.ema_model.conv.weight, got["conv.weight"].to(dtype))
    for name, value in ema.state_dict()["tensors"].items():
        assert torch.equal(value, original[name]), f"the original EMA's '{name}' moved"


def test_a_swapped_ema_cannot_be_copied() -> None:
    _model, ema = _ema_of_bnnet()
    with ema.swapped(), pytest.raises(RuntimeError, match="cannot be pickled or copied while it is swapped"):
        copy.deepcopy(ema)


class _WithExtraState(nn.Linear):
    def get_extra_state(self) -> dict[str, int]:
        return {"version": 3}

    def set_extra_state(self, state: dict[str, int]) -> None:
        assert state == {"version": 3}


def test_model_state_dict_carries_a_modules_extra_state() -> None:
    student = nn.Sequential(_WithExtraState(2, 2), nn.ReLU())
    ema = ModelEMA(student, momentum=0.5)
    exported = ema.model_state_dict()
    assert exported["0._extra_state"] == {"version": 3}
    plain = nn.Sequential(_WithExtraState(2, 2), nn.ReLU())
    plain.load_state_dict(exported)
    assert torch.equal(plain[0].weight, student[0].weight)


def test_a_half_life_shorter_than_the_steps_between_updates_is_warned_about_in_a_plain_loop() -> None:
    ema = ModelEMA(linear(), half_life=3)
    with no_warnings():
        ema.update(step=2)
    with pytest.warns(UserWarning, match=r"half_life=3 is 3 iterations in this run, shorter than the 4 step\(s\)"):
        ema.update(step=6)
