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
from ignite.handlers import ProgressBar, global_step_from_engine
from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger
from ignite.metrics import Metric
from torch import Tensor, nn

from examples.mean_teacher import create_mean_teacher_trainer
from examples.sed_f1.data import SEDData, SEDSet
from examples.sed_f1.metrics import SCORES, SEDScores
from examples.sed_f1.model import CRNN
from ignite_ema import BNRecalibration, EMAHandler, unwrap_model

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
    lr: float = 4e-3
    ema_decay: float = 0.998  # momentum = 1 - decay
    consistency_weight: float = 2.0
    rampup_fraction: float = 0.5  # of the iterations, for the sigmoid ramp-up of the consistency weight
    recal_batches: int = 20


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
    # iteration -> {"teacher": {...}, "student": {...}} at each evaluation, for the plot
    curve: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

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


def _evaluator(model: nn.Module, frame_seconds: float) -> Engine:
    """Ignite's evaluator (eval mode, no grad) whose output is SEDScores' (frame_probs, clip_probs, targets)."""
    metrics: dict[str, Metric] = {"sed": SEDScores(frame_seconds)}
    return create_supervised_evaluator(model, metrics, output_transform=lambda x, y, y_pred: (*y_pred, y))


def _scores(evaluator: Engine, test: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    return dict(evaluator.run(test).metrics["sed"])


def _test_batches(test: SEDSet, batch_size: int = 100) -> list[tuple[Tensor, Tensor]]:
    """This rank's share of the test set (all of it in a single process): SEDScores sums the counts of all ranks."""
    x, y = torch.from_numpy(test.x), torch.from_numpy(test.y)
    batches = list(zip(torch.split(x, batch_size), torch.split(y, batch_size), strict=True))
    return batches[idist.get_rank() :: idist.get_world_size()]


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

    ``on_iterations(every)`` is called every ``every`` iterations (progress reporting), or an Ignite
    ProgressBar shows the run (``progress_bar``); TensorBoard event files go to ``log_dir``. Under
    ``torch.distributed`` the student is trained with DDP, each rank drawing its share of every batch, and
    rank 0 reports and logs.
    """
    if name not in RUNS:
        raise ValueError(f"unknown run {name!r}; expected one of {list(RUNS)}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    n_mels = data.labelled.x.shape[2]
    # In a distributed run (see compare.py) the student is wrapped in DistributedDataParallel; else unchanged.
    student = idist.auto_model(CRNN(n_classes=len(data.classes), n_mels=n_mels), sync_bn=False)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
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

    test = _test_batches(data.test)
    student_eval = _evaluator(unwrap_model(student), data.frame_seconds)  # no DDP collectives in evaluation
    teacher_eval = _evaluator(teacher, data.frame_seconds) if teacher is not None else None
    curve: dict[int, dict[str, dict[str, float]]] = {}
    evaluate_at = Events.ITERATION_COMPLETED(
        event_filter=lambda _, i: i % config.eval_every == 0 or i == config.iterations  # and once at the end
    )
    if name == "copy+recal" and teacher is not None:
        train_x = np.concatenate([data.labelled.x, data.unlabelled.x])
        batches = np.array_split(train_x[: 24 * config.recal_batches], config.recal_batches)
        recal_data = [torch.from_numpy(b) for b in batches]
        BNRecalibration(teacher, recal_data).attach(trainer, event=evaluate_at)

    @trainer.on(evaluate_at)
    def evaluate(engine: Engine) -> None:
        point = {"student": _scores(student_eval, test)}
        if teacher_eval is not None:
            point["teacher"] = _scores(teacher_eval, test)
        curve[engine.state.iteration] = point

    if idist.get_rank() > 0:  # in a distributed run, rank 0 reports progress and logs
        on_iterations, log_dir, progress_bar = None, None, False
    if progress_bar:
        ProgressBar(desc=f"{name} seed {seed}", persist=True).attach(trainer, output_transform=lambda out: out["loss"])
    if on_iterations is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), lambda: on_iterations(every))
    if log_dir is not None:
        _attach_tensorboard(trainer, student_eval, teacher_eval, log_dir)

    with warnings.catch_warnings():
        # The eval-mode teachers ("copy", "update", upstream's) warn that they run in eval mode
        # with borrowed statistics: that is the point of the comparison, said once in the summary.
        warnings.filterwarnings("ignore", "the EMA model ran forward passes")
        trainer.run(mixed_batches(data, config, seed), max_epochs=1, epoch_length=config.iterations)

    final = curve[config.iterations]
    norm_ratio = None
    if teacher is not None:
        pairs = zip(teacher.modules(), unwrap_model(student).modules(), strict=True)
        convs = [(t, s) for t, s in pairs if isinstance(t, nn.Conv2d) and isinstance(s, nn.Conv2d)]
        with torch.no_grad():
            norm_ratio = [round(float(torch.linalg.norm(t.weight) / torch.linalg.norm(s.weight)), 3) for t, s in convs]
    return RunResult(
        name=name,
        mode=RUNS[name],
        seed=seed,
        teacher=final.get("teacher"),
        student=final["student"],
        seconds=time.perf_counter() - start,
        conv_norm_ratio=norm_ratio,
        curve=curve,
    )


def _attach_tensorboard(trainer: Engine, student_eval: Engine, teacher_eval: Engine | None, log_dir: Path) -> None:
    """Losses, consistency weight and EMA momentum every 10 iterations; F1 of both models at each evaluation."""
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

    trainer_iteration = global_step_from_engine(trainer, Events.ITERATION_COMPLETED)
    for tag, evaluator in (("student", student_eval), ("teacher", teacher_eval)):
        if evaluator is not None:
            handler = OutputHandler(tag=tag, metric_names=list(SCORES), global_step_transform=trainer_iteration)
            logger.attach(evaluator, handler, event_name=Events.COMPLETED)
    trainer.add_event_handler(Events.COMPLETED, logger.close)
