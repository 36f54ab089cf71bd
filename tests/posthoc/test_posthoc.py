"""PostHocEMA: the power EMAs against their closed form, reconstruction from real snapshot files, resume, errors.

Expected values are computed here: closed forms, quadrature and plain loops
over the student's trajectory, never by the code under test.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from scipy import integrate
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from examples.posthoc.digits import GRID
from ignite_ema import (
    PostHocEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    load_reconstruction,
    load_snapshot,
    reconstruct_from_snapshots,
    sigma_rel_to_gamma,
)
from ignite_ema.posthoc.reconstruct import _add
from ignite_ema.posthoc.snapshots import Slot, pack_snapshot
from tests.helpers import BNNet, image_batches, no_warnings
from tests.posthoc.resume_job import run_phase

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
T = 2000  # iterations of the trajectory runs
_WAVES = ((0.5, 0.3), (1.0, 1.0), (2.0, 0.1), (3.0, 2.0), (0.25, 0.7), (1.5, 2.5))  # (cycles per run, phase)


def trajectory(t: int, length: int = T) -> Tensor:
    """The student's weights at iteration ``t``: six smooth curves, sines on a quadratic drift."""
    x = t / length
    return torch.tensor([math.sin(2 * math.pi * f * x + p) + 0.5 * x * x for f, p in _WAVES], dtype=torch.float64)


def follow(model: nn.Linear, path: Callable[[int], Tensor]) -> Engine:
    """An engine whose step sets the model's weight row to ``path(iteration)``: an optimiser we can follow."""

    def step(engine: Engine, batch: object) -> None:
        with torch.no_grad():
            model.weight.copy_(path(engine.state.iteration).to(model.weight.dtype))

    return Engine(step)


def student(dtype: torch.dtype = torch.float64) -> nn.Linear:
    return nn.Linear(len(_WAVES), 1, bias=False).to(dtype)


def power_ema(values: Sequence[Tensor], times: Sequence[int], gamma: float) -> Tensor:
    """The closed form: after updates at ``times``, the student at ``t_k`` weighs ``(t_k^(g+1) - t_(k-1)^(g+1)) /
    t_n^(g+1)`` (with ``t_0 = 0``), the mass of ``tau^gamma`` over the iterations it stands for."""
    total = torch.zeros_like(values[0], dtype=torch.float64)
    end, previous = times[-1], 0
    for value, t in zip(values, times, strict=True):
        total += ((t / end) ** (gamma + 1) - (previous / end) ** (gamma + 1)) * value.double()
        previous = t
    return total


# ---------------------------------------------------------------------- conversions


def test_sigma_rel_is_the_relative_std_of_the_power_profile() -> None:
    # EDM2 (Sec. 3) quotes gamma 16.97 for sigma_rel 0.05 and 6.94 for 0.10.
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    for sigma in (0.01, 0.07, 0.15, 0.25, 1 / math.sqrt(12)):
        gamma = sigma_rel_to_gamma(sigma)
        # The density (gamma + 1) tau^gamma on [0, 1], by quadrature: its std is sigma_rel.
        mass, mean, second = (
            integrate.quad(lambda u, g=gamma, n=n: u**n * (g + 1) * u**g, 0, 1, epsabs=0, epsrel=1e-13)[0]
            for n in (0, 1, 2)
        )
        assert mass == pytest.approx(1.0, abs=1e-11)
        assert math.sqrt(second - mean**2) == pytest.approx(sigma, rel=1e-9), sigma
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-12)
    assert sigma_rel_to_gamma(1 / math.sqrt(12)) == 0.0  # the uniform average of the run


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.0, ValueError, r"must lie in \(0, 0\.288675\]; found 0\.0"),
        (0.3, ValueError, r"found 0\.3\. .*gamma < 0"),
        (-0.1, ValueError, "must lie in"),
        (float("nan"), ValueError, "must be finite"),
        ("0.1", TypeError, "must be a real number; found str"),
        (True, TypeError, "must be a real number; found bool"),
    ],
)
def test_a_sigma_rel_outside_the_math_is_refused(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        sigma_rel_to_gamma(value)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        PostHocEMA(student(), (0.05, value), snapshot_every=10, snapshot_dir="unused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"gamma must be at least 0"):
        gamma_to_sigma_rel(-0.5)


# ---------------------------------------------------------------------- the power EMA


@pytest.mark.parametrize("every", [1, 7])
def test_the_power_emas_follow_their_closed_form(tmp_path: Path, every: int) -> None:
    model = student()
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=10_000, snapshot_dir=tmp_path)
    posthoc.attach(trainer, event=Events.ITERATION_COMPLETED(every=every))
    seen: list[tuple[int, tuple[float, ...]]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(every=every), lambda e: seen.append((e.state.iteration, e.state.posthoc_momentum))
    )
    trainer.run(range(500), max_epochs=2)  # 1000 iterations: 142 updates at every=7, the last at 994

    times = list(range(every, 1001, every))
    values = [trajectory(t) for t in times]
    for ema, gamma in zip(posthoc.model_state_dicts(), (16.972198602303, 6.937203937602), strict=True):
        want = power_ema(values, times, gamma)
        torch.testing.assert_close(ema["weight"][0], want, rtol=0, atol=1e-10)
    # The published momenta: 1 (a copy) first, then 1 - (1 - delta / t)^(gamma + 1).
    assert seen[0] == (every, (1.0, 1.0))
    t = seen[-1][0]
    assert seen[-1][1] == pytest.approx((1 - (1 - every / t) ** 17.972198602303, 1 - (1 - every / t) ** 7.937203937602))


def test_the_clock_goes_on_across_runs_and_a_resume_without_state_warns_at_the_caller(tmp_path: Path) -> None:
    model = student()
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(model, (0.10,), snapshot_every=10, snapshot_dir=tmp_path / "a")
    posthoc.attach(trainer)
    trainer.run(range(20), max_epochs=1)
    trainer.run(range(20), max_epochs=1)  # a finished engine starts again from iteration 0; the EMA's clock does not
    assert [i.iteration for i in posthoc.snapshots] == [10, 20, 30, 40]
    gamma = sigma_rel_to_gamma(0.10)
    assert trainer.state.posthoc_momentum == pytest.approx((1 - (39 / 40) ** (gamma + 1),))

    resumed = follow(model, trajectory)
    resumed.load_state_dict({"iteration": 100, "epoch_length": 100, "max_epochs": 2})  # the trainer's state only
    fresh = PostHocEMA(model, (0.10,), snapshot_every=10, snapshot_dir=tmp_path / "b")
    fresh.attach(resumed)
    with pytest.warns(UserWarning, match="resumes at iteration 100, but this PostHocEMA has never updated") as caught:
        resumed.run(range(100), max_epochs=2)
    assert caught[0].filename == __file__  # pointed at the user's run() call
    assert resumed.state.posthoc_momentum == pytest.approx((1 - (199 / 200) ** (gamma + 1),))
    # The first update is past every multiple of 10 up to 100: it is snapshotted, then 110, 120, ...
    assert [i.iteration for i in fresh.snapshots][:3] == [101, 110, 120]


def test_the_first_update_copies_the_student_whatever_the_event_period(tmp_path: Path) -> None:
    # The EMAs start as copies of a NaN student. The first update, at iteration 3, must copy the student: an average
    # with momentum 1 (what a "first update" keyed on iteration 1 would do here) keeps the NaN, as 0 * NaN is NaN.
    model = student()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=10_000, snapshot_dir=tmp_path)
    posthoc.attach(trainer, event=Events.ITERATION_COMPLETED(every=3))
    trainer.run(range(30), max_epochs=1)
    times = list(range(3, 31, 3))
    for ema, sigma in zip(posthoc.model_state_dicts(), (0.05, 0.10), strict=True):
        want = power_ema([trajectory(t) for t in times], times, sigma_rel_to_gamma(sigma))
        torch.testing.assert_close(ema["weight"][0], want, rtol=0, atol=1e-12)


def test_a_trainer_rolled_back_to_an_earlier_iteration_continues_the_handlers_clock(tmp_path: Path) -> None:
    # The student moves on at every step, whatever iteration the engine counts: the handler sees 35 steps in a row.
    model = student()
    steps = [0]

    def step(engine: Engine, batch: object) -> None:
        steps[0] += 1
        with torch.no_grad():
            model.weight.copy_(trajectory(steps[0], 35)[None])

    trainer = Engine(step)
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=4, snapshot_dir=tmp_path)
    posthoc.attach(trainer)
    trainer.run(range(10), max_epochs=1)  # the handler's clock 1..10
    trainer.run(range(10), max_epochs=1)  # a finished engine restarts at 0: the clock 11..20
    # An older checkpoint of the trainer, not of the handler: the engine goes back to iteration 5 (of 20), and its
    # iterations 6..20 are the clock's 21..35. Going on from 20 - 5 or from 20 alone would shift every snapshot.
    trainer.load_state_dict({"iteration": 5, "epoch_length": 10, "max_epochs": 2})
    with no_warnings():
        trainer.run(range(10))
    assert steps[0] == 35 and trainer.state.iteration == 20
    times = (4, 8, 10, 12, 16, 20, 24, 28, 32, 35)  # each multiple of 4, and the end of each completed run
    assert [(i.iteration, i.index) for i in posthoc.snapshots] == [(t, k) for t in times for k in (0, 1)]
    values = [trajectory(n, 35) for n in range(1, 36)]
    for ema, sigma in zip(posthoc.model_state_dicts(), (0.05, 0.10), strict=True):
        gamma = sigma_rel_to_gamma(sigma)
        torch.testing.assert_close(ema["weight"][0], power_ema(values, range(1, 36), gamma), rtol=0, atol=1e-12)
    assert trainer.state.posthoc_momentum == pytest.approx(
        tuple(1 - (34 / 35) ** (sigma_rel_to_gamma(s) + 1) for s in (0.05, 0.10))
    )


def test_low_precision_students_are_averaged_in_float32(tmp_path: Path) -> None:
    # A slow drift: each update moves the average by about 1e-5, under half a bf16 step at 1.0 (0.0039).
    def drift(t: int) -> Tensor:
        return torch.full((len(_WAVES),), 1.0 + 0.5 * t / 400, dtype=torch.float64)

    model = student(torch.bfloat16)
    trainer = follow(model, drift)
    posthoc = PostHocEMA(model, (0.10,), snapshot_every=400, snapshot_dir=tmp_path, snapshot_dtype=None)
    posthoc.attach(trainer)
    trainer.run(range(400), max_epochs=1)
    shadow = posthoc.state_dict()["emas"][0]["tensors"]["weight"]
    assert shadow.dtype == torch.float32
    values = [drift(t).to(torch.bfloat16) for t in range(1, 401)]  # what the student held
    want = power_ema(values, list(range(1, 401)), sigma_rel_to_gamma(0.10))
    torch.testing.assert_close(shadow[0].double(), want, rtol=0, atol=2e-6)  # float32 rounding over 400 updates
    saved = load_snapshot(posthoc.snapshots[-1].path)["weight"]
    assert saved.dtype == torch.float32 and torch.equal(saved, shadow)


# ---------------------------------------------------------------------- the plain loop

_GAPS = (2, 3, 7, 8, 9, 15, 16, 30, 31, 45, 47)  # the steps updated: gaps of 1 to 15, snapshots due at 15, 30, 45


def _bn_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)).double()


def _train_step(model: nn.Module, t: int) -> None:
    """Step ``t`` of a deterministic training: weights from the trajectory, a forward pass moving the statistics."""
    with torch.no_grad():
        model[0].weight.copy_(trajectory(t, 50)[None].expand(3, -1))
        model[0].bias.fill_(0.1 * t)
        model(torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(t)))


def _snapshot_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_plain_loop_gives_the_engines_emas_and_snapshot_files_for_the_same_steps(tmp_path: Path) -> None:
    arguments: dict[str, Any] = {"sigma_rels": (0.05, 0.10), "snapshot_every": 10, "handle_buffers": "update"}
    engine_model, plain_model = _bn_student(), _bn_student()
    on_engine = PostHocEMA(engine_model, **arguments, snapshot_dir=tmp_path / "engine")
    plain = PostHocEMA(plain_model, **arguments, snapshot_dir=tmp_path / "plain")
    plain.load_state_dict(copy.deepcopy(on_engine.state_dict()))  # the same run_id, so that the files can be equal

    trainer = Engine(lambda engine, batch: _train_step(engine_model, engine.state.iteration))
    published: dict[int, tuple[float, ...]] = {}
    on_update = Events.ITERATION_COMPLETED(event_filter=lambda _, i: i in _GAPS)
    on_engine.attach(trainer, event=on_update)
    trainer.add_event_handler(on_update, lambda e: published.update({e.state.iteration: e.state.posthoc_momentum}))
    trainer.run(range(52), max_epochs=1)  # ends with a snapshot of the last update, at 47

    returned = {}
    for t in range(1, 53):
        _train_step(plain_model, t)
        if t in _GAPS:
            returned[t] = plain.update(step=t)
    plain.snapshot()  # the end of the loop, as a completed run ends

    assert returned == published  # the same momenta, float for float
    assert [(i.iteration, i.index) for i in plain.snapshots] == [(t, k) for t in (15, 30, 45, 47) for k in (0, 1)]
    assert [i.path.name for i in plain.snapshots] == [i.path.name for i in on_engine.snapshots]
    # The same files, byte for byte: the plain loop's own atomic writer and Ignite's DiskSaver write the same bytes.
    assert _snapshot_files(tmp_path / "plain") == _snapshot_files(tmp_path / "engine")
    got, want = plain.state_dict(), on_engine.state_dict()
    assert got["snapshots"] == want["snapshots"] and got["last_update_iteration"] == 47
    for a, b in zip(got["emas"], want["emas"], strict=True):
        assert a["tensors"].keys() == b["tensors"].keys()
        assert all(torch.equal(t, b["tensors"][n]) for n, t in a["tensors"].items())
    # And the closed form of the gaps: the student at each updated step weighs the mass of tau^gamma since the last.
    for ema, gamma in zip(plain.model_state_dicts(), plain.gammas, strict=True):
        want_row = power_ema([trajectory(t, 50) for t in _GAPS], list(_GAPS), gamma)
        torch.testing.assert_close(ema["0.weight"][0], want_row, rtol=0, atol=1e-12)


def test_update_counts_its_own_steps_and_refuses_what_a_plain_loop_cannot_do(tmp_path: Path) -> None:
    model = student()
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every="2it", snapshot_dir=tmp_path / "s")
    gammas = posthoc.gammas
    momenta = []
    for t in range(1, 6):
        with torch.no_grad():
            model.weight.copy_(trajectory(t)[None])
        momenta.append(posthoc.update())
    assert posthoc.last_step == 5
    assert momenta[0] == (1.0, 1.0)  # the first update copies the student
    assert momenta[1:] == [pytest.approx(tuple(1 - (1 - 1 / t) ** (g + 1) for g in gammas)) for t in range(2, 6)]
    assert [i.iteration for i in posthoc.snapshots] == [2, 2, 4, 4]
    values = [trajectory(t) for t in range(1, 6)]
    for ema, gamma in zip(posthoc.model_state_dicts(), gammas, strict=True):
        torch.testing.assert_close(ema["weight"][0], power_ema(values, range(1, 6), gamma), rtol=0, atol=1e-12)

    before = copy.deepcopy(posthoc.state_dict())
    for step, error, match in [
        (5, ValueError, r"step=5 does not come after the last update's step, 5: steps must increase"),
        (0, ValueError, "step must be at least 1; found 0"),
        (6.0, TypeError, "step must be an int; found float"),
    ]:
        with pytest.raises(error, match=match):
            posthoc.update(step=step)  # type: ignore[arg-type]
    after = posthoc.state_dict()
    assert after["last_update_iteration"] == 5 and after["snapshots"] == before["snapshots"]
    assert torch.equal(after["emas"][0]["tensors"]["weight"], before["emas"][0]["tensors"]["weight"])

    for spec, unit in (("2ep", "epochs"), ("0.1dur", "a fraction of the run")):
        epochs = PostHocEMA(model, snapshot_every=spec, snapshot_dir=tmp_path / spec)
        with pytest.raises(ValueError, match=rf"snapshot_every='{spec}' is in {unit}, which only an Ignite engine"):
            epochs.update()
        assert epochs.last_step == 0 and not (tmp_path / spec).exists()  # nothing happened
    with pytest.raises(RuntimeError, match="no update to snapshot yet"):
        PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path / "none").snapshot()
    posthoc.attach(follow(model, trajectory))
    with pytest.raises(RuntimeError, match="attached to an engine, which updates it at its event"):
        posthoc.update()


def test_a_plain_loop_resumes_from_its_state_bit_for_bit(tmp_path: Path) -> None:
    def run(posthoc: PostHocEMA, model: nn.Module, steps: range) -> None:
        for t in steps:
            _train_step(model, t)
            if t % 3 == 0:  # an update every third step
                posthoc.update(step=t)

    def build(directory: str) -> tuple[PostHocEMA, nn.Module]:
        model = _bn_student()
        posthoc = PostHocEMA(
            model, (0.05, 0.10), snapshot_every=10, snapshot_dir=tmp_path / directory, handle_buffers="update"
        )
        return posthoc, model

    full, full_model = build("full")
    run(full, full_model, range(1, 41))
    full.snapshot()

    first, first_model = build("resumed")
    run(first, first_model, range(1, 18))  # a checkpoint at 17, between two updates and two snapshots
    saved = tmp_path / "state.pt"
    torch.save({"posthoc": first.state_dict(), "model": first_model.state_dict()}, saved)
    run(first, first_model, range(18, 27))  # then a crash at 26, after the snapshot at 21
    resumed, resumed_model = build("resumed")
    checkpoint = torch.load(saved, weights_only=True)
    resumed_model.load_state_dict(checkpoint["model"])  # the student's statistics have a history too
    resumed.load_state_dict(checkpoint["posthoc"])
    with pytest.warns(UserWarning, match=r"removed 2 snapshot\(s\) of this run .* after iteration 15") as caught:
        run(resumed, resumed_model, range(18, 41))
    assert caught[0].filename == __file__  # at the user's update() call
    resumed.snapshot()

    a, b = full.state_dict(), resumed.state_dict()
    assert a["snapshots"] == b["snapshots"]
    assert [r["iteration"] for r in a["snapshots"]] == [12, 12, 21, 21, 30, 30, 39, 39]
    assert a["last_update_iteration"] == b["last_update_iteration"] == 39
    for ema_a, ema_b in zip(a["emas"], b["emas"], strict=True):
        assert all(torch.equal(t, ema_b["tensors"][n]) for n, t in ema_a["tensors"].items())
    for record in a["snapshots"]:  # the same files but for the run's id: all their tensors bit for bit
        want = torch.load(tmp_path / "full" / record["file"], weights_only=True)
        got = torch.load(tmp_path / "resumed" / record["file"], weights_only=True)
        assert {k: v for k, v in want.items() if k not in ("buffers", "run_id")} == {
            k: v for k, v in got.items() if k not in ("buffers", "run_id")
        }
        assert want["buffers"].keys() == got["buffers"].keys()
        assert all(torch.equal(t, got["buffers"][n]) for n, t in want["buffers"].items()), record["file"]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [r["file"] for r in a["snapshots"]]


# ---------------------------------------------------------------------- reconstruction


def _tracked_run(tmp_path: Path, snapshot_every: int, snapshot_dtype: torch.dtype | None) -> tuple[PostHocEMA, dict]:
    """The trajectory run with snapshots; also the live EMA weights at iteration 1000, kept aside."""
    model = student()
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(
        model, (0.05, 0.10), snapshot_every=snapshot_every, snapshot_dir=tmp_path / "snapshots",
        snapshot_dtype=snapshot_dtype,
    )  # fmt: skip
    posthoc.attach(trainer)
    kept: dict[int, list[Tensor]] = {}

    def keep(engine: Engine) -> None:
        kept[engine.state.iteration] = [m["weight"][0].clone() for m in posthoc.model_state_dicts()]

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1000), keep)
    trainer.add_event_handler(Events.COMPLETED, keep)
    trainer.run(range(T), max_epochs=1)
    return posthoc, kept


def test_a_tracked_sigma_rel_is_reconstructed_as_its_own_ema(tmp_path: Path) -> None:
    posthoc, kept = _tracked_run(tmp_path, snapshot_every=100, snapshot_dtype=torch.float16)
    for iteration in (1000, T):
        got = posthoc.reconstruct([0.05, 0.10], iteration=iteration)
        for result, live in zip(got, kept[iteration], strict=True):
            # The fit is the snapshot itself (coefficients e_j up to ~1e-11): what is left is float16's rounding,
            # at most half a step, 2^-11 of the value.
            bound = 2.0**-11 * live.abs() + 1e-9
            assert ((result["weight"][0] - live).abs() <= bound).all(), iteration
            assert result["weight"].dtype == torch.float32  # float16 snapshots are added up in float32
    # The same from the directory alone, in one call per target.
    from_dir = reconstruct_from_snapshots(posthoc.snapshot_dir, 0.05, model=student())
    assert torch.equal(from_dir["weight"], posthoc.reconstruct(0.05)["weight"])


def _profile_residual(times: Sequence[int], target_sigma: float, cells_per_iteration: int = 10) -> float:
    """||sum_i x_i p_i - p*||_2 of the normalised least-squares fit, by midpoint quadrature (its own fit)."""
    tau = (np.arange(T * cells_per_iteration) + 0.5) / cells_per_iteration

    def profile(t: float, sigma: float) -> np.ndarray:
        g = sigma_rel_to_gamma(sigma)
        return np.where(tau <= t, (g + 1) * (tau / t) ** g / t, 0.0)

    basis = np.stack([profile(t, s) for t in times for s in (0.05, 0.10)])
    target = profile(T, target_sigma)
    x = np.linalg.lstsq(basis.T, target, rcond=None)[0]
    residual = (x / x.sum()) @ basis - target
    return math.sqrt(float((residual**2).sum()) / cells_per_iteration)


def test_an_untracked_sigma_rel_matches_the_power_ema_and_improves_with_denser_snapshots(tmp_path: Path) -> None:
    posthoc, _ = _tracked_run(tmp_path, snapshot_every=50, snapshot_dtype=None)  # float64: no rounding to speak of
    thetas = torch.stack([trajectory(t) for t in range(1, T + 1)])
    theta_norm = thetas.pow(2).sum(0).sqrt()  # ||theta_j||_2 over [0, T]: the student holds theta(t) on (t-1, t]
    errors: dict[float, list[float]] = {0.07: [], 0.15: []}
    for every in (500, 200, 100, 50):
        subset = tmp_path / f"every-{every}"
        subset.mkdir()
        for info in posthoc.snapshots:
            if info.iteration % every == 0:
                shutil.copy(info.path, subset)
        got = reconstruct_from_snapshots(subset, [0.07, 0.15], model=student())
        for sigma, result in zip((0.07, 0.15), got, strict=True):
            want = power_ema(list(thetas), list(range(1, T + 1)), sigma_rel_to_gamma(sigma))  # tracked every step
            error = (result["weight"][0] - want).abs()
            # Every snapshot and the target are integrals of their profile against the same step function theta,
            # so the error is <r, theta> for the profile residual r, at most ||r|| ||theta|| (Cauchy-Schwarz).
            bound = _profile_residual(range(every, T + 1, every), sigma) * theta_norm
            assert (error <= bound).all(), (every, sigma, error, bound)
            errors[sigma].append(float(error.max()))
    for sigma, series in errors.items():
        assert all(a > b for a, b in itertools.pairwise(series)), (sigma, series)  # denser snapshots, smaller error
        assert series[-1] < 1e-4 * float(thetas.abs().max()), (sigma, series)  # 5e-6 and 1.1e-5 when written


def test_snapshots_of_another_dtype_mid_run_are_added_by_name(tmp_path: Path) -> None:
    # float32, float64, float32 weights: float16 snapshots pack all three into one buffer, float32/64 ones into two,
    # so after the switch the earlier files no longer line up with the accumulators and are added tensor by tensor.
    # The target is just after the switch, where the earlier files weigh most.
    model = nn.Sequential(
        nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False).double(), nn.Linear(2, 1, bias=False)
    )

    def run(posthoc: PostHocEMA, first: int) -> None:
        def step(engine: Engine, batch: object) -> None:
            with torch.no_grad():
                for k, p in enumerate(model.parameters()):
                    p.fill_(float(trajectory(first + engine.state.iteration, 1000)[k]))

        trainer = Engine(step)
        posthoc.attach(trainer)
        trainer.run(range(500), max_epochs=1)

    arguments = {"sigma_rels": (0.05, 0.10), "snapshot_every": 50, "snapshot_dir": tmp_path}
    before = PostHocEMA(model, **arguments, snapshot_dtype=torch.float16)  # type: ignore[arg-type]
    run(before, 0)
    after = PostHocEMA(model, **arguments, snapshot_dtype=None)  # type: ignore[arg-type]
    after.load_state_dict(before.state_dict())
    run(after, 500)  # a new run of an engine: the handler's clock goes on from 500
    assert [i.iteration for i in after.snapshots][-2:] == [1000, 1000]
    got = reconstruct_from_snapshots(tmp_path, 0.07, iteration=550, model=model)
    series = [trajectory(t, 1000) for t in range(1, 551)]
    want = power_ema(series, list(range(1, 551)), sigma_rel_to_gamma(0.07))
    for k, name in enumerate(("0.weight", "1.weight", "2.weight")):
        # float16 rounds values below 1.5 by up to 7e-4, and the coefficients' absolute sum is about 1.5; the fit
        # at 11 snapshot iterations adds less. (Measured: 2e-5 to 5e-4; adding a neighbour's values instead: 3e-2.)
        assert float((got[name] - want[k]).abs().max()) < 2e-3, name


def test_buffers_follow_the_mode(tmp_path: Path) -> None:
    batches = image_batches(30)
    finals = {}
    means: dict[str, list[Tensor]] = {}
    for mode in ("copy", "update"):
        torch.manual_seed(0)
        model = BNNet()

        def step(engine: Engine, x: Tensor, model: nn.Module = model) -> None:
            model.zero_grad()
            model(x).pow(2).mean().backward()
            with torch.no_grad():  # plain SGD; torch.optim would import torch._dynamo, a second or more
                for p in model.parameters():
                    p -= 0.1 * p.grad

        trainer = Engine(step)
        posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=10, snapshot_dir=tmp_path / mode, handle_buffers=mode)
        posthoc.attach(trainer)
        seen = means[mode] = []  # the student's statistics after each iteration
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda _, m=model, s=seen: s.append(m.bn.running_mean.clone())
        )
        trainer.run(batches, max_epochs=1)
        got = posthoc.reconstruct(0.07)
        finals[mode] = (model, posthoc, got)
        assert torch.equal(got["bn.num_batches_tracked"], model.bn.num_batches_tracked)  # integer: copied
    model, _, got = finals["copy"]
    assert torch.equal(got["bn.running_mean"], model.bn.running_mean)  # the student's, at the last snapshot
    model, posthoc, got = finals["update"]
    assert not torch.allclose(got["bn.running_mean"], model.bn.running_mean, atol=1e-3)  # averaged instead
    # averaged like the weights: the power EMA of the student's statistics after each of the 30 iterations
    want = power_ema(means["update"], list(range(1, 31)), sigma_rel_to_gamma(0.10)).float()
    live = posthoc.model_state_dicts()[1]["bn.running_mean"]
    torch.testing.assert_close(live, want, rtol=1e-5, atol=1e-6)
    tracked = posthoc.reconstruct(0.10)["bn.running_mean"]
    assert ((tracked - live).abs() <= 2.0**-11 * live.abs() + 1e-9).all()


def test_a_reconstruction_loads_into_a_fresh_model_and_several_targets_take_one_pass(tmp_path: Path) -> None:
    posthoc, _ = _tracked_run(tmp_path, snapshot_every=250, snapshot_dtype=torch.float16)
    one_by_one = [posthoc.reconstruct(s, iteration=1000) for s in (0.03, 0.2)]
    together = posthoc.reconstruct([0.03, 0.2], iteration=1000)
    for a, b in zip(one_by_one, together, strict=True):  # the same, up to LAPACK solving two columns at once
        torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-12, atol=1e-12)
    fresh = student(torch.float32)
    assert load_reconstruction(fresh, together[1]) is fresh
    assert torch.equal(fresh.weight.detach(), together[1]["weight"].float())
    other = nn.Linear(3, 1, bias=False)
    before = other.weight.detach().clone()
    with pytest.raises(ValueError, match=r"tensor 'weight' has shape \(1, 6\) in the reconstruction, \(1, 3\) in"):
        load_reconstruction(other, together[1])
    assert torch.equal(other.weight.detach(), before)


def test_a_constant_student_is_reconstructed_exactly_at_any_width(tmp_path: Path) -> None:
    # Whatever the fit, the weights of the snapshots must sum to 1: a student that never moves comes back as itself.
    model = student()
    value = torch.tensor([[0.3, -2.0, 7.25, 1e-3, -40.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(value)
    trainer = Engine(lambda engine, batch: None)
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=20, snapshot_dir=tmp_path, snapshot_dtype=None)
    posthoc.attach(trainer, event=Events.ITERATION_COMPLETED(every=3))
    trainer.run(range(200), max_epochs=1)
    widths = [0.02, 0.04, 0.05, 0.07, 0.10, 0.15, 0.22, 0.28, 1 / math.sqrt(12)]  # tracked, between, outside
    for iteration in (60, 120, 198):  # snapshot iterations: 21, 42, 60, 81, ..., 180, and 198 (the last update)
        for sigma, got in zip(widths, posthoc.reconstruct(widths, iteration=iteration), strict=True):
            torch.testing.assert_close(got["weight"], value, rtol=1e-12, atol=0, msg=f"{sigma} at {iteration}")


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def test_a_truncated_snapshot_is_skipped_with_one_warning_and_the_others_are_used(tmp_path: Path) -> None:
    posthoc, kept = _tracked_run(tmp_path, snapshot_every=250, snapshot_dtype=torch.float16)
    directory = posthoc.snapshot_dir
    at_1000 = posthoc.reconstruct([0.07, 0.15], iteration=1000)
    bad = "phema-0000002000-0-0.05.pt"  # the last snapshot of the EMA of width 0.05
    _truncate(directory / bad)

    def one_warning_naming_it(call: Callable[[], Any]) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = call()
        assert [bad in str(w.message) for w in caught] == [True], [str(w.message) for w in caught]
        assert "skipped 1 unreadable snapshot file(s)" in str(caught[0].message)
        assert caught[0].filename == __file__  # at the user's line
        return result

    listed = one_warning_naming_it(lambda: list_snapshots(directory))
    assert [(i.iteration, i.index) for i in listed] == [
        (t, k) for t in range(250, T + 1, 250) for k in (0, 1) if (t, k) != (T, 0)
    ]
    # Earlier iterations do not use the file: their reconstructions are what they were.
    again = one_warning_naming_it(
        lambda: reconstruct_from_snapshots(directory, [0.07, 0.15], iteration=1000, model=student())
    )
    for a, b in zip(again, at_1000, strict=True):
        assert torch.equal(a["weight"], b["weight"])
    # At the last iteration the other EMA's snapshot is still there: width 0.10 comes back as the live EMA.
    for got in (
        one_warning_naming_it(lambda: posthoc.reconstruct(0.10)),
        one_warning_naming_it(lambda: reconstruct_from_snapshots(directory, 0.10, model=student())),
    ):
        live = kept[T][1]
        assert ((got["weight"][0] - live).abs() <= 2.0**-11 * live.abs() + 1e-9).all()  # float16 rounding

    match = rf"'.*{bad}' is not a readable PostHocEMA snapshot"
    with pytest.raises(ValueError, match=match):
        list_snapshots(directory, on_error="raise")
    with pytest.raises(ValueError, match=match):
        reconstruct_from_snapshots(directory, 0.10, model=student(), on_error="raise")
    with pytest.raises(ValueError, match=match):
        posthoc.reconstruct(0.10, on_error="raise")
    with pytest.raises(ValueError, match="on_error can only be 'warn' or 'raise'; found 'ignore'"):
        posthoc.reconstruct(0.10, on_error="ignore")  # type: ignore[call-overload]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(directory / bad, alone)
    with pytest.raises(ValueError, match=r"none of the 1 snapshot file\(s\) in '.*alone' reads; the first: .*"):
        list_snapshots(alone)


def _two_layer_reconstruction(tmp_path: Path) -> tuple[Callable[[], nn.Module], dict[str, Tensor]]:
    """A model of three layers (BatchNorm in the middle), and a reconstruction of it after 10 moving steps."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    model = build()

    def step(engine: Engine, batch: object) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)

    trainer = Engine(step)
    posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=5, snapshot_dir=tmp_path)
    posthoc.attach(trainer)
    trainer.run(range(10), max_epochs=1)
    return build, posthoc.reconstruct(0.07)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.zeros(2, 5), r"tensor '2.weight' has shape \(2, 5\) in the reconstruction, \(2, 4\) in the model"),
        (torch.ones(2, 4, dtype=torch.complex64), "'2.weight' is torch.complex64 in the reconstruction, torch.float32"),
        (torch.empty(2, 4, device="meta"), "'2.weight' of the reconstruction is a meta tensor"),
    ],
    ids=["shape", "complex", "meta"],
)
def test_a_reconstruction_that_does_not_fit_changes_no_tensor_of_the_model(
    tmp_path: Path, bad: Tensor, match: str
) -> None:
    build, tensors = _two_layer_reconstruction(tmp_path)
    model = build()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "2.bias"):  # a half-load would show in each of these
        assert not torch.equal(tensors[name], before[name]), name
    with pytest.raises(ValueError, match=match):
        load_reconstruction(model, {**tensors, "2.weight": bad})  # the last weight: four tensors come before it
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    load_reconstruction(model, tensors)  # and the whole reconstruction loads
    assert all(torch.equal(t, tensors[n].to(t.dtype)) for n, t in model.state_dict().items())


# ---------------------------------------------------------------------- memory, and what crosses devices


def _bytes_kept(build: Callable[[], object]) -> int:
    """Bytes the CPU allocator handed out while ``build`` ran and that are still held (the profiler's memory
    events, allocations less frees, summed over the outermost operators)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        build()
    return sum(event.cpu_memory_usage for event in prof.events() if event.cpu_parent is None)


def test_the_emas_keep_their_float32_averages_alone_where_device_says(tmp_path: Path) -> None:
    # A bf16 student: each EMA is its float32 average, 4 bytes a parameter; a bf16 module beside it, which no one
    # runs, was 2 more (12 bytes a parameter for two EMAs).
    model = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.Linear(128, 64)).to(torch.bfloat16)
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    floating = sum(t.numel() for t in tensors if t.is_floating_point())
    integers = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())  # copied as they are
    held: list[PostHocEMA] = []

    def build() -> None:
        held.append(
            PostHocEMA(
                model, (0.05, 0.10), snapshot_every=10, snapshot_dir=tmp_path, handle_buffers="update", device="cpu"
            )
        )

    kept = _bytes_kept(build)
    assert kept == 2 * (4 * floating + integers), kept / floating  # 8 bytes a parameter for two EMAs, not 12
    (posthoc,) = held
    for state in posthoc.state_dict()["emas"]:  # what an EMA holds is its state, nothing more
        saved = state["tensors"]
        assert sum(t.element_size() * t.numel() for t in saved.values()) == 4 * floating + integers
        assert {t.device for t in saved.values()} == {CPU}
        assert all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    for exported in posthoc.model_state_dicts():  # the model's own state_dict, in its dtypes
        assert exported.keys() == model.state_dict().keys()
        assert all(torch.equal(exported[k], v) and exported[k].dtype == v.dtype for k, v in model.state_dict().items())


class _CrossingLog(TorchDispatchMode):
    """Every copy and conversion: (operator, source device, source dtype, result device, result dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, torch.device, torch.dtype, torch.device, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            self.ops.append((func.__name__, source.device, source.dtype, out.device, out.dtype))
        return out


def test_a_snapshot_converts_each_tensor_where_it_lives_before_it_moves(tmp_path: Path) -> None:
    # On a GPU the float32 -> float16 conversion must run there, so that half the bytes cross to the host; on a
    # CPU the order still shows: the copies into the snapshot's buffers convert nothing.
    torch.manual_seed(0)
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(3), "steps": torch.tensor(7), "odd": torch.randn(4, 4).t()}
    with _CrossingLog() as log:
        layout, buffers = pack_snapshot(tensors, ("w", "b", "odd"), torch.float16)
    copies = [op for op in log.ops if op[0].startswith("copy_")]
    assert len(copies) == 4 and all(src_dtype == dst_dtype for _, _, src_dtype, _, dst_dtype in copies), copies
    conversions = [op for op in log.ops if op[0].startswith("_to_copy") and op[2] != op[4]]
    assert conversions == [("_to_copy.default", CPU, torch.float32, CPU, torch.float16)] * 3  # where the EMA is
    assert all(not b.is_pinned() for b in buffers.values())  # pinned memory only to receive from a GPU
    stored = {n: slot.view(buffers) for n, b, o, s in json.loads(layout) for slot in [Slot(b, o, tuple(s))]}
    for name, tensor in tensors.items():  # the values: each tensor converted on its own, bit for bit
        want = tensor.to(torch.float16) if name != "steps" else tensor
        assert stored[name].dtype == want.dtype and torch.equal(stored[name], want), name


def test_a_reconstruction_moves_the_stored_dtype_and_converts_on_the_target_device() -> None:
    # "meta" stands for a GPU: nothing that crosses to it is converted on the way (the host would convert it, and
    # copy float32, twice the bytes of float16); both ways of adding up a snapshot, aligned and by name.
    torch.manual_seed(0)
    tensors = {"a": torch.randn(6), "b": torch.randn(2, 2)}
    ref_layout, _ = pack_snapshot(tensors, ("a", "b"), torch.float16)
    layout, buffers = pack_snapshot(dict(reversed(tensors.items())), ("a", "b"), torch.float16)
    slots = {n: Slot(b, o, tuple(s)) for n, b, o, s in json.loads(ref_layout)}
    reversed_slots = {n: Slot(b, o, tuple(s)) for n, b, o, s in json.loads(layout)}
    for ref, this, buffer_of in ((slots, slots, "aligned"), (slots, reversed_slots, "by name")):
        sums = [{"averaged/float16": torch.zeros(10, device="meta")}]
        with _CrossingLog() as log:
            _add(sums, [1.0], "averaged/float16", ["a", "b"], ref, this, buffers)
        crossings = [op for op in log.ops if op[1] != op[3]]
        assert crossings and all(op[2] == op[4] == torch.float16 for op in crossings), (buffer_of, log.ops)
        assert any(op[1] == op[3] == torch.device("meta") and op[4] == torch.float32 for op in log.ops), buffer_of


# ---------------------------------------------------------------------- bad input


def test_reconstruction_errors_name_what_is_wrong(tmp_path: Path) -> None:
    posthoc, _ = _tracked_run(tmp_path, snapshot_every=500, snapshot_dtype=torch.float16)
    directory = posthoc.snapshot_dir
    with pytest.raises(ValueError, match=r"iteration 499 is before the first snapshot \(iteration 500\)"):
        posthoc.reconstruct(0.07, iteration=499)
    with pytest.raises(ValueError, match=r"iteration 700 is not a snapshot iteration; the nearest are 500 and 1000"):
        reconstruct_from_snapshots(directory, 0.07, iteration=700, model=student())
    with pytest.raises(ValueError, match=r"iteration 2001 is after the last snapshot \(iteration 2000\)"):
        posthoc.reconstruct(0.07, iteration=2001)
    with pytest.raises(ValueError, match=r"sigma_rel\[1\] must lie in"):
        posthoc.reconstruct([0.07, 0.5])
    with pytest.raises(
        ValueError, match=r"tensor 'weight' has shape \(1, 6\) in the snapshot 'phema-0000000500-0-0.05.pt', \(1, 5\)"
    ):
        reconstruct_from_snapshots(directory, 0.07, model=nn.Linear(5, 1, bias=False))
    with pytest.raises(
        ValueError,
        match=r"the snapshot 'phema-0000000500-0-0.05.pt' has no tensor 'bias' \(shape \(1,\)\), which the model has",
    ):
        reconstruct_from_snapshots(directory, 0.07, model=nn.Linear(6, 1, bias=True))
    with pytest.raises(FileNotFoundError, match=r"snapshot_dir '.*nowhere' does not exist"):
        reconstruct_from_snapshots(tmp_path / "nowhere", 0.07, model=student())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a snapshot")
    with pytest.raises(ValueError, match=r"holds no PostHocEMA snapshots"):
        list_snapshots(tmp_path / "empty")
    fresh = PostHocEMA(student(), (0.05, 0.10), snapshot_every=5, snapshot_dir=tmp_path / "fresh")
    with pytest.raises(ValueError, match="there are no snapshots yet"):
        fresh.reconstruct(0.07)


def test_bad_arguments_are_refused_before_anything_is_built(tmp_path: Path) -> None:
    model = student()
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"sigma_rels": (0.05, 0.05)}, ValueError, "has a width twice"),
        ({"sigma_rels": ()}, ValueError, "sigma_rels is empty"),
        ({"sigma_rels": 0.05}, TypeError, "must be a sequence of widths"),
        ({"snapshot_every": 0}, ValueError, "snapshot_every must be at least 1; found 0"),
        ({"snapshot_every": 2.5}, TypeError, "snapshot_every must be an int; found float"),
        ({"snapshot_every": "5 parsecs"}, ValueError, r"look like '500it', '2ep' or '0.05dur'.*found '5 parsecs'"),
        ({"snapshot_dtype": torch.int8}, TypeError, "snapshot_dtype must be a floating torch.dtype"),
        ({"handle_buffers": "ema_train"}, ValueError, "post-hoc EMAs run none"),
        ({"handle_buffers": "avg"}, ValueError, "can only be 'copy' or 'update'; found 'avg'"),
        ({"device": 2.5}, TypeError, "device must be a torch.device, a string like 'cuda:0' or 'cpu', or None"),
        ({"device": "meta"}, ValueError, "device='meta' holds no values"),
    ]
    for change, error, match in cases:
        arguments: dict[str, object] = {
            "sigma_rels": (0.05, 0.10), "snapshot_every": 10, "snapshot_dir": tmp_path / "s", **change
        }  # fmt: skip
        with pytest.raises(error, match=match):
            PostHocEMA(model, **arguments)  # type: ignore[arg-type]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path / "a-file")
    assert not (tmp_path / "s").exists()  # nothing was created on the way


def test_attach_validates_first_and_takes_one_engine(tmp_path: Path) -> None:
    model = student()
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path)
    with pytest.raises(ValueError):
        posthoc.attach(trainer, event="not an event")
    assert not any(trainer._event_handlers.values())  # no handler added (Ignite keeps them in this dict)
    posthoc.attach(trainer)  # the failed call left nothing behind
    with pytest.raises(RuntimeError, match="attached to another engine already"):
        posthoc.attach(follow(model, trajectory))


def test_a_directory_with_another_runs_snapshots_is_refused_and_left_alone(tmp_path: Path) -> None:
    def run(iterations: int) -> Engine:
        model = student()
        trainer = follow(model, trajectory)
        PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path).attach(trainer)
        trainer.run(range(iterations), max_epochs=1)
        return trainer

    run(30)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        ValueError, match=r"holds 'phema-0000000010-0-0.05.pt', a snapshot that this PostHocEMA did not"
    ):
        run(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_load_state_dict_is_all_or_nothing(tmp_path: Path) -> None:
    model = student()
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path / "a")
    posthoc.attach(trainer)
    trainer.run(range(25), max_epochs=1)
    state = posthoc.state_dict()
    other = PostHocEMA(student(), (0.05, 0.2), snapshot_every=10, snapshot_dir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"sigma_rels \(0.05, 0.1\), this one tracks \(0.05, 0.2\)"):
        other.load_state_dict(state)
    same = PostHocEMA(student(), snapshot_every=10, snapshot_dir=tmp_path / "b")
    broken = {**state, "emas": [state["emas"][0], {**state["emas"][1], "tensors": {}}]}
    before = same.model_state_dicts()[0]["weight"].clone()
    with pytest.raises(ValueError, match="has no tensor 'weight'"):
        same.load_state_dict(broken)
    assert torch.equal(same.model_state_dicts()[0]["weight"], before) and same.snapshots == []
    with pytest.raises(ValueError, match=r"unexpected \['every'\]. Nothing was loaded"):
        same.load_state_dict({**state, "every": 10})
    assert torch.equal(same.model_state_dicts()[0]["weight"], before) and same.snapshots == []
    same.load_state_dict(state)
    assert [i.iteration for i in same.snapshots] == [10, 10, 20, 20, 25, 25]  # and the run's end


def test_a_state_whose_snapshot_entries_do_not_fit_changes_nothing(tmp_path: Path) -> None:
    model = student()
    trainer = follow(model, trajectory)
    posthoc = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path / "a")
    posthoc.attach(trainer)
    trainer.run(range(25), max_epochs=1)
    state = posthoc.state_dict()  # EMAs that fit any PostHocEMA of this model and widths
    records = state["snapshots"]
    assert [r["iteration"] for r in records] == [10, 10, 20, 20, 25, 25]
    # A handler with a state of its own, on another trajectory: what a refused load must leave as it is.
    other = PostHocEMA(student(), snapshot_every=10, snapshot_dir=tmp_path / "b")
    other_trainer = follow(other.model, lambda t: -trajectory(t))
    other.attach(other_trainer)
    other_trainer.run(range(15), max_epochs=1)
    before = copy.deepcopy(other.state_dict())
    live = [m["weight"].clone() for m in other.model_state_dicts()]
    cases = [
        ([*records[:-1], {**records[-1], "index": 2}], "is not of an EMA that this PostHocEMA tracks"),
        (
            [*records[:-1], {**records[-1], "iteration": 26}],
            r"iteration 26, after the state's last update \(iteration 25",
        ),
        ([records[2], records[0], *records[3:]], "not in the order they were written"),
        ([*records, records[-1]], "is there twice"),
        ({"file": "x"}, "'snapshots' must be a list of entries; found dict"),
    ]
    for snapshots, match in cases:
        with pytest.raises(ValueError, match=match):
            other.load_state_dict({**state, "snapshots": snapshots})
        after = other.state_dict()
        assert after["snapshots"] == before["snapshots"] and after["run_id"] == before["run_id"], match
        assert all(after[k] == before[k] for k in ("last_update_iteration", "iteration_offset")), match
        for got, want in zip(after["emas"], before["emas"], strict=True):
            assert torch.equal(got["tensors"]["weight"], want["tensors"]["weight"]), match
        assert all(torch.equal(m["weight"], w) for m, w in zip(other.model_state_dicts(), live, strict=True)), match
    other.load_state_dict(state)  # the state itself loads
    assert torch.equal(other.model_state_dicts()[0]["weight"], posthoc.model_state_dicts()[0]["weight"])


# ---------------------------------------------------------------------- resume


def test_resume_through_checkpoint_in_a_fresh_process_is_bit_identical(tmp_path: Path) -> None:
    assert run_phase("first", tmp_path) is None  # checkpoints at 17, crashes at 26
    command = [sys.executable, "-m", "tests.posthoc.resume_job", "resume", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT)  # a fresh process: only the files carry over
    full = run_phase("full", tmp_path)  # the same job, never stopped
    resumed = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert full is not None
    a, b = full["state"], resumed["state"]
    assert a["snapshots"] == b["snapshots"] and [r["iteration"] for r in a["snapshots"]] == [
        12,
        12,
        21,
        21,
        30,
        30,
        39,
        39,
    ]
    assert a["last_update_iteration"] == b["last_update_iteration"] == 39
    for ema_a, ema_b in zip(a["emas"], b["emas"], strict=True):
        for name, tensor in ema_a["tensors"].items():
            assert torch.equal(tensor, ema_b["tensors"][name]), name
    for model_a, model_b in zip(full["ema_models"], resumed["ema_models"], strict=True):
        assert all(torch.equal(t, model_b[n]) for n, t in model_a.items())
    assert full["momenta"][-len(resumed["momenta"]) :] == resumed["momenta"]
    # The crash had written the snapshots at 21 after the checkpoint at 17: removed on resume, then written again.
    assert any("removed 2 snapshot(s) of this run" in w for w in resumed["warnings"]), resumed["warnings"]
    for record in a["snapshots"]:
        want = torch.load(tmp_path / "snapshots-full" / record["file"], weights_only=True)
        got = torch.load(tmp_path / "snapshots" / record["file"], weights_only=True)
        assert {k: v for k, v in want.items() if k not in ("buffers", "run_id")} == {
            k: v for k, v in got.items() if k not in ("buffers", "run_id")
        }
        assert all(torch.equal(t, got["buffers"][n]) for n, t in want["buffers"].items()), record["file"]
    assert len(list_snapshots(tmp_path / "snapshots")) == 8  # one run, as far as the reader can tell


# ---------------------------------------------------------------------- docs


def test_the_usage_blocks_in_the_docs_raise_no_warning() -> None:
    # test_docs runs them too; this adds that they warn about nothing (the plain loop's, then the engine's)
    text = (ROOT / "docs" / "posthoc.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 2 and "posthoc.update(step=step)" in blocks[0] and "posthoc.attach(" in blocks[1]
    namespace = {"__name__": "docs_posthoc"}
    with no_warnings():
        for block in blocks:
            exec(compile(block, "docs/posthoc.md", "exec"), namespace)


# ---------------------------------------------------------------------- the example


def test_the_digits_example_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --quick takes about 20 s in a fresh interpreter; the same code on 60 iterations, called directly.
    from examples.posthoc.cli import main

    (result,) = main(["--iters", "60", "--seeds", "1", "--no-progress", "--out", str(tmp_path)])
    png = (tmp_path / "posthoc_digits.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert len(list_snapshots(tmp_path / "snapshots-seed0")) == 2 * 30  # 0.025dur of 60 iterations: every 2
    for sigma, direct in result.tracked.items():  # the tracked widths come back as themselves (float16 snapshots)
        assert result.reconstructed[sigma].nll == pytest.approx(direct.nll, rel=2e-3), sigma
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved[0]["reconstructed"]) == [f"{s:.2f}" for s in GRID]
    out = capsys.readouterr().out
    assert "| 0.05 | 0.00% |" in out and "lowest mean test NLL at sigma_rel" in out
