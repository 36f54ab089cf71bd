"""Tests for ignite_ema.batchnorm: frozen statistics, re-estimation, and the Ignite handler."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ignite_ema import BNRecalibration
from ignite_ema.batchnorm import frozen_bn_stats, recalibrate_bn
from ignite_ema.handlers.ema_handler import EMAHandler

# --------------------------------------------------------------------------- helpers


class ChannelMix(nn.Module):
    """A learnable channel mixing for inputs of any rank (N, C, ...), so gradients flow through BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("oc,nc...->no...", self.weight, x)


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def buffers_of(model: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for layer in bn_layers(model) for b in layer.buffers()]


def assert_same_buffers(model: nn.Module, expected: list[Tensor]) -> None:
    found = [b for layer in bn_layers(model) for b in layer.buffers()]
    assert len(found) == len(expected)
    for tensor, want in zip(found, expected, strict=True):
        assert torch.equal(tensor, want)


def batch_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of one batch (N, C, ...), as BatchNorm defines them."""
    per_channel = features.transpose(0, 1).reshape(features.shape[1], -1)
    n = per_channel.shape[1]
    mean = per_channel.sum(dim=1) / n
    var = ((per_channel - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
    return mean, var


def cumulative_stats(features: list[Tensor]) -> tuple[Tensor, Tensor]:
    """What BatchNorm with momentum=None holds after these batches: the average of per-batch statistics."""
    stats = [batch_stats(f) for f in features]
    mean = sum(m for m, _ in stats) / len(stats)
    var = sum(v for _, v in stats) / len(stats)
    return mean, var  # type: ignore[return-value]


def normalise_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """BatchNorm in train mode written out: batch mean and biased variance, per channel."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = per_channel.mean(dim=1)
    var = ((per_channel - mean[:, None]) ** 2).mean(dim=1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)


class CountingBatches:
    """A re-iterable list of batches that counts how many batches were drawn and how many passes began."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.drawn = 0
        self.passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for batch in self.batches:
            self.drawn += 1
            yield batch


class MustNotIterate:
    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("data was iterated")


# --------------------------------------------------------------------------- frozen_bn_stats

# (name, layer factory, input shape, lazy layer left uninitialised until the block)
LAYERS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], bool]] = [
    ("bn1d-NC", lambda: nn.BatchNorm1d(3), (8, 3), False),
    ("bn1d-NCL", lambda: nn.BatchNorm1d(3), (4, 3, 5), False),
    ("bn2d", lambda: nn.BatchNorm2d(3), (4, 3, 5, 5), False),
    ("bn3d", lambda: nn.BatchNorm3d(3), (2, 3, 3, 4, 4), False),
    ("momentum-None", lambda: nn.BatchNorm2d(3, momentum=None), (4, 3, 5, 5), False),
    ("untracked", lambda: nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 5, 5), False),
    ("not-affine", lambda: nn.BatchNorm1d(3, affine=False), (8, 3), False),
    ("sync", lambda: nn.SyncBatchNorm(3), (4, 3, 5), False),
    ("lazy1d", nn.LazyBatchNorm1d, (8, 3), False),
    ("lazy2d", nn.LazyBatchNorm2d, (4, 3, 5, 5), False),
    ("lazy3d", nn.LazyBatchNorm3d, (2, 3, 3, 4, 4), False),
    ("lazy2d-uninitialised", nn.LazyBatchNorm2d, (4, 3, 5, 5), True),
    ("lazy-momentum-None-uninitialised", lambda: nn.LazyBatchNorm1d(momentum=None), (8, 3), True),
]


def build(layer: Callable[[], nn.Module], shape: tuple[int, ...], warm_up: bool) -> nn.Module:
    """The same model every call: mixing, BatchNorm, mixing; statistics moved by two batches if warm_up."""
    torch.manual_seed(0)
    model = nn.Sequential(ChannelMix(shape[1]), layer(), ChannelMix(shape[1])).train()
    if warm_up:
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(shape) * 3 + 1)
    return model


@pytest.mark.parametrize(("layer", "shape", "uninitialised"), [p[1:] for p in LAYERS], ids=[p[0] for p in LAYERS])
def test_frozen_pass_computes_train_mode_outputs_and_grads_and_leaves_statistics(
    layer: Callable[[], nn.Module], shape: tuple[int, ...], uninitialised: bool
) -> None:
    model = build(layer, shape, warm_up=not uninitialised)
    reference = build(layer, shape, warm_up=not uninitialised)  # the same model, run in plain train mode
    untouched = build(layer, shape, warm_up=not uninitialised)  # never runs the frozen pass
    before = None if uninitialised else buffers_of(model)
    torch.manual_seed(1)
    x, weights = torch.randn(shape) * 2 - 1, torch.randn(shape)

    with frozen_bn_stats(model):
        out = model(x)
        (out * weights).sum().backward()
    ref_out = reference(x)
    (ref_out * weights).sum().backward()

    assert torch.equal(out, ref_out)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, ref_params[name].grad), name  # type: ignore[arg-type]
    bn = bn_layers(model)[0]
    if bn.affine:
        assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0

    if bn.track_running_stats:
        if before is None:  # a lazy layer first run in the block: initialised, statistics never updated
            before = [torch.zeros(shape[1]), torch.ones(shape[1]), torch.tensor(0)]
        assert_same_buffers(model, before)
        assert not torch.equal(bn_layers(reference)[0].running_mean, before[0])  # plain train mode moves them
    else:
        assert list(bn.buffers()) == []

    # No trace left: from here on the model tracks statistics exactly like one that never ran the block.
    assert bn.track_running_stats == bn_layers(untouched)[0].track_running_stats
    with torch.no_grad():
        for seed in (2, 3):
            torch.manual_seed(seed)
            batch = torch.randn(shape)
            assert torch.equal(model(batch), untouched(batch))
    assert_same_buffers(model, buffers_of(untouched))


def test_frozen_restores_everything_when_the_block_raises() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=None), nn.LazyBatchNorm1d(), nn.BatchNorm1d(3)).train()
    model[2].track_running_stats = False  # a layer the user does not track stays untracked
    model[0](torch.randn(8, 3))
    before = buffers_of(model[0])

    with pytest.raises(RuntimeError, match="boom"), frozen_bn_stats(model):
        model[0](torch.randn(8, 3))
        raise RuntimeError("boom")

    assert [layer.track_running_stats for layer in bn_layers(model)] == [True, True, False]
    assert_same_buffers(model[0], before)
    # The lazy layer never ran inside the block: its first run now initialises and tracks as usual.
    x = torch.randn(8, 3)
    model(x)
    mean, var = batch_stats(normalise_train(x, model[0].weight, model[0].bias, model[0].eps).detach())
    assert model[1].num_batches_tracked == 1
    torch.testing.assert_close(model[1].running_mean, 0.1 * mean)
    torch.testing.assert_close(model[1].running_var, 0.9 + 0.1 * var)
    assert model[0].num_batches_tracked == 2


def test_frozen_blocks_nest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm1d(momentum=None)).train()
    model[0](torch.randn(8, 3))
    before = buffers_of(model[0])

    with frozen_bn_stats(model):
        with frozen_bn_stats(model):
            model(torch.randn(8, 3))  # the lazy layer is initialised in the inner block
        model(torch.randn(8, 3))  # still inside the outer block: still frozen
        assert_same_buffers(model[0], before)
        assert model[1].num_batches_tracked == 0
        assert torch.equal(model[1].running_mean, torch.zeros(3))
    assert [layer.track_running_stats for layer in bn_layers(model)] == [True, True]

    x = torch.randn(8, 3)
    model(x)
    assert model[0].num_batches_tracked == 2
    assert model[1].num_batches_tracked == 1
    mean, var = batch_stats(normalise_train(x, model[0].weight, model[0].bias, model[0].eps).detach())
    torch.testing.assert_close(model[1].running_mean, mean)  # momentum=None: the first batch's statistics
    torch.testing.assert_close(model[1].running_var, var)


def test_frozen_covers_layers_switched_to_train_inside_and_leaves_eval_mode_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, momentum=None))
    model(torch.randn(4, 3, 2, 2))
    model.eval()
    reference = deepcopy(model)
    before = buffers_of(model)
    x = torch.randn(4, 3, 2, 2)

    with frozen_bn_stats(model):
        assert torch.equal(model(x), reference(x))  # eval mode: the running statistics normalise
        model.train()
        model(x)
    assert_same_buffers(model, before)
    assert model.training  # the block does not touch modes


def test_sam_two_pass_step_moves_statistics_once_per_iteration() -> None:
    """SAM: normal pass, ascent to perturbed weights, frozen second pass, descent with its gradient."""
    torch.manual_seed(0)
    momentum, iterations, rho = 0.3, 4, 0.5
    model = nn.Sequential(
        nn.BatchNorm1d(4, momentum=momentum),  # sees the data: its statistics have a closed form
        nn.Linear(4, 5),
        nn.BatchNorm1d(5, momentum=None),  # sees the first pass's features: a cumulative average
        nn.ReLU(),
        nn.Linear(5, 1),
    ).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(16, 4) * 2 + 1, torch.randn(16, 1)) for _ in range(iterations)]
    features_at_first_pass = []

    for x, y in batches:
        # Independent record of what the second BatchNorm should see: the first pass's weights, plain ops.
        with torch.no_grad():
            bn0, linear = model[0], model[1]
            normalised = normalise_train(x, bn0.weight, bn0.bias, bn0.eps)
            features_at_first_pass.append(normalised @ linear.weight.T + linear.bias)

        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params]))  # type: ignore[union-attr]
        with torch.no_grad():
            steps = [rho * p.grad / grad_norm for p in params]  # type: ignore[operator]
            for p, step in zip(params, steps, strict=True):
                p.add_(step)
        optimizer.zero_grad()
        with frozen_bn_stats(model):
            nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p, step in zip(params, steps, strict=True):
                p.sub_(step)
        optimizer.step()
        optimizer.zero_grad()

    expected_mean, expected_var = torch.zeros(4), torch.ones(4)
    for x, _ in batches:
        mean, var = batch_stats(x)
        expected_mean = (1 - momentum) * expected_mean + momentum * mean
        expected_var = (1 - momentum) * expected_var + momentum * var
    torch.testing.assert_close(model[0].running_mean, expected_mean)
    torch.testing.assert_close(model[0].running_var, expected_var)
    assert model[0].num_batches_tracked == iterations

    mean, var = cumulative_stats(features_at_first_pass)
    torch.testing.assert_close(model[2].running_mean, mean)
    torch.testing.assert_close(model[2].running_var, var)
    assert model[2].num_batches_tracked == iterations


# --------------------------------------------------------------------------- recalibrate_bn


def conv_model() -> nn.Sequential:
    """BatchNorm on the input, a 1x1 convolution, BatchNorm on its output; statistics set to wrong values."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(2, momentum=0.3),
        nn.Conv2d(2, 3, kernel_size=1),
        nn.BatchNorm2d(3, momentum=None),
        nn.Dropout(0.0),
    ).double()
    with torch.no_grad():
        for layer in bn_layers(model):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
        for _ in range(3):
            model(torch.randn(4, 2, 3, 3, dtype=torch.float64) * 5 - 3)
    return model.eval()


def expected_conv_model_stats(model: nn.Sequential, inputs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Each BatchNorm layer's statistics after a recalibration on ``inputs``, computed with plain ops."""
    bn0, conv = model[0], model[1]
    features = []
    for x in inputs:
        normalised = normalise_train(x, bn0.weight, bn0.bias, bn0.eps)
        mixed = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], normalised)
        features.append(mixed + conv.bias.view(1, -1, 1, 1))
    with torch.no_grad():
        return [cumulative_stats(inputs), cumulative_stats(features)]


def check_conv_model_stats(model: nn.Sequential, expected: list[tuple[Tensor, Tensor]], num_batches: int) -> None:
    for layer, (mean, var) in zip(bn_layers(model), expected, strict=True):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
        assert layer.num_batches_tracked == num_batches


def conv_inputs(count: int) -> list[Tensor]:
    torch.manual_seed(1)
    return [torch.randn(6, 2, 3, 3, dtype=torch.float64) * 2 + 1 for _ in range(count)]


def test_recalibrate_replaces_statistics_with_the_average_over_batches() -> None:
    model = conv_model()
    inputs = conv_inputs(4)

    assert recalibrate_bn(model, inputs) == 4

    check_conv_model_stats(model, expected_conv_model_stats(model, inputs), num_batches=4)
    assert [layer.momentum for layer in bn_layers(model)] == [0.3, None]
    assert not any(m.training for m in model.modules())


def test_recalibrate_draws_only_num_batches() -> None:
    model = conv_model()
    inputs = conv_inputs(5)
    data = CountingBatches(inputs)

    assert recalibrate_bn(model, data, num_batches=2) == 2

    assert data.drawn == 2  # not one more: each batch of a DataLoader may cost a worker's time
    check_conv_model_stats(model, expected_conv_model_stats(model, inputs[:2]), num_batches=2)
    assert recalibrate_bn(model, inputs, num_batches=10) == 5  # fewer batches than asked: all of them


def test_recalibrate_restores_each_submodules_mode_and_momentum() -> None:
    model = conv_model()
    model[0].train()
    model[3].train()
    model[0].momentum = 0.05
    modes = [m.training for m in model.modules()]

    recalibrate_bn(model, conv_inputs(2))

    assert [m.training for m in model.modules()] == modes
    assert [layer.momentum for layer in bn_layers(model)] == [0.05, None]


class FrozenBNSequential(nn.Sequential):
    """A model whose ``train()`` keeps its BatchNorm layers in eval mode, as detection backbones freeze them."""

    def train(self, mode: bool = True) -> FrozenBNSequential:
        super().train(mode)
        for layer in bn_layers(self):
            layer.eval()
        return self


def test_recalibrate_re_estimates_layers_that_the_models_train_keeps_in_eval_mode() -> None:
    model = FrozenBNSequential(*conv_model())
    inputs = conv_inputs(3)
    model.train()
    assert not any(layer.training for layer in bn_layers(model))

    assert recalibrate_bn(model, inputs) == 3

    # not the reset statistics (mean 0, variance 1) that eval-mode layers would have kept
    check_conv_model_stats(model, expected_conv_model_stats(model, inputs), num_batches=3)
    assert not any(layer.training for layer in bn_layers(model))


BATCH_FORMS: list[tuple[str, Callable[[Tensor], Any], Any]] = [
    ("tuple", lambda x: (x, torch.zeros(len(x))), None),
    ("list-index", lambda x: [torch.zeros(len(x)), x], 1),
    ("list-negative-index", lambda x: [torch.zeros(len(x)), x], -1),
    ("dict", lambda x: {"label": torch.zeros(len(x)), "image": x}, "image"),
    ("callable", lambda x: {"inputs": {"image": x}}, lambda batch: batch["inputs"]["image"]),
]


@pytest.mark.parametrize(("make_batch", "input_key"), [f[1:] for f in BATCH_FORMS], ids=[f[0] for f in BATCH_FORMS])
def test_recalibrate_finds_the_input_in_structured_batches(make_batch: Callable[[Tensor], Any], input_key: Any) -> None:
    model = conv_model()
    inputs = conv_inputs(3)

    assert recalibrate_bn(model, [make_batch(x) for x in inputs], input_key=input_key) == 3

    check_conv_model_stats(model, expected_conv_model_stats(model, inputs), num_batches=3)


def test_recalibrate_refuses_a_model_without_tracked_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    state = deepcopy(model.state_dict())

    with pytest.raises(ValueError, match="no normalisation layer with running statistics"):
        recalibrate_bn(model, MustNotIterate())
    with pytest.raises(ValueError, match="nothing to re-estimate"):
        BNRecalibration(model, [torch.zeros(2, 2)])

    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.training


def test_recalibrate_handles_an_uninitialised_lazy_layer() -> None:
    model = nn.Sequential(nn.LazyBatchNorm2d(momentum=0.2)).double().eval()
    inputs = conv_inputs(3)

    assert recalibrate_bn(model, inputs) == 3

    mean, var = cumulative_stats(inputs)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    assert model[0].momentum == 0.2
    assert not model.training


def _good() -> Tensor:
    return conv_inputs(1)[0]


BAD_DATA: list[tuple[str, Callable[[], list[Any]], Any, type[Exception], str]] = [
    ("dict-without-key", lambda: [{"image": _good()}], None, ValueError, r"keys \['image'\].*input_key="),
    ("dict-missing-key", lambda: [{"x": _good(), "y": 0}], "image", ValueError, r"'image' is not a key.*\['x', 'y'\]"),
    ("str", lambda: ["a batch"], None, TypeError, r"tensor, a tuple or list, or a dict; batch 0 is a str"),
    ("index-out-of-range", lambda: [(_good(),)], 1, ValueError, r"input_key=1 is out of range.*1 elements"),
    ("str-key-on-tuple", lambda: [(_good(), 0)], "image", TypeError, r"batch 0 is a tuple.*int index"),
    ("key-on-tensor", lambda: [_good()], 0, TypeError, r"batch 0 is a tensor.*input_key=None"),
    ("second-batch-bad", lambda: [_good(), {"image": _good()}], None, ValueError, r"batch 1 is a dict"),
    ("no-batches", lambda: [], None, ValueError, r"no batches"),
]


@pytest.mark.parametrize(
    ("make_data", "input_key", "error", "message"), [b[1:] for b in BAD_DATA], ids=[b[0] for b in BAD_DATA]
)
def test_recalibrate_rejects_bad_data_and_keeps_the_old_statistics(
    make_data: Callable[[], list[Any]], input_key: Any, error: type[Exception], message: str
) -> None:
    model = conv_model()
    before = buffers_of(model)

    with pytest.raises(error, match=message):
        recalibrate_bn(model, make_data(), input_key=input_key)

    assert_same_buffers(model, before)
    assert [layer.momentum for layer in bn_layers(model)] == [0.3, None]
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_batches": 0}, ValueError, "num_batches must be at least 1"),
        ({"num_batches": 2.0}, TypeError, "num_batches must be an int or None; found float"),
        ({"input_key": 1.5}, TypeError, "input_key must be None, an int index, a str key or a function"),
    ],
)
def test_recalibrate_rejects_bad_arguments_before_touching_anything(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    model = conv_model()
    before = buffers_of(model)
    with pytest.raises(error, match=message):
        recalibrate_bn(model, MustNotIterate(), **kwargs)
    assert_same_buffers(model, before)


# --------------------------------------------------------------------------- InstanceNorm, several inputs, named tuples


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """What InstanceNorm with running statistics takes from one batch (N, C, ...): per channel, the mean over the
    batch of each instance's mean and unbiased variance."""
    per_instance = x.reshape(x.shape[0], x.shape[1], -1)
    n = per_instance.shape[2]
    mean = per_instance.sum(dim=2) / n
    var = ((per_instance - mean[..., None]) ** 2).sum(dim=2) / (n - 1)
    return mean.mean(dim=0), var.mean(dim=0)


def test_frozen_leaves_instance_norm_statistics_alone_in_train_mode_and_its_eval_output_as_it_was() -> None:
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(2, track_running_stats=True, affine=True).double()
    norm(conv_inputs(1)[0])  # statistics worth keeping
    stats = [norm.running_mean.clone(), norm.running_var.clone()]
    x = conv_inputs(2)[1]
    reference, eval_reference = deepcopy(norm), deepcopy(norm).eval()
    with frozen_bn_stats(norm):
        out = norm(x)
        norm.eval()
        eval_out = norm(x)
        norm.train()
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)  # the train-mode output is unchanged
    torch.testing.assert_close(eval_out, eval_reference(x), rtol=0, atol=0)  # eval mode still uses the statistics
    assert torch.equal(norm.running_mean, stats[0]) and torch.equal(norm.running_var, stats[1])
    norm(x)  # outside the block they move again
    assert not torch.equal(norm.running_mean, stats[0])


def test_recalibrate_re_estimates_instance_norm_statistics_as_the_average_over_batches() -> None:
    norm = nn.Sequential(nn.InstanceNorm2d(2, track_running_stats=True, momentum=0.25)).double().eval()
    inputs = conv_inputs(3)
    assert recalibrate_bn(norm, inputs) == 3
    stats = [instance_stats(x) for x in inputs]
    torch.testing.assert_close(norm[0].running_mean, sum(m for m, _ in stats) / 3)
    torch.testing.assert_close(norm[0].running_var, sum(v for _, v in stats) / 3)
    assert norm[0].momentum == 0.25


class TwoInputs(nn.Module):
    """A model called as ``model(x, scale)``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2).double()

    def forward(self, x: Tensor, scale: float) -> Tensor:
        return self.bn(x * scale)


def test_recalibrate_runs_a_model_of_several_inputs_through_forward_fn() -> None:
    model = TwoInputs().eval()
    inputs = conv_inputs(3)
    batches = [{"x": x, "scale": 2.0} for x in inputs]
    assert recalibrate_bn(model, batches, forward_fn=lambda m, b: m(b["x"], b["scale"])) == 3
    mean, var = cumulative_stats([2.0 * x for x in inputs])
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)
    with pytest.raises(ValueError, match=r"forward_fn.* receives the whole batch.*found input_key='x'"):
        recalibrate_bn(model, batches, input_key="x", forward_fn=lambda m, b: m(b["x"], 1.0))
    with pytest.raises(TypeError, match="forward_fn must be a function"):
        BNRecalibration(model, batches, forward_fn="forward")  # type: ignore[arg-type]


def test_recalibrate_selects_a_named_tuple_field_by_name() -> None:
    from collections import namedtuple

    Batch = namedtuple("Batch", ["label", "image"])
    model = conv_model()
    inputs = conv_inputs(3)
    assert recalibrate_bn(model, [Batch(0, x) for x in inputs], input_key="image") == 3
    check_conv_model_stats(model, expected_conv_model_stats(model, inputs), num_batches=3)
    with pytest.raises(ValueError, match=r"input_key='img' is not a field of batch 0, whose fields are \['label'"):
        recalibrate_bn(model, [Batch(0, inputs[0])], input_key="img")


# --------------------------------------------------------------------------- BNRecalibration


def test_handler_recalibrates_the_ema_model_before_the_evaluator() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.2)
    train_batches = [(torch.randn(8, 3) * 2 + 1, torch.randn(8, 4)) for _ in range(5)]
    val_x = torch.randn(6, 3)
    train_data = CountingBatches(train_batches)

    def train_step(engine: Engine, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        optimizer.zero_grad()
        nn.functional.mse_loss(student(x), y).backward()
        optimizer.step()

    trainer = Engine(train_step)
    ema = EMAHandler(student, momentum=0.5)  # "copy": the EMA model holds the student's statistics
    ema.attach(trainer)
    BNRecalibration(ema.ema_model, train_data, num_batches=3).attach(trainer)
    modes_seen = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: modes_seen.append(ema.ema_model.training))

    evaluations = []

    def eval_step(engine: Engine, x: Tensor) -> None:
        ema.ema_model.eval()
        with torch.no_grad():
            linear, bn = ema.ema_model[0], ema.ema_model[1]
            evaluations.append(
                {
                    "output": ema.ema_model(x),
                    "weight": linear.weight.clone(),
                    "bias": linear.bias.clone(),
                    "running_mean": bn.running_mean.clone(),
                    "running_var": bn.running_var.clone(),
                    "bn_weight": bn.weight.clone(),
                    "bn_bias": bn.bias.clone(),
                    "student_mean": student[1].running_mean.clone(),
                }
            )

    evaluator = Engine(eval_step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run([val_x]))
    trainer.run(train_data, max_epochs=2)

    assert len(evaluations) == 2
    assert modes_seen == [False, False]  # the EMA model's mode ("copy": eval) is kept
    # 2 training passes of 5 batches, 2 recalibrations of 3 batches
    assert train_data.passes == 4 and train_data.drawn == 2 * 5 + 2 * 3
    bn = ema.ema_model[1]
    for seen in evaluations:
        features = [x @ seen["weight"].T + seen["bias"] for x, _ in train_batches[:3]]
        mean, var = cumulative_stats(features)
        torch.testing.assert_close(seen["running_mean"], mean)
        torch.testing.assert_close(seen["running_var"], var)
        assert not torch.allclose(seen["student_mean"], mean)  # what the EMA model would have had
        val_features = val_x @ seen["weight"].T + seen["bias"]
        expected_output = (val_features - mean) / torch.sqrt(var + bn.eps) * seen["bn_weight"] + seen["bn_bias"]
        torch.testing.assert_close(seen["output"], expected_output)
    torch.testing.assert_close(bn.running_mean, mean)  # the last epoch's statistics stay until the next update
    assert bn.num_batches_tracked == 3


def test_handler_keeps_a_model_in_train_mode() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2)).train()
    inputs = [torch.tensor([[0.0, 1.0], [2.0, 5.0]]), torch.tensor([[4.0, 1.0], [6.0, 3.0]])]

    assert BNRecalibration(model, inputs)(None) == 2

    assert model.training
    torch.testing.assert_close(model[0].running_mean, torch.tensor([3.0, 2.5]))
    # per-batch unbiased variances (2, 8) and (2, 2), averaged
    torch.testing.assert_close(model[0].running_var, torch.tensor([2.0, 5.0]))


def test_handler_rejects_a_one_shot_iterator() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(TypeError, match=r"re-iterable.*generator.*not iter\(loader\)"):
        BNRecalibration(model, (torch.zeros(2, 2) for _ in range(3)))
