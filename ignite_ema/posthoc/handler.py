r"""PostHocEMA: track power-function EMAs on an Ignite engine, snapshot them, choose the EMA length afterwards.

Karras et al. (2024, EDM2, Sec. 3 and App. C): two power-function EMAs and
periodic snapshots of them are enough to reconstruct, after training, the
power EMA of any width :math:`\sigma_{rel}`. The math is in
:mod:`ignite_ema.posthoc.power`, the files in :mod:`ignite_ema.posthoc.snapshots`,
the reconstruction in :mod:`ignite_ema.posthoc.reconstruct`; docs/posthoc.md
has the derivations and the measurements.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, overload

import ignite.distributed as idist
import torch
from ignite.base.mixins import Serializable
from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList
from ignite.handlers import DiskSaver
from torch import Tensor, nn

from ignite_ema._checks import check_count, check_device, check_keys, warn_at_caller
from ignite_ema.handlers._engine import EngineClock, attach_update
from ignite_ema.model_ema import ModelEMA, named_tensors
from ignite_ema.posthoc.power import check_sigma_rel, power_momentum, sigma_rel_to_gamma
from ignite_ema.posthoc.reconstruct import reconstruct_listed, target_sigma_rels
from ignite_ema.posthoc.snapshots import (
    SNAPSHOT_FORMAT,
    OnError,
    SnapshotInfo,
    check_on_error,
    pack_snapshot,
    read_snapshot_info,
    read_snapshot_infos,
    snapshot_filename,
    snapshot_name_matches,
)
from ignite_ema.schedules import HalfLife

__all__ = ["PostHocEMA"]

_COUNTERS = EngineClock.KEYS
_RECORD_KEYS = ("file", "iteration", "index", "sigma_rel", "gamma")


class PostHocEMA(Serializable):
    r"""Power-function EMAs of a model, updated on an Ignite event, snapshotted to disk for post-hoc reconstruction.

    Each EMA of exponent :math:`\gamma` is updated at iteration :math:`t` with
    :math:`\beta = (1 - \Delta / t)^{\gamma + 1}`, :math:`\Delta` the iterations
    since its previous update (the first update copies the student), so its
    weights follow :math:`\tau^\gamma` over :math:`[0, t]` whatever the update
    period. The momentum of each update, one per EMA, is published as
    ``engine.state.<name>``.

    Args:
        model: the student. ``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped.
        sigma_rels: the widths of the tracked EMAs, each in (0, 0.2887]
            (EDM2 tracks 0.05 and 0.10); see :func:`~ignite_ema.sigma_rel_to_gamma`.

    Keyword Args:
        snapshot_every: iterations between snapshots: an int, ``"500it"``,
            ``"2ep"`` (epochs) or ``"0.05dur"`` (fraction of the run; rounded
            to whole iterations). A snapshot of every EMA is written at the
            first update at or after each multiple, and at the end of a run
            that completes (not one terminated early).
        snapshot_dir: the directory for the snapshots (created if missing). It
            must hold no snapshots of another run.
        snapshot_dtype: floating dtype the averages are stored in (float16 by
            default; ``None`` keeps the shadows' float32). Copied tensors and
            complex averages are stored as they are.
        handle_buffers: ``"copy"`` (buffers copied from the student at each
            update; the reconstruction takes them from the snapshot at its
            iteration) or ``"update"`` (floating buffers averaged with the
            weights and reconstructed with them; integer ones copied).
        device: where the EMAs live (the student's device by default): the
            CPU keeps them off a GPU that the model barely fits.

    Each EMA holds its tensors only, no module (no one runs it during
    training): averages in float32 for a bf16 or fp16 student (4 bytes a
    parameter per EMA), other tensors as the student's. Read them with
    :meth:`model_state_dicts`.

    Attributes:
        model: the student, unwrapped.
        sigma_rels, gammas: the widths and their exponents.
        snapshot_dir: where the snapshots go.

    Example:

        >>> import tempfile
        >>> import torch
        >>> from ignite.engine import Engine, Events
        >>> from ignite_ema import PostHocEMA
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> def step(engine, batch):
        ...     with torch.no_grad():
        ...         model.weight.fill_(float(engine.state.iteration))   # the weight is the iteration t
        >>> trainer = Engine(step)
        >>> with tempfile.TemporaryDirectory() as snapshots:
        ...     posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=20, snapshot_dir=snapshots)
        ...     posthoc.attach(trainer, event=Events.ITERATION_COMPLETED(every=2))
        ...     _ = trainer.run(range(100), max_epochs=2)
        ...     ema_015 = posthoc.reconstruct(0.15)   # not tracked, at the last snapshot (t = 200)

        Weights in proportion to :math:`\tau^\gamma` over [0, 200] average
        :math:`\tau` to :math:`200 (\gamma + 1) / (\gamma + 2)`, here plus 1 as each
        update stands for the two iterations up to it:

        >>> [round(float(ema["weight"]), 1) for ema in posthoc.model_state_dicts()]   # 189.5 + 1, 177.6 + 1
        [190.4, 178.6]
        >>> round(float(ema_015["weight"]), 1)   # 165.0 if the EMA of width 0.15 had been tracked
        165.2
    """

    _state_dict_all_req_keys = ("sigma_rels", "handle_buffers", "run_id", "emas", "snapshots", *_COUNTERS)

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int | str,
        snapshot_dir: str | PathLike[str],
        snapshot_dtype: torch.dtype | None = torch.float16,
        handle_buffers: str = "copy",
        device: torch.device | str | None = None,
    ) -> None:
        self.sigma_rels = _check_sigma_rels(sigma_rels)
        self._snapshot_every = _check_snapshot_every(snapshot_every)
        self.snapshot_dir = _check_snapshot_dir(snapshot_dir)
        if snapshot_dtype is not None and not (
            isinstance(snapshot_dtype, torch.dtype) and snapshot_dtype.is_floating_point
        ):
            raise TypeError(f"snapshot_dtype must be a floating torch.dtype or None; found {snapshot_dtype!r}")
        if handle_buffers == "ema_train":
            raise ValueError(
                "handle_buffers='ema_train' leaves an EMA's buffers to its own forward passes during training, and "
                "post-hoc EMAs run none: their BatchNorm statistics would never move. Use 'copy' (the student's "
                "statistics) or 'update' (averaged with the weights), or re-estimate them after reconstruction "
                "(ignite_ema.recalibrate_bn)"
            )
        if handle_buffers not in ("copy", "update"):
            raise ValueError(f"handle_buffers can only be 'copy' or 'update'; found {handle_buffers!r}")
        placed = check_device(device)

        self._emas = tuple(ModelEMA(model, handle_buffers, device=placed, tensors_only=True) for _ in self.sigma_rels)
        self.model = self._emas[0].model
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.handle_buffers = handle_buffers
        self.snapshot_dtype = snapshot_dtype
        self._averaged = self._emas[0].averaged_names
        # From the student, whose tensors the EMAs pair by name (an EMA may keep no module of its own).
        self._shapes = {n: tuple(t.shape) for n, t in named_tensors(self.model).items()}

        self._run_id = uuid.uuid4().hex  # tells this run's snapshots from another's in the same directory
        self._records: list[dict[str, Any]] = []
        self._clock = EngineClock()  # the engine's iterations, going on across runs
        self._every: int | None = None  # snapshot_every in iterations, resolved when a run starts
        self._engine: Engine | None = None
        self._saver: DiskSaver | None = None

    # ------------------------------------------------------------------ attach

    def attach(
        self,
        engine: Engine,
        name: str = "posthoc_momentum",
        warn_if_exists: bool = True,
        event: str | Events | CallableEventWithFilter | EventsList = Events.ITERATION_COMPLETED,
    ) -> None:
        """Update the EMAs on ``event`` of ``engine``, and publish their momenta as ``engine.state.<name>``.

        Args:
            engine: the trainer; a handler belongs to one engine.
            name: attribute of ``engine.state`` that receives a tuple with each
                EMA's momentum of the last update (``None`` before the first).
            warn_if_exists: warn if ``engine.state`` already has ``name``.
            event: when to update, e.g. ``Events.ITERATION_COMPLETED(every=4)``.
        """
        self._engine = attach_update("PostHocEMA", engine, self._engine, self._update, name, warn_if_exists, event)
        setattr(engine.state, name, None)
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_started(self, engine: Engine) -> None:
        for ema in self._emas:
            ema.rebind()
            ema.check_outside_writes()
        self._every = self._resolve_every(engine)
        if self._clock.start_run(engine):
            warn_at_caller(
                f"the engine resumes at iteration {engine.state.iteration}, but this PostHocEMA has neither updated "
                "nor loaded its state: its first update copies the student, which then stands for every iteration "
                "before it. To resume exactly, checkpoint the handler too (Checkpoint(to_save={'posthoc': "
                "handler, ...}))"
            )
        if self._saver is None:
            self._saver = DiskSaver(self.snapshot_dir, atomic=True, create_dir=True, require_empty=False)
        if idist.get_rank() == 0:  # the rank that writes
            self._check_directory()

    def _on_completed(self, engine: Engine) -> None:
        """A run that reached its end (not one terminated early) ends with a snapshot of its last update."""
        state = engine.state
        end = state.max_iters
        if end is None and state.epoch_length is not None and state.max_epochs is not None:
            end = state.epoch_length * state.max_epochs
        if end is not None and state.iteration >= end and self._clock.last_update > 0:
            self.snapshot()

    def _resolve_every(self, engine: Engine) -> int:
        spec = self._snapshot_every
        if isinstance(spec, int):
            return spec
        iterations = spec.in_iterations(engine.state.epoch_length, engine.state.max_epochs)
        return max(1, round(iterations))

    def _check_directory(self) -> None:
        """Every listed snapshot is there; any other is this run's, written after the point it resumed from."""
        directory = self.snapshot_dir
        present = {p.name: p for p in directory.iterdir() if snapshot_name_matches(p.name)}
        listed = {r["file"] for r in self._records}
        missing = sorted(listed - present.keys())
        if missing:
            raise FileNotFoundError(
                f"snapshot_dir '{directory}' lacks {len(missing)} snapshot(s) that this PostHocEMA wrote, the first "
                f"'{missing[0]}': restore them, or give the snapshot_dir that holds them"
            )
        stale = []
        for name in sorted(present.keys() - listed):
            info = read_snapshot_info(present[name])
            if info.run_id != self._run_id or info.iteration <= self._clock.last_update:
                raise ValueError(
                    f"snapshot_dir '{directory}' holds '{name}', a snapshot that this PostHocEMA did not write "
                    f"(iteration {info.iteration}, run {info.run_id[:8]}): give each training run its own "
                    "snapshot_dir, or load the state of the run that wrote it (through Checkpoint) before running"
                )
            stale.append(name)
        assert self._saver is not None  # made just before
        for name in stale:
            self._saver.remove(name)
        if stale:
            warn_at_caller(
                f"removed {len(stale)} snapshot(s) of this run from '{directory}', the first '{stale[0]}': they "
                f"were written after iteration {self._clock.last_update}, where the run resumes, and are "
                "written again as it goes on"
            )

    # ------------------------------------------------------------------ updates and snapshots

    def _update(self, engine: Engine, name: str) -> None:
        iteration = self._clock.now(engine)
        delta = iteration - self._clock.last_update
        if delta <= 0:  # two events at one iteration: nothing new to average
            return
        momenta = tuple(power_momentum(g, iteration, delta) for g in self.gammas)
        for ema, momentum in zip(self._emas, momenta, strict=True):
            if delta == iteration:  # the first update: each EMA starts as the student
                ema.copy_student()
            else:  # a power momentum, near 1 early in the run by design: not a decay passed as a momentum
                ema._average(momentum)
        self._clock.last_update = iteration
        setattr(engine.state, name, momenta)
        assert self._every is not None  # resolved at STARTED, which comes first
        if iteration // self._every > self._last_snapshot_iteration() // self._every:
            self._write_snapshots(iteration)

    def _last_snapshot_iteration(self) -> int:
        return self._records[-1]["iteration"] if self._records else 0

    def snapshot(self) -> None:
        """Write a snapshot of every EMA now, as of its last update (a no-op if that one has one already).

        Called when a run completes; call it yourself to keep a run that you
        terminate (the snapshot then stands in the state that you checkpoint
        after it).
        """
        if self._saver is None or self._clock.last_update == 0:
            raise RuntimeError(
                "this PostHocEMA has no update to snapshot yet: snapshot() writes the EMAs as of their last update "
                "in a run (of this handler, on its attached engine)"
            )
        if self._last_snapshot_iteration() < self._clock.last_update:
            self._write_snapshots(self._clock.last_update)

    def model_state_dicts(self) -> list[dict[str, Tensor]]:
        """Each EMA's weights and buffers now, one per ``sigma_rel``, as the model's own ``state_dict()``.

        ``model.load_state_dict(posthoc.model_state_dicts()[0])`` puts the EMA
        of the first width into a module of the student's architecture.
        Tensors are in the student's dtypes (references where that is the
        EMA's dtype, converted copies of the float32 averages of a bf16
        student), where the EMAs live; :meth:`state_dict` holds the float32
        averages themselves. As :meth:`ModelEMA.model_state_dict
        <ignite_ema.ModelEMA.model_state_dict>`: for a sharded student, a
        collective.
        """
        return [ema.model_state_dict() for ema in self._emas]

    def _write_snapshots(self, iteration: int) -> None:
        assert self._saver is not None  # made at STARTED
        for index, (ema, sigma_rel, gamma) in enumerate(zip(self._emas, self.sigma_rels, self.gammas, strict=True)):
            filename = snapshot_filename(iteration, index, sigma_rel)
            tensors = ema.state_dict()["tensors"]  # on every rank: for a sharded model, a collective
            if idist.get_rank() == 0:
                self._saver(self._payload(tensors, iteration, index), filename)
            self._records.append(
                {"file": filename, "iteration": iteration, "index": index, "sigma_rel": sigma_rel, "gamma": gamma}
            )

    def _payload(self, tensors: Mapping[str, Tensor], iteration: int, index: int) -> dict[str, Any]:
        layout, buffers = pack_snapshot(tensors, self._averaged, self.snapshot_dtype)
        return {
            "format": SNAPSHOT_FORMAT,
            "run_id": self._run_id,
            "iteration": iteration,
            "index": index,
            "sigma_rel": self.sigma_rels[index],
            "gamma": self.gammas[index],
            "handle_buffers": self.handle_buffers,
            "layout": layout,
            "buffers": buffers,
        }

    @property
    def snapshots(self) -> list[SnapshotInfo]:
        """The snapshots written so far (or restored), by iteration then index."""
        return [
            SnapshotInfo(
                path=self.snapshot_dir / r["file"],
                iteration=r["iteration"],
                index=r["index"],
                sigma_rel=r["sigma_rel"],
                gamma=r["gamma"],
                handle_buffers=self.handle_buffers,
                run_id=self._run_id,
                averaged=self._averaged,
                shapes=self._shapes,
            )
            for r in self._records
        ]

    # ------------------------------------------------------------------ reconstruction

    @overload
    def reconstruct(
        self,
        sigma_rel: float,
        iteration: int | None = None,
        *,
        device: torch.device | str | None = None,
        on_error: OnError = "warn",
    ) -> dict[str, Tensor]: ...

    @overload
    def reconstruct(
        self,
        sigma_rel: Sequence[float],
        iteration: int | None = None,
        *,
        device: torch.device | str | None = None,
        on_error: OnError = "warn",
    ) -> list[dict[str, Tensor]]: ...

    def reconstruct(
        self,
        sigma_rel: float | Sequence[float],
        iteration: int | None = None,
        *,
        device: torch.device | str | None = None,
        on_error: OnError = "warn",
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """The power EMA of width ``sigma_rel`` at ``iteration``, from this handler's snapshots.

        As :func:`~ignite_ema.reconstruct_from_snapshots` (the same arguments
        and result) on the snapshots listed in this handler's state; the files
        are read from ``snapshot_dir``, so call it where they are (rank 0).
        Load the result with :func:`~ignite_ema.load_reconstruction`.

        Args:
            sigma_rel: a width in (0, 0.2887], or a sequence of them (one pass, a list returned).
            iteration: a snapshot iteration; the last one by default.
            device: where to accumulate and return the tensors (CPU by default).
            on_error: what to do about a snapshot file that does not read
                (truncated, say): ``"warn"`` leaves it out, with one warning
                naming every such file, and reconstructs from the others;
                ``"raise"`` raises its ``ValueError``. A missing file, or one
                of another run, is an error either way.
        """
        on_error = check_on_error(on_error)
        sigma_rels, several = target_sigma_rels(sigma_rel)
        infos = self._read_recorded(on_error)
        results = reconstruct_listed(infos, sigma_rels, iteration, model=self.model, device=device)
        return results if several else results[0]

    def _read_recorded(self, on_error: OnError) -> list[SnapshotInfo]:
        """The snapshots this handler wrote, each checked to be there and to be what it wrote."""
        records = {self.snapshot_dir / r["file"]: r for r in self._records}
        for path in records:
            if not path.is_file():
                raise FileNotFoundError(f"the snapshot '{path}' that this PostHocEMA wrote is missing")
        infos = read_snapshot_infos(list(records), on_error, f"'{self.snapshot_dir}'")
        for info in infos:
            record = records[info.path]
            expected = (self._run_id, record["iteration"], record["index"], record["gamma"])
            if (info.run_id, info.iteration, info.index, info.gamma) != expected:
                raise ValueError(
                    f"the snapshot '{info.path}' holds iteration {info.iteration} of EMA {info.index} of run "
                    f"{info.run_id[:8]}, not what this PostHocEMA wrote there: was it overwritten by another run?"
                )
        return infos

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The EMAs (float32 shadows included), the clock and the list of snapshots.

        Tensors are references, as in ``nn.Module.state_dict``.
        """
        return {
            "sigma_rels": list(self.sigma_rels),
            "handle_buffers": self.handle_buffers,
            "run_id": self._run_id,
            "emas": [ema.state_dict() for ema in self._emas],
            "snapshots": [dict(r) for r in self._records],
            **self._clock.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises naming what does not fit, before anything changes."""
        super().load_state_dict(state_dict)  # a mapping with every key
        check_keys(state_dict, self._state_dict_all_req_keys, "the PostHocEMA state")
        if [float(s) for s in state_dict["sigma_rels"]] != list(self.sigma_rels):
            raise ValueError(
                f"the state was saved by a PostHocEMA with sigma_rels {tuple(state_dict['sigma_rels'])}, this one "
                f"tracks {self.sigma_rels}"
            )
        if state_dict["handle_buffers"] != self.handle_buffers:
            raise ValueError(
                f"the state was saved with handle_buffers={state_dict['handle_buffers']!r}, this PostHocEMA uses "
                f"{self.handle_buffers!r}"
            )
        if not isinstance(state_dict["run_id"], str):
            raise ValueError(f"PostHocEMA state 'run_id' must be a string; found {state_dict['run_id']!r}")
        counters = {key: check_count(f"PostHocEMA state '{key}'", state_dict[key], minimum=0) for key in _COUNTERS}
        emas = state_dict["emas"]
        if not isinstance(emas, Sequence) or len(emas) != len(self._emas):
            raise ValueError(f"PostHocEMA state 'emas' must be a list of {len(self._emas)} EMA states")
        for ema, state in zip(self._emas, emas, strict=True):
            ema.check_state_dict(state)
        records = self._check_records(state_dict["snapshots"], counters["last_update_iteration"])
        # Everything is checked: from here on nothing raises, so nothing is half-loaded.
        for ema, state in zip(self._emas, emas, strict=True):
            ema.load_state_dict(state)
        self._records = records
        self._run_id = state_dict["run_id"]
        self._clock.load_state_dict(counters)

    def _check_records(self, records: object, last_update: int) -> list[dict[str, Any]]:
        """The snapshot entries of a state: each of a tracked EMA, in order, once, none after the last update."""
        if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
            raise ValueError(f"PostHocEMA state 'snapshots' must be a list of entries; found {type(records).__name__}")
        checked = [self._check_record(r) for r in records]
        seen: set[tuple[int, int]] = set()
        previous = 0
        for record in checked:
            iteration, key = record["iteration"], (record["iteration"], record["index"])
            if iteration > last_update:
                raise ValueError(
                    f"the snapshot entry {record} is of iteration {iteration}, after the state's last update "
                    f"(iteration {last_update}): snapshots are written at updates, so the state is inconsistent"
                )
            if iteration < previous:
                raise ValueError(
                    f"the snapshot entries are not in the order they were written: {record} comes after an entry "
                    f"of iteration {previous}"
                )
            if key in seen:
                raise ValueError(f"the snapshot entry {record} is there twice: one EMA has one snapshot an iteration")
            seen.add(key)
            previous = iteration
        return checked

    def _check_record(self, record: object) -> dict[str, Any]:
        if not isinstance(record, Mapping) or any(k not in record for k in _RECORD_KEYS):
            raise ValueError(f"each entry of PostHocEMA state 'snapshots' must have the keys {_RECORD_KEYS}")
        index = record["index"]
        # gamma comes from a root finder: another machine's LAPACK may differ in the last bits
        if not (isinstance(index, int) and 0 <= index < len(self._emas)) or not math.isclose(
            record["gamma"], self.gammas[index], rel_tol=1e-9
        ):
            raise ValueError(f"the snapshot entry {dict(record)} is not of an EMA that this PostHocEMA tracks")
        if not snapshot_name_matches(str(record["file"])):
            raise ValueError(f"the snapshot entry {dict(record)} does not name a snapshot file")
        check_count("a snapshot's iteration", record["iteration"], minimum=1)
        return {k: record[k] for k in _RECORD_KEYS}


def _check_sigma_rels(sigma_rels: object) -> tuple[float, ...]:
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
        raise TypeError(f"sigma_rels must be a sequence of widths, like (0.05, 0.10); found {sigma_rels!r}")
    if not sigma_rels:
        raise ValueError("sigma_rels is empty: give the widths of the EMAs to track, like (0.05, 0.10)")
    values = tuple(check_sigma_rel(s, f"sigma_rels[{i}]") for i, s in enumerate(sigma_rels))
    if len(set(values)) != len(values):
        raise ValueError(f"sigma_rels has a width twice: {values}; each EMA must have its own")
    return values


def _check_snapshot_every(snapshot_every: object) -> int | HalfLife:
    if isinstance(snapshot_every, str):
        return HalfLife.parse(snapshot_every, name="snapshot_every")
    return check_count("snapshot_every", snapshot_every, minimum=1)


def _check_snapshot_dir(snapshot_dir: object) -> Path:
    if not isinstance(snapshot_dir, (str, PathLike)):
        raise TypeError(f"snapshot_dir must be a path; found {type(snapshot_dir).__name__} {snapshot_dir!r}")
    directory = Path(snapshot_dir).expanduser()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"snapshot_dir '{directory}' exists and is not a directory")
    return directory
