"""ignite-ema: a model-weight EMA for PyTorch-Ignite that is right for mean-teacher training."""

from ignite_ema.averaging import ShadowAverager
from ignite_ema.batchnorm import BNRecalibration, frozen_bn_stats, recalibrate_bn
from ignite_ema.handler import EMAHandler
from ignite_ema.schedules import HalfLife, MomentumSchedule

__all__ = [
    "BNRecalibration",
    "EMAHandler",
    "HalfLife",
    "MomentumSchedule",
    "ShadowAverager",
    "frozen_bn_stats",
    "recalibrate_bn",
]
__version__ = "0.1.0"
