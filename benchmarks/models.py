"""The models the EMA is benchmarked on, and what an EMA of each has to average.

- ``conv``: few large tensors, a 3x3 conv stack of ~15M parameters with BatchNorm.
- ``transformer``: ``nn.TransformerEncoder``, ~10M parameters in ~150 tensors.
- ``small``: many small tensors, 200 tiny Linear + LayerNorm + BatchNorm blocks
  (1,800 tensors, ~0.1M elements).

The EMA's share of a training step is measured on the SED example's CRNN (``examples.sed_f1.model``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from torch import Tensor, nn

from ignite_ema import named_tensors

__all__ = ["MODELS", "ModelSpec", "averaged_pairs", "describe"]


def conv_stack() -> nn.Module:
    """Few large tensors: 3x3 convs 3 -> 256 -> 512 -> 1024 -> 1024 channels, each with BatchNorm."""
    widths = (3, 256, 512, 1024, 1024)
    layers: list[nn.Module] = []
    for c_in, c_out in pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


def transformer_encoder() -> nn.Module:
    """An input projection and 12 encoder layers of width 256: ~9.5M parameters in 148 tensors."""
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=8, dim_feedforward=1024, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=12, norm=nn.LayerNorm(256), enable_nested_tensor=False)
    return nn.Sequential(nn.Linear(128, 256), encoder)


class _TinyBlock(nn.Module):
    """Linear + LayerNorm + BatchNorm1d: 9 tensors (one of them an integer buffer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.bn(self.ln(self.fc(x)))
        return out


def many_small(blocks: int = 200, width: int = 20) -> nn.Module:
    """Many small tensors: 200 blocks of width 20, 1,800 tensors of ~0.1M elements in all."""
    return nn.Sequential(*[_TinyBlock(width) for _ in range(blocks)])


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and how many updates one timed run does."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    updates_per_run: int


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("conv", "(a) conv stack, few large tensors", conv_stack, 6),
    ModelSpec("transformer", "(b) TransformerEncoder", transformer_encoder, 8),
    ModelSpec("small", "(c) many small tensors", many_small, 48),
)


def averaged_pairs(ema: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(ema, student) floating tensors, then (ema, student) integer buffers, matched by name, as registered."""
    ema_t, student_t = named_tensors(ema), named_tensors(student)
    floating = [n for n, t in ema_t.items() if t.is_floating_point()]
    integer = [n for n, t in ema_t.items() if not t.is_floating_point()]
    return (
        [ema_t[n] for n in floating],
        [student_t[n] for n in floating],
        [ema_t[n] for n in integer],
        [student_t[n] for n in integer],
    )


def describe(model: nn.Module) -> dict[str, int]:
    """Counts that set the cost of an update: tensors, averaged elements, integer buffers."""
    tensors = named_tensors(model).values()
    floating = [t for t in tensors if t.is_floating_point()]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(tensors),
        "averaged_tensors": len(floating),
        "averaged_elements": sum(t.numel() for t in floating),
        "integer_buffers": len(tensors) - len(floating),
    }
