"""One training run with PostHocEMA on scikit-learn's digits, then the test metrics against the EMA width.

The student (the digits demo's small conv net) is trained on a few labelled
images per class with Adam at a high learning rate, so that its weights are
noisy and an average of them helps. On the same trainer:

- ``PostHocEMA`` tracks the power EMAs of width 0.05 and 0.10 and writes
  their snapshots;
- ``EMAHandler(power_warmup=(gamma + 1, 1))`` tracks a few other widths
  directly, as a check (its momentum ``(gamma + 1) / (gamma + 1 + n)`` at the
  ``n``-th update gives weights in proportion to ``tau^gamma`` too).

After training, the EMAs of a grid of widths are reconstructed from the
snapshot directory alone, into a freshly built model, and evaluated.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, create_supervised_evaluator
from ignite.handlers import ProgressBar
from ignite.metrics import Accuracy, Loss
from torch import Tensor, nn

from examples.mean_teacher.digits import DigitsSplit, jitter, load_digits_split, small_convnet
from ignite_ema import (
    EMAHandler,
    PostHocEMA,
    SnapshotInfo,
    list_snapshots,
    load_reconstruction,
    reconstruct_from_snapshots,
    sigma_rel_to_gamma,
)
from ignite_ema.posthoc.power import profile_inner_products, synthesis_coefficients

TRACKED = (0.05, 0.10)
DIRECT = (0.03, 0.15, 0.25)  # trained directly with EMAHandler, not tracked by PostHocEMA
GRID = tuple(round(0.01 * i, 2) for i in range(2, 29))  # 0.02 ... 0.28, reconstructed


@dataclass(frozen=True)
class Config:
    iterations: int = 1000
    labels_per_class: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    snapshot_every: str = "0.025dur"  # 40 snapshot iterations
    seed: int = 0


@dataclass
class Scores:
    accuracy: float
    nll: float


@dataclass
class Results:
    config: Config
    student: Scores
    reconstructed: dict[float, Scores] = field(default_factory=dict)
    fit_residual: dict[float, float] = field(default_factory=dict)  # ||fit - target profile|| / ||target profile||
    tracked: dict[float, Scores] = field(default_factory=dict)  # PostHocEMA's own EMAs, read directly
    direct: dict[float, Scores] = field(default_factory=dict)  # EMAHandler's
    snapshots: int = 0
    snapshot_bytes: int = 0
    train_seconds: float = 0.0
    reconstruct_seconds: float = 0.0

    def as_json(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("reconstructed", "tracked", "direct"):
            out[key] = {f"{sigma:.2f}": asdict(s) for sigma, s in getattr(self, key).items()}
        out["fit_residual"] = {f"{sigma:.2f}": r for sigma, r in self.fit_residual.items()}
        return out


def labelled_batches(split: DigitsSplit, config: Config) -> Iterator[tuple[Tensor, Tensor]]:
    """``iterations`` batches of labelled images, drawn with replacement."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    labelled = split.labelled.nonzero().flatten()
    for _ in range(config.iterations):
        idx = labelled[torch.randint(len(labelled), (config.batch_size,), generator=gen)]
        yield split.train_x[idx], split.train_y[idx]


def evaluate(model: nn.Module, split: DigitsSplit) -> Scores:
    """Accuracy and mean negative log-likelihood on the test images."""
    data = list(zip(torch.split(split.test_x, 256), torch.split(split.test_y, 256), strict=True))
    metrics = {"accuracy": Accuracy(), "nll": Loss(nn.functional.cross_entropy)}
    evaluator = create_supervised_evaluator(model, metrics=metrics)
    state = evaluator.run(data).metrics
    return Scores(float(state["accuracy"]), float(state["nll"]))


def train(config: Config, snapshot_dir: Path, progress: bool = True) -> tuple[Results, DigitsSplit]:
    """The training run, with every EMA attached; returns the student's and the directly tracked EMAs' scores."""
    split = load_digits_split(config.seed, config.labels_per_class)
    torch.manual_seed(config.seed)
    student = small_convnet()
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)

    def step(engine: Engine, batch: tuple[Tensor, Tensor]) -> float:
        x, y = batch
        student.train()
        loss = nn.functional.cross_entropy(student(jitter(x)), y)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    shutil.rmtree(snapshot_dir, ignore_errors=True)  # this example's own folder: a rerun starts afresh
    posthoc = PostHocEMA(
        student, TRACKED, snapshot_every=config.snapshot_every, snapshot_dir=snapshot_dir, handle_buffers="update"
    )
    posthoc.attach(trainer)
    direct = {}
    for sigma in DIRECT:  # momentum: a floor that the power ramp never reaches
        handler = EMAHandler(
            student, momentum=1e-12, power_warmup=(sigma_rel_to_gamma(sigma) + 1, 1.0), handle_buffers="update"
        )
        handler.attach(trainer, name=f"ema_momentum_{sigma:.2f}".replace(".", "_"))
        direct[sigma] = handler
    if progress:
        ProgressBar(desc="training", persist=True).attach(trainer, output_transform=lambda loss: {"loss": loss})
    start = time.perf_counter()
    trainer.run(list(labelled_batches(split, config)), max_epochs=1)
    results = Results(config, student=evaluate(student, split), train_seconds=time.perf_counter() - start)
    tracked = posthoc.model_state_dicts()  # its EMAs keep tensors only: each is loaded into a model to evaluate it
    results.tracked = {s: evaluate(_loaded(state), split) for s, state in zip(TRACKED, tracked, strict=True)}
    results.direct = {s: evaluate(h.ema_model, split) for s, h in direct.items()}
    results.snapshots = len(posthoc.snapshots)
    results.snapshot_bytes = sum(info.path.stat().st_size for info in posthoc.snapshots)
    return results, split


def _loaded(state: dict[str, Tensor]) -> nn.Module:
    model = small_convnet()
    model.load_state_dict(state)
    return model


def reconstruct_grid(results: Results, split: DigitsSplit, snapshot_dir: Path, grid: Sequence[float]) -> None:
    """After training, from the directory alone: every width of ``grid`` in one pass, each evaluated."""
    model = small_convnet()
    start = time.perf_counter()
    states = reconstruct_from_snapshots(snapshot_dir, list(grid), model=model)
    results.reconstruct_seconds = time.perf_counter() - start
    infos = list_snapshots(snapshot_dir)
    for sigma, state in zip(grid, states, strict=True):
        results.reconstructed[sigma] = evaluate(load_reconstruction(model, state), split)
        results.fit_residual[sigma] = fit_residual(infos, sigma)


def fit_residual(infos: Sequence[SnapshotInfo], sigma_rel: float) -> float:
    """How far the snapshots' best combination is from the target profile: ``||fit - p|| / ||p||`` in L2.

    From the inner products alone, ``||fit - p||^2 = x'Ax - 2 x'b + <p, p>``
    with the reconstruction's coefficients ``x``: no weights are read.
    """
    times = np.array([i.iteration for i in infos], dtype=np.float64)
    gammas = np.array([i.gamma for i in infos], dtype=np.float64)
    end, target = times.max(), sigma_rel_to_gamma(sigma_rel)
    x = synthesis_coefficients(times, gammas, end, [target])[:, 0]
    gram = profile_inner_products(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    cross = profile_inner_products(times, gammas, end, target)
    own = float(profile_inner_products(end, target, end, target))
    squared = float(x @ gram @ x - 2 * x @ cross + own)
    return math.sqrt(max(squared, 0.0) / own)
