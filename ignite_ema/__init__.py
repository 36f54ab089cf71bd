"""ignite-ema: a model-weight EMA for PyTorch-Ignite that is right for mean-teacher training."""

from ignite_ema.averaging import ShadowAverager
from ignite_ema.handler import EMAHandler
from ignite_ema.schedules import HalfLife, MomentumSchedule

__all__ = ["EMAHandler", "HalfLife", "MomentumSchedule", "ShadowAverager"]
__version__ = "0.1.0"
