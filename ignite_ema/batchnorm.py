"""BatchNorm helpers: statistics frozen for a second forward pass, and statistics re-estimated on data.

- :func:`frozen_bn_stats`: normalisation layers normalise with batch statistics but
  leave their running statistics alone (the second pass of SAM-like optimisers).
- :func:`recalibrate_bn`: reset and re-estimate the running statistics of every
  normalisation layer on some batches (the ``torch.optim.swa_utils.update_bn`` idea).

Both act on every layer with running statistics: the ``BatchNorm`` flavours
(``_BatchNorm``: 1d/2d/3d, lazy, ``SyncBatchNorm``) and ``InstanceNorm``
layers built with ``track_running_stats=True``.
Their Ignite handler, :class:`~ignite_ema.BNRecalibration`, lives in
:mod:`ignite_ema.handlers.bn_recalibration`; nothing here imports Ignite.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle

__all__ = ["ForwardFn", "InputKey", "check_recalibration", "frozen_bn_stats", "recalibrate_bn"]

#: Where the model input is in a batch: ``None`` (the batch itself if it is a
#: tensor, its first element if it is a tuple or list), an index into a tuple or
#: list, a key of a dict (or a field of a named tuple), or a function ``batch -> input``.
InputKey: TypeAlias = int | str | Callable[[Any], Any] | None
#: How to run the model on a batch, for models that take more than one input: ``forward_fn(model, batch)``.
ForwardFn: TypeAlias = Callable[[nn.Module, Any], Any]


# --------------------------------------------------------------------------- frozen statistics


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Let BatchNorm layers normalise with batch statistics without moving their running statistics.

    Two-pass optimisers such as SAM run a second forward/backward pass at
    perturbed weights. That pass must normalise exactly as a training pass
    does, but its statistics belong to weights that are never used, so they
    must not enter ``running_mean``, ``running_var`` or ``num_batches_tracked``.

    Inside the block every :class:`~torch.nn.modules.batchnorm._BatchNorm`
    of ``model`` (``BatchNorm1d/2d/3d``, their lazy variants, ``SyncBatchNorm``;
    any ``momentum``, including ``None``) and every ``InstanceNorm`` with
    ``track_running_stats=True`` in train mode computes the same output and
    gradients as in plain train mode, while its buffers stay bit-identical;
    affine weights still receive gradients. Layers in eval mode
    behave as usual (they never update their statistics). Layers switched to
    train mode inside the block are frozen too. On exit, also by exception,
    every attribute touched is restored; blocks nest.

    For BatchNorm it sets each layer's ``track_running_stats`` to ``False`` for
    the duration of the block: in train mode torch then uses batch statistics,
    does not increment ``num_batches_tracked`` and passes no running buffers to
    ``F.batch_norm`` (so nothing can write them); eval mode ignores the flag.
    Under ``torch.compile`` each state of the flag is compiled once.
    InstanceNorm layers get forward hooks that put their statistics back after
    each forward in train mode.

    Args:
        model: the model whose BatchNorm layers are frozen (any module).

    Example:

        >>> import torch
        >>> from ignite_ema.batchnorm import frozen_bn_stats
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).train()
        >>> x = torch.randn(8, 2)
        >>> with frozen_bn_stats(model):
        ...     model(x).square().sum().backward()   # e.g. SAM's second pass
        >>> model[1].num_batches_tracked, model[1].running_mean
        (tensor(0), tensor([0., 0., 0.]))
        >>> model[1].weight.grad is not None
        True
        >>> _ = model(x)                             # outside: the statistics move again
        >>> model[1].num_batches_tracked
        tensor(1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen_bn_stats expects a torch.nn.Module; found {type(model).__name__}")
    saved: list[tuple[_BatchNorm, bool]] = []
    hooks: list[RemovableHandle] = []
    kept: dict[_InstanceNorm, list[Tensor]] = {}

    def freeze(layer: _BatchNorm) -> None:
        saved.append((layer, layer.track_running_stats))
        layer.track_running_stats = False

    def freeze_after_lazy_init(layer: nn.Module, args: Any) -> None:
        if isinstance(layer, _BatchNorm) and layer.track_running_stats:
            freeze(layer)

    # InstanceNorm updates its running statistics in train mode whatever track_running_stats says (and in eval
    # mode the flag would change its output), so its statistics are kept aside around each training forward.
    def keep(layer: nn.Module, args: Any) -> None:
        if isinstance(layer, _InstanceNorm) and layer.training and layer.track_running_stats:
            kept[layer] = [t.clone() for t in _running_stats(layer)]

    def put_back(layer: nn.Module, args: Any, output: Any) -> None:
        if isinstance(layer, _InstanceNorm) and layer in kept:
            with torch.no_grad():
                torch._foreach_copy_(_running_stats(layer), kept.pop(layer))

    for layer in model.modules():
        if isinstance(layer, _InstanceNorm):
            hooks.append(layer.register_forward_pre_hook(keep))
            hooks.append(layer.register_forward_hook(put_back))
        elif not isinstance(layer, _BatchNorm):
            continue
        elif isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            # A lazy layer materialises its running buffers at its first forward only if
            # track_running_stats is on then. Its initialisation hook was registered at
            # construction, so a hook registered now runs after it: freeze the layer there.
            hooks.append(layer.register_forward_pre_hook(freeze_after_lazy_init))
        else:
            freeze(layer)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        # Reversed, so that a layer recorded twice ends with its first (original) value.
        for layer, track_running_stats in reversed(saved):
            layer.track_running_stats = track_running_stats


# --------------------------------------------------------------------------- re-estimation


def recalibrate_bn(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    *,
    input_key: InputKey = None,
    device: str | torch.device | None = None,
    forward_fn: ForwardFn | None = None,
) -> int:
    """Reset the running statistics of every normalisation layer and re-estimate them on ``data``.

    The idea of :func:`torch.optim.swa_utils.update_bn`: after averaging
    weights (SWA, EMA) the running statistics belong to other weights, so they
    are recomputed with a forward pass over training batches. Each layer's
    statistics become the plain (cumulative) average over the batches seen of
    each batch's mean and unbiased variance, as BatchNorm computes with
    ``momentum=None``. With equal-sized batches the mean is the mean over all
    samples seen.

    During the pass the whole model is in train mode (so dropout is active, as
    in ``update_bn``) and under ``torch.no_grad()``; afterwards every
    submodule's mode and every layer's ``momentum`` are as before. Layers with
    ``track_running_stats=False`` have no statistics and are left alone; a
    model without any layer that has statistics is a ``ValueError`` (there is
    nothing to re-estimate: the wrong model?) and ``data`` is not iterated. If the
    pass fails (a malformed batch, an error in the model, no batches at all),
    the statistics are restored to their values before the call.

    Args:
        model: the model to recalibrate, e.g. ``ema_handler.ema_model``.
        data: batches, e.g. a training ``DataLoader``. Each batch is a tensor,
            a tuple/list or a dict; see ``input_key``.
        num_batches: use at most this many batches (all by default). Exactly
            this many are drawn from ``data``.

    Keyword Args:
        input_key: where the model input is in a batch: ``None`` (default) for
            the batch itself if it is a tensor and its first element if it is a
            tuple or list; an ``int`` index into a tuple or list; a key of a
            dict (required for dict batches) or a field of a named tuple; or a
            function ``batch -> input``. The input may be a tensor or a
            tuple/list/dict of tensors; the model is called as ``model(input)``.
        device: move inputs to this device; by default the device of the
            model's first parameter or buffer.
        forward_fn: instead of ``input_key`` and ``device``, how to run the
            model on a batch, ``forward_fn(model, batch)``: for models that
            take several inputs (``model(x, mask)``). It moves what it needs.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``data`` yielded no batches, a batch lacks ``input_key``,
            or ``forward_fn`` came with ``input_key`` or ``device``.
        TypeError: a batch is of a kind ``input_key`` cannot select from.

    Example:

        >>> import torch
        >>> from ignite_ema.batchnorm import recalibrate_bn
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(1), torch.nn.Linear(1, 1)).eval()
        >>> batches = [(torch.tensor([[0.0], [2.0]]), 0), (torch.tensor([[4.0], [6.0]]), 1)]
        >>> recalibrate_bn(model, batches)   # inputs are the first elements
        2
        >>> model[0].running_mean, model[0].running_var   # means 1 and 5, unbiased variances 2 and 2
        (tensor([3.]), tensor([2.]))
        >>> model[0].momentum, model.training
        (0.1, False)
    """
    layers = check_recalibration(model, num_batches, input_key, device, forward_fn)
    if device is None:
        device = _model_device(model)

    modes = [(module, module.training) for module in model.modules()]
    momenta = [(layer, layer.momentum) for layer in layers]
    # Uninitialised lazy layers have nothing to keep: their first forward resets them anyway.
    initialised = [layer for layer in layers if not _is_uninitialised(layer)]
    saved_stats = [(layer, [t.clone() for t in _running_stats(layer)]) for layer in initialised]
    used = 0
    try:
        with torch.no_grad():
            for layer in initialised:
                layer.reset_running_stats()
            model.train()
            for layer in layers:  # even where a custom train() keeps some BatchNorm in eval mode
                layer.train()
            for batch in itertools.islice(data, num_batches):
                # A momentum of 1/k at the k-th batch makes the statistics the plain average over the batches
                # (BatchNorm's momentum=None does the same through num_batches_tracked; InstanceNorm has no such mode).
                for layer in layers:
                    layer.momentum = 1.0 / (used + 1)
                if forward_fn is not None:
                    forward_fn(model, batch)
                else:
                    model(_to_device(_select_input(batch, input_key, used), device))
                used += 1
        if used == 0:
            raise ValueError(
                f"recalibrate_bn: data yielded no batches ({type(data).__name__}); the statistics would be "
                "left reset. Pass a non-empty iterable of batches (an exhausted iterator or generator is empty)"
            )
    except BaseException:
        with torch.no_grad():
            for layer, tensors in saved_stats:
                for target, value in zip(_running_stats(layer), tensors, strict=True):
                    target.copy_(value)
        raise
    finally:
        for layer, momentum in momenta:
            layer.momentum = momentum
        # Set the flag directly: calling train() on a parent would overwrite its children's modes.
        for module, training in modes:
            module.training = training
    return used


def check_recalibration(
    model: nn.Module, num_batches: object, input_key: object, device: object, forward_fn: object
) -> list[_NormBase]:
    """Check :func:`recalibrate_bn`'s arguments (for it and its Ignite handler); returns the layers it re-estimates."""
    _check_num_batches(num_batches)
    _check_input_key(input_key)
    _check_forward_fn(forward_fn, input_key, device)
    return _layers_with_statistics(model)


def _to_device(inputs: Any, device: str | torch.device | None) -> Any:
    """``inputs`` with every tensor in it (tuples, lists, dicts of them too) on ``device``; as it is for ``None``."""
    if device is None:
        return inputs
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, inputs)


def _layers_with_statistics(model: nn.Module) -> list[_NormBase]:
    """The normalisation layers with running statistics; a ``ValueError`` when there are none."""
    layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    if not layers:
        raise ValueError(
            f"recalibrate_bn: {type(model).__name__} has no normalisation layer with running statistics (BatchNorm, "
            "or InstanceNorm with track_running_stats=True), so there is nothing to re-estimate. Pass the model that "
            "has them (the EMA model, say), or drop the recalibration"
        )
    return layers


def _running_stats(layer: _NormBase) -> list[Tensor]:
    return [t for t in (layer.running_mean, layer.running_var, layer.num_batches_tracked) if t is not None]


def _is_uninitialised(layer: nn.Module) -> bool:
    return isinstance(layer, LazyModuleMixin) and bool(layer.has_uninitialized_params())


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _select_input(batch: Any, input_key: InputKey, position: int) -> Any:
    """The model input in ``batch``; errors name the batch (``position``, from 0) and what was expected."""
    if callable(input_key):
        return input_key(batch)
    where = f"batch {position}"
    if isinstance(batch, Tensor):
        if input_key is not None:
            raise TypeError(
                f"input_key={input_key!r} selects from a tuple/list or dict, but {where} is a tensor; "
                "pass input_key=None to use tensor batches as the input"
            )
        return batch
    if isinstance(batch, Mapping):
        if input_key is None:
            raise ValueError(f"{where} is a dict with keys {list(batch)}; pass input_key=<the key of the model input>")
        if input_key not in batch:
            raise ValueError(f"input_key={input_key!r} is not a key of {where}, whose keys are {list(batch)}")
        return batch[input_key]
    if isinstance(batch, tuple) and hasattr(batch, "_fields") and isinstance(input_key, str):
        if input_key not in batch._fields:
            raise ValueError(
                f"input_key={input_key!r} is not a field of {where}, whose fields are {list(batch._fields)}"
            )
        return getattr(batch, input_key)
    if isinstance(batch, (tuple, list)):
        index = 0 if input_key is None else input_key
        if not isinstance(index, int):
            raise TypeError(
                f"{where} is a {type(batch).__name__}, which input_key={input_key!r} cannot index; "
                "pass an int index, or a function batch -> input"
            )
        if not -len(batch) <= index < len(batch):
            raise ValueError(
                f"input_key={index} is out of range for {where}, a {type(batch).__name__} of {len(batch)} elements"
            )
        return batch[index]
    raise TypeError(
        f"expected each batch to be a tensor, a tuple or list, or a dict; {where} is a {type(batch).__name__}. "
        "Pass input_key=<function batch -> input> for other batch structures"
    )


def _check_num_batches(num_batches: object) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int):
        raise TypeError(f"num_batches must be an int or None; found {type(num_batches).__name__} {num_batches!r}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1 (or None for all batches); found {num_batches}")


def _check_forward_fn(forward_fn: object, input_key: object, device: object) -> None:
    if forward_fn is None:
        return
    if not callable(forward_fn):
        raise TypeError(f"forward_fn must be a function (model, batch) -> output; found {type(forward_fn).__name__}")
    if input_key is not None or device is not None:
        raise ValueError(
            "forward_fn(model, batch) receives the whole batch and moves what it needs: pass input_key and device "
            f"only without it; found input_key={input_key!r}, device={device!r}"
        )


def _check_input_key(input_key: object) -> None:
    if input_key is None or callable(input_key) or isinstance(input_key, str):
        return
    if isinstance(input_key, bool) or not isinstance(input_key, int):
        raise TypeError(
            "input_key must be None, an int index, a str key or a function batch -> input; "
            f"found {type(input_key).__name__} {input_key!r}"
        )
