"""BNRecalibration: :func:`~ignite_ema.recalibrate_bn` at an event of an Ignite engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList
from torch import nn

from ignite_ema.batchnorm import ForwardFn, InputKey, check_recalibration, recalibrate_bn

__all__ = ["BNRecalibration"]


class BNRecalibration:
    """Re-estimate a model's BatchNorm statistics on training batches at an event of an Ignite engine.

    Calls :func:`~ignite_ema.recalibrate_bn` on ``model`` (typically
    ``ema_handler.ema_model``) with a fresh pass over ``data`` each time, and
    leaves the model's train/eval mode as it was. Attach it to the trainer
    *before* the handler that runs the evaluator on the same event: handlers
    of one event run in the order they were added.

    Args:
        model: the model to recalibrate.
        data: a re-iterable source of batches (a ``DataLoader``, a list), not
            an iterator: each call iterates it afresh, so with a shuffling
            loader and ``num_batches`` each call sees other batches.
        num_batches: use at most this many batches per call (all by default).

    Keyword Args:
        input_key: where the model input is in a batch; see :func:`~ignite_ema.recalibrate_bn`.
        device: device for the inputs; the model's by default.
        forward_fn: ``forward_fn(model, batch)`` instead of ``input_key`` and
            ``device``; see :func:`~ignite_ema.recalibrate_bn`.

    Example:

        >>> import torch
        >>> from ignite.engine import Engine, Events
        >>> from ignite_ema import EMAHandler
        >>> from ignite_ema import BNRecalibration
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.BatchNorm1d(1))
        >>> _ = torch.nn.init.ones_(model[0].weight); _ = torch.nn.init.zeros_(model[0].bias)
        >>> batches = [torch.tensor([[0.0], [2.0]]), torch.tensor([[4.0], [6.0]])]
        >>> trainer = Engine(lambda engine, batch: None)   # stands for a training step
        >>> ema = EMAHandler(model, momentum=0.5)
        >>> ema.attach(trainer)
        >>> BNRecalibration(ema.ema_model, batches).attach(trainer, event=Events.EPOCH_COMPLETED)
        >>> # trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(val_loader))
        >>> _ = trainer.run(batches, max_epochs=1)
        >>> ema.ema_model[1].running_mean, ema.ema_model.training
        (tensor([3.]), False)
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        num_batches: int | None = None,
        *,
        input_key: InputKey = None,
        device: str | torch.device | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNRecalibration expects a torch.nn.Module; found {type(model).__name__}")
        if isinstance(data, Iterator) or not isinstance(data, Iterable):
            raise TypeError(
                f"data must be re-iterable (a DataLoader, a list); found {type(data).__name__}, which "
                "would be empty from the second call on. Pass the loader itself, not iter(loader)"
            )
        check_recalibration(model, num_batches, input_key, device, forward_fn)
        self.model = model
        self.data = data
        self.num_batches = num_batches
        self.input_key = input_key
        self.device = device
        self.forward_fn = forward_fn

    def attach(
        self,
        engine: Engine,
        event: str | Events | CallableEventWithFilter | EventsList = Events.EPOCH_COMPLETED,
    ) -> None:
        """Recalibrate on ``event`` of ``engine``; attach before the evaluator's handler of that event."""
        if not isinstance(engine, Engine):
            raise TypeError(f"attach expects an ignite Engine; found {type(engine).__name__}")
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine | None = None) -> int:
        """Recalibrate now; returns the number of batches used."""
        return recalibrate_bn(
            self.model,
            self.data,
            self.num_batches,
            input_key=self.input_key,
            device=self.device,
            forward_fn=self.forward_fn,
        )
