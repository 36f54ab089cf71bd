"""Small models and data shared by the handler tests."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from ignite.engine import Engine
from torch import nn

from ignite_ema import EMAHandler

COUNTERS = ("num_averaged", "last_update_iteration", "num_skipped", "iteration_offset")


def adding_step(model: nn.Module, amount: float = 1.0) -> Callable[[Engine, object], None]:
    """A training step that stands for an optimiser step: every parameter grows by ``amount``."""

    def step(engine: Engine, batch: object) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(amount)

    return step


def linear(value: float = 1.0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """``nn.Linear(2, 1)`` without bias, every weight ``value``: easy to follow by hand."""
    model = nn.Linear(2, 1, bias=False).to(dtype)
    nn.init.constant_(model.weight, value)
    return model


class BNNet(nn.Module):
    """Conv, BatchNorm, linear head: the smallest model with running statistics worth averaging."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def image_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 6, 6, generator=gen) for _ in range(n)]


def saved_and_loaded(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load``, in memory (a checkpoint of whole objects)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def clone_state(handler: EMAHandler) -> dict[str, Any]:
    """``handler.state_dict()`` with its tensors copied: a snapshot that later updates leave alone."""
    state = handler.state_dict()
    return {**state, "tensors": {k: v.clone() for k, v in state["tensors"].items()}}


def assert_same_state(got: Mapping[str, Any], want: Mapping[str, Any], context: object = None) -> None:
    """Two handler states agree: every counter, and every tensor bit for bit."""
    for key in COUNTERS:
        assert got[key] == want[key], (context, key)
    for name, tensor in want["tensors"].items():
        assert torch.equal(got["tensors"][name], tensor), (context, name)


@contextmanager
def no_warnings() -> Iterator[None]:
    """Turn any warning into an error: for code paths that must stay silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
