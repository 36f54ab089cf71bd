"""ignite-ema: a model-weight EMA for PyTorch-Ignite that is right for mean-teacher training."""

from ignite_ema.averaging import ShadowAverager
from ignite_ema.batchnorm import BNRecalibration, frozen_bn_stats, recalibrate_bn
from ignite_ema.handler import EMAHandler
from ignite_ema.launch import run_on_processes
from ignite_ema.model_ema import ModelEMA, named_tensors, unwrap_model
from ignite_ema.schedules import HalfLife, MomentumSchedule

__all__ = [
    "BNRecalibration",
    "EMAHandler",
    "HalfLife",
    "ModelEMA",
    "MomentumSchedule",
    "ShadowAverager",
    "frozen_bn_stats",
    "named_tensors",
    "recalibrate_bn",
    "run_on_processes",
    "unwrap_model",
]
__version__ = "0.1.0"
