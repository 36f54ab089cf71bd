"""One training run of the SED comparison: a CRNN trained with mean teacher, evaluated along the way.

The runs differ only in what keeps the teacher:

==============  =====================================================================
``supervised``  no teacher: the student on the labelled clips only
``ignite-copy`` ``ignite.handlers.EMAHandler(handle_buffers="copy")``, as the report used
``copy``        ``ignite_ema.EMAHandler(handle_buffers="copy")``
``update``      ``ignite_ema.EMAHandler(handle_buffers="update")``
``ema_train``   ``ignite_ema.EMAHandler(handle_buffers="ema_train")``
``copy+recal``  ``copy``, with the teacher's BatchNorm statistics re-estimated before each evaluation
==============  =====================================================================
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events, create_supervised_evaluator
from ignite.handlers import EMAHandler as UpstreamEMAHandler
from ignite.handlers import PiecewiseLinear, ProgressBar, global_step_from_engine
from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger
from ignite.metrics import Metric
from torch import Tensor, nn

from examples.mean_teacher import create_mean_teacher_trainer
from examples.sed_f1.data import SEDData, SEDSet
from examples.sed_f1.metrics import SCORES, SEDScores
from examples.sed_f1.model import CRNN
from examples.sed_f1.motion import ConvMotion
from examples.sed_f1.postprocess import MEDIAN_FRAMES, median_filter
from examples.sed_f1.psds import PSDSScores
from ignite_ema import BNRecalibration, EMAHandler, unwrap_model

#: Every score of a model at an evaluation: the F1s of metrics.py and the intersection-based scores of psds.py.
ALL_SCORES = (*SCORES, "psds1", "psds2", "intersection_f1")
OPTIMIZERS = ("adam", "adamw")

RUNS: dict[str, str] = {  # run name -> buffer mode of its teacher
    "supervised": "none",
    "ignite-copy": "copy",
    "copy": "copy",
    "update": "update",
    "ema_train": "ema_train",
    "copy+recal": "copy",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides its name and seed."""

    iterations: int = 1000
    eval_every: int = 200
    labelled_per_batch: int = 6
    unlabelled_per_batch: int = 12
    optimizer: str = "adam"  # or "adamw": decoupled weight decay, on every parameter
    lr: float = 4e-3
    # the fraction of the iterations after which the learning rate falls linearly to 0 at the end (1.0: constant)
    lr_decay_start: float = 1.0
    weight_decay: float = 0.0  # AdamW's
    ema_decay: float = 0.998  # momentum = 1 - decay
    consistency_weight: float = 2.0
    rampup_fraction: float = 0.25  # of the iterations: the consistency weight's sigmoid ramp-up (DCASE: 50/200)
    recal_batches: int = 20
    median_frames: int = MEDIAN_FRAMES  # median filter on the frame scores before every score

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; found {self.optimizer!r}")
        if self.weight_decay and self.optimizer != "adamw":
            raise ValueError(f"weight_decay is AdamW's; found weight_decay={self.weight_decay} with {self.optimizer}")
        if not 0.0 <= self.lr_decay_start <= 1.0:
            raise ValueError(f"lr_decay_start must be a fraction in [0, 1]; found {self.lr_decay_start}")

    @property
    def constant_lr_until(self) -> int:
        """The iteration after which the learning rate decays (``iterations`` when it stays constant)."""
        return int(self.lr_decay_start * self.iterations)

    @property
    def lr_schedule(self) -> str:
        """The decay in words, for a run's description ("" when the learning rate stays constant)."""
        return f", to 0 from iteration {self.constant_lr_until}" if self.lr_decay_start < 1.0 else ""


@dataclass
class RunResult:
    name: str
    mode: str
    seed: int
    teacher: dict[str, float] | None
    student: dict[str, float]
    seconds: float
    # per conv layer, |teacher weights| / |student weights| at the end: averaging rotating weights shrinks them
    conv_norm_ratio: list[float] | None = None
    optimizer: str = "adam"
    # iteration -> {"teacher": scores, "student": scores, "motion": ConvMotion.snapshot()} at each evaluation
    curve: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mixed_batches(
    data: SEDData, config: TrainConfig, seed: int
) -> Iterator[tuple[Tensor, tuple[Tensor, Tensor], Tensor]]:
    """Endless ``(x, (frame_targets, clip_targets), labelled)`` batches: labelled clips first, then unlabelled ones.

    In a distributed run each rank draws its own share of the batch, from its own stream of random numbers.
    """
    rank, world = idist.get_rank(), idist.get_world_size()
    gen = torch.Generator().manual_seed(seed + 7919 * rank)  # rank 0 (and a single process) keeps the seed
    lx, ly = torch.from_numpy(data.labelled.x), torch.from_numpy(data.labelled.y)
    ux = torch.from_numpy(data.unlabelled.x)
    n_lab, n_unl = max(1, config.labelled_per_batch // world), max(1, config.unlabelled_per_batch // world)
    unlabelled_targets = torch.zeros(n_unl, *ly.shape[1:])  # never read: the trainer masks them out
    mask = torch.arange(n_lab + n_unl) < n_lab
    while True:
        li = torch.randint(len(lx), (n_lab,), generator=gen)
        ui = torch.randint(len(ux), (n_unl,), generator=gen)
        frames = torch.cat([ly[li], unlabelled_targets])
        yield torch.cat([lx[li], ux[ui]]), (frames, frames.amax(dim=1)), mask


def supervised_loss(output: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]) -> Tensor:
    """Binary cross-entropy on frames (strong labels) and on clips (tags)."""
    bce = nn.functional.binary_cross_entropy
    return bce(output[0], target[0]) + bce(output[1], target[1])


def consistency_loss(student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor]) -> Tensor:
    """Mean squared difference of frame and clip probabilities (as in the DCASE mean-teacher baselines)."""
    mse = nn.functional.mse_loss
    return mse(student[0], teacher[0]) + mse(student[1], teacher[1])


def _evaluator(model: nn.Module, frame_seconds: float, median_frames: int) -> Engine:
    """Ignite's evaluator (eval mode, no grad) whose output is (median-filtered frame_probs, clip_probs, targets)."""
    metrics: dict[str, Metric] = {"sed": SEDScores(frame_seconds), "psds": PSDSScores(frame_seconds)}

    def output(x: Tensor, y: Tensor, y_pred: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return median_filter(y_pred[0], median_frames), y_pred[1], y

    return create_supervised_evaluator(model, metrics, output_transform=output)


def _scores(evaluator: Engine, test: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    metrics = evaluator.run(test).metrics
    return dict(metrics["sed"]) | dict(metrics["psds"])


def evaluates_at(iteration: int, config: TrainConfig) -> bool:
    """Every ``eval_every`` iterations and at the end, but not twice close together just before the end.

    The plateau check compares the last two evaluations, which must be about ``eval_every`` apart:

    >>> config = TrainConfig(iterations=2500, eval_every=312)
    >>> [i for i in range(1, 2501) if evaluates_at(i, config)][-3:]
    [1872, 2184, 2500]
    """
    if iteration == config.iterations:
        return True
    return iteration % config.eval_every == 0 and config.iterations - iteration >= config.eval_every // 2


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW with ``config.weight_decay`` on every parameter."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _test_batches(test: SEDSet, batch_size: int = 100) -> list[tuple[Tensor, Tensor]]:
    """This rank's share of the test set (all of it in a single process): the metrics sum the counts of all ranks.

    At least one batch per rank (the metrics need one on every rank), of at most about ``batch_size`` clips.
    """
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    world = idist.get_world_size()
    n_batches = max(world, math.ceil(len(x) / batch_size))
    batches = list(zip(torch.tensor_split(x, n_batches), torch.tensor_split(y, n_batches), strict=True))
    return batches[idist.get_rank() :: world]


def train_run(
    name: str,
    seed: int,
    data: SEDData,
    config: TrainConfig,
    log_dir: Path | None = None,
    on_iterations: Callable[[int], None] | None = None,
    every: int = 50,
    progress_bar: bool = False,
) -> RunResult:
    """Train one run and evaluate teacher and student every ``config.eval_every`` iterations and at the end.

    ``on_iterations(n)`` is called with ``n = every`` every ``every`` iterations, and at the end with the rest
    (progress reporting), or an Ignite ProgressBar shows the run (``progress_bar``); TensorBoard event files go
    to ``log_dir``. Under ``torch.distributed`` the student is trained with DDP, each rank drawing its share of
    every batch, and rank 0 reports and logs.
    """
    if name not in RUNS:
        raise ValueError(f"unknown run {name!r}; expected one of {list(RUNS)}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    n_mels = data.labelled.x.shape[2]
    # In a distributed run (see compare.py) the student is wrapped in DistributedDataParallel; else unchanged.
    student = idist.auto_model(CRNN(n_classes=len(data.classes), n_mels=n_mels), sync_bn=False)
    optimizer = make_optimizer(student, config)
    momentum = 1.0 - config.ema_decay
    handler: EMAHandler | UpstreamEMAHandler | None = None
    if name == "ignite-copy":
        handler = UpstreamEMAHandler(student, momentum=momentum, handle_buffers="copy")
    elif name != "supervised":
        # Across ranks the EMA weights agree but the statistics do not: average them at each update (a no-op in a
        # single process).
        handler = EMAHandler(student, momentum=momentum, handle_buffers=RUNS[name], sync_buffers="update")
    trainer = create_mean_teacher_trainer(
        student,
        handler,
        optimizer,
        supervised_loss,
        consistency_loss,
        consistency_weight=config.consistency_weight,
        rampup_iters=int(config.rampup_fraction * config.iterations),
    )
    teacher = handler.ema_model if handler is not None else None
    if config.lr_decay_start < 1.0:
        milestones = [(config.constant_lr_until, config.lr), (config.iterations, 0.0)]
        trainer.add_event_handler(Events.ITERATION_STARTED, PiecewiseLinear(optimizer, "lr", milestones))

    test = _test_batches(data.test)
    # no DDP collectives in evaluation
    student_eval = _evaluator(unwrap_model(student), data.frame_seconds, config.median_frames)
    teacher_eval = _evaluator(teacher, data.frame_seconds, config.median_frames) if teacher is not None else None
    motion = ConvMotion(unwrap_model(student), teacher, rate=momentum)
    motion.attach(trainer)
    curve: dict[int, dict[str, dict[str, Any]]] = {}
    evaluate_at = Events.ITERATION_COMPLETED(event_filter=lambda _, i: evaluates_at(i, config))
    if name == "copy+recal" and teacher is not None:
        train_x = np.concatenate([data.labelled.x, data.unlabelled.x])
        batches = np.array_split(train_x[: 24 * config.recal_batches], config.recal_batches)
        recal_data = [torch.from_numpy(b) for b in batches]
        BNRecalibration(teacher, recal_data).attach(trainer, event=evaluate_at)

    @trainer.on(evaluate_at)
    def evaluate(engine: Engine) -> None:
        point: dict[str, dict[str, Any]] = {"student": _scores(student_eval, test), "motion": motion.snapshot()}
        if teacher_eval is not None:
            point["teacher"] = _scores(teacher_eval, test)
        curve[engine.state.iteration] = point

    if idist.get_rank() > 0:  # in a distributed run, rank 0 reports progress and logs
        on_iterations, log_dir, progress_bar = None, None, False
    if progress_bar:
        bar = ProgressBar(desc=f"{name} seed {seed}, iterations", persist=True)
        bar.attach(trainer, output_transform=lambda out: out["loss"])
    if on_iterations is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), lambda: on_iterations(every))
        if config.iterations % every:  # the iterations after the last multiple of every
            trainer.add_event_handler(Events.COMPLETED, lambda: on_iterations(config.iterations % every))
    if log_dir is not None:
        _attach_tensorboard(trainer, optimizer, student_eval, teacher_eval, log_dir)

    with warnings.catch_warnings():
        # The eval-mode teachers ("copy", "update", upstream's) warn that they run in eval mode
        # with borrowed statistics: that is the point of the comparison, said once in the summary.
        warnings.filterwarnings("ignore", "the EMA model ran forward passes")
        trainer.run(mixed_batches(data, config, seed), max_epochs=1, epoch_length=config.iterations)

    final = curve[config.iterations]
    ratios = final["motion"].get("norm_ratio")
    return RunResult(
        name=name,
        mode=RUNS[name],
        seed=seed,
        teacher=final.get("teacher"),
        student=final["student"],
        seconds=time.perf_counter() - start,
        conv_norm_ratio=[round(r, 3) for r in ratios] if ratios else None,
        optimizer=config.optimizer,
        curve=curve,
    )


def _attach_tensorboard(
    trainer: Engine, optimizer: torch.optim.Optimizer, student_eval: Engine, teacher_eval: Engine | None, log_dir: Path
) -> None:
    """Losses, consistency weight, EMA momentum and learning rate every 10 iterations; every score of both models
    at each evaluation, in % as in the tables (``RunResult`` and results.json keep fractions)."""
    logger = TensorboardLogger(log_dir=str(log_dir))
    logger.attach(
        trainer,
        OutputHandler(
            tag="train",
            output_transform=lambda out: out,
            state_attributes=["ema_momentum"] if teacher_eval is not None else None,
        ),
        event_name=Events.ITERATION_COMPLETED(every=10),
    )
    logger.attach_opt_params_handler(trainer, Events.ITERATION_STARTED(every=10), optimizer, param_name="lr")

    trainer_iteration = global_step_from_engine(trainer, Events.ITERATION_COMPLETED)
    for tag, evaluator in (("student", student_eval), ("teacher", teacher_eval)):
        if evaluator is not None:
            handler = OutputHandler(
                tag=tag, output_transform=_percent(evaluator), global_step_transform=trainer_iteration
            )
            logger.attach(evaluator, handler, event_name=Events.COMPLETED)
    trainer.add_event_handler(Events.COMPLETED, logger.close)


def _percent(evaluator: Engine) -> Callable[[Any], dict[str, float]]:
    """The scores of ``evaluator``'s last run in % (an OutputHandler transform, which is given the output)."""
    return lambda _: {name: 100 * float(evaluator.state.metrics[name]) for name in ALL_SCORES}
