"""ignite-ema: a model-weight EMA for PyTorch-Ignite that is right for mean-teacher training."""

from ignite_ema.averaging import ShadowAverager
from ignite_ema.batchnorm import BNRecalibration, frozen_bn_stats, recalibrate_bn
from ignite_ema.handler import EMAHandler
from ignite_ema.launch import run_on_processes
from ignite_ema.model_ema import ModelEMA, named_tensors, unwrap_model
from ignite_ema.posthoc import PostHocEMA
from ignite_ema.posthoc_math import gamma_to_sigma_rel, power_momentum, sigma_rel_to_gamma
from ignite_ema.posthoc_reconstruct import load_reconstruction, reconstruct_from_snapshots
from ignite_ema.posthoc_snapshots import SnapshotInfo, list_snapshots, load_snapshot
from ignite_ema.schedules import HalfLife, MomentumSchedule

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
    "run_on_processes",
    "sigma_rel_to_gamma",
    "unwrap_model",
]
__version__ = "0.1.0"
