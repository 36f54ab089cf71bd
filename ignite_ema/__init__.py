"""ignite-ema: a model-weight EMA for PyTorch-Ignite that is right for mean-teacher training.

The core (``ModelEMA``, the averaging kernels, the schedules) imports without
Ignite; the names that need Ignite (the handlers, the BatchNorm helpers, the
post-hoc EMA) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ignite_ema.averaging import ShadowAverager
from ignite_ema.model_ema import ModelEMA
from ignite_ema.modules import named_tensors, unwrap_model
from ignite_ema.schedules import HalfLife, MomentumSchedule

if TYPE_CHECKING:
    from ignite_ema.batchnorm import frozen_bn_stats, recalibrate_bn
    from ignite_ema.handlers.bn_recalibration import BNRecalibration
    from ignite_ema.handlers.ema_handler import EMAHandler
    from ignite_ema.posthoc.core import PostHocEMA
    from ignite_ema.posthoc.power import gamma_to_sigma_rel, power_momentum, sigma_rel_to_gamma
    from ignite_ema.posthoc.reconstruct import load_reconstruction, reconstruct_from_snapshots
    from ignite_ema.posthoc.snapshots import SnapshotInfo, list_snapshots, load_snapshot

__version__ = "0.1.0"

# Public names imported on first access, by module: the Ignite adapters (so that the core imports without Ignite)
# and the rest that a user of ModelEMA alone does not need to load.
_LAZY = {
    "ignite_ema.batchnorm": ("frozen_bn_stats", "recalibrate_bn"),
    "ignite_ema.handlers.bn_recalibration": ("BNRecalibration",),
    "ignite_ema.handlers.ema_handler": ("EMAHandler",),
    "ignite_ema.posthoc.core": ("PostHocEMA",),
    "ignite_ema.posthoc.power": ("gamma_to_sigma_rel", "power_momentum", "sigma_rel_to_gamma"),
    "ignite_ema.posthoc.reconstruct": ("load_reconstruction", "reconstruct_from_snapshots"),
    "ignite_ema.posthoc.snapshots": ("SnapshotInfo", "list_snapshots", "load_snapshot"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ignite_ema' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BNRecalibration",
    "EMAHandler",
    "HalfLife",
    "ModelEMA",
    "MomentumSchedule",
    "PostHocEMA",
    "ShadowAverager",
    "SnapshotInfo",
    "frozen_bn_stats",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "load_reconstruction",
    "load_snapshot",
    "named_tensors",
    "power_momentum",
    "recalibrate_bn",
    "reconstruct_from_snapshots",
    "sigma_rel_to_gamma",
    "unwrap_model",
]
