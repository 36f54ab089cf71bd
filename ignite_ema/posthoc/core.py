r"""PostHocEMA: power-function EMAs of a model and their snapshots, then the EMA of any width after training.

Karras et al. (2024, EDM2, Sec. 3 and App. C): two power-function EMAs and
periodic snapshots of them are enough to reconstruct, after training, the
power EMA of any width :math:`\sigma_{rel}`. The math is in
:mod:`ignite_ema.posthoc.power`, the files in :mod:`ignite_ema.posthoc.snapshots`,
the reconstruction in :mod:`ignite_ema.posthoc.reconstruct`; docs/posthoc.md
has the derivations and the measurements.

This module imports no Ignite: a plain loop calls :meth:`PostHocEMA.update`.
:meth:`PostHocEMA.attach` loads the Ignite adapter
(:mod:`ignite_ema.posthoc.handler`), which turns an engine's iterations into
the same updates.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor, nn

from ignite_ema._checks import check_count, check_device, check_keys, warn_at_caller
from ignite_ema.distributed import rank
from ignite_ema.model_ema import ModelEMA
from ignite_ema.modules import named_tensors
from ignite_ema.posthoc.power import check_sigma_rel, power_momentum, sigma_rel_to_gamma
from ignite_ema.posthoc.reconstruct import reconstruct_listed, target_sigma_rels
from ignite_ema.posthoc.snapshots import (
    SNAPSHOT_FORMAT,
    OnError,
    SnapshotFiles,
    SnapshotInfo,
    SnapshotWriter,
    check_on_error,
    pack_snapshot,
    read_snapshot_info,
    read_snapshot_infos,
    snapshot_filename,
    snapshot_name_matches,
)
from ignite_ema.schedules import HalfLife, next_step

if TYPE_CHECKING:
    from ignite.engine import Engine

    from ignite_ema.handlers._engine import Event
    from ignite_ema.posthoc.handler import EngineAdapter

__all__ = ["STATE_KEYS", "PostHocEMA"]

#: The keys of :meth:`PostHocEMA.state_dict`. ``iteration_offset`` is the Ignite adapter's (0 in a plain loop).
STATE_KEYS = (
    "sigma_rels",
    "handle_buffers",
    "run_id",
    "emas",
    "snapshots",
    "last_update_iteration",
    "iteration_offset",
)
_RECORD_KEYS = ("file", "iteration", "index", "sigma_rel", "gamma")


class PostHocEMA:
    r"""Power-function EMAs of a model, snapshotted to disk for post-hoc reconstruction: in a plain loop, or on an
    Ignite engine (:meth:`attach`).

    Each EMA of exponent :math:`\gamma` is updated at step :math:`t` with
    :math:`\beta = (1 - \Delta / t)^{\gamma + 1}`, :math:`\Delta` the steps
    since its previous update (the first update copies the student), so its
    weights follow :math:`\tau^\gamma` over :math:`[0, t]` whatever the steps
    between updates. A step is an iteration of training: the argument of
    :meth:`update`, or an engine's iteration.

    Args:
        model: the student. ``DataParallel``, ``DistributedDataParallel`` and
            ``torch.compile`` wrappers are unwrapped.
        sigma_rels: the widths of the tracked EMAs, each in (0, 0.2887]
            (EDM2 tracks 0.05 and 0.10); see :func:`~ignite_ema.sigma_rel_to_gamma`.

    Keyword Args:
        snapshot_every: steps between snapshots: an int or ``"500it"``; on an
            engine also ``"2ep"`` (epochs) or ``"0.05dur"`` (fraction of the
            run; rounded to whole iterations). A snapshot of every EMA is
            written at the first update at or after each multiple, and on an
            engine at the end of a run that completes (not one terminated
            early); in a plain loop, call :meth:`snapshot` at the end.
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
        last_step: the step of the last update (0: none yet).

    Example: the weight is the step :math:`t`, updated every second step.

        >>> import tempfile
        >>> import torch
        >>> from ignite_ema import PostHocEMA
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with tempfile.TemporaryDirectory() as snapshots:
        ...     posthoc = PostHocEMA(model, (0.05, 0.10), snapshot_every=20, snapshot_dir=snapshots)
        ...     for t in range(1, 201):
        ...         with torch.no_grad():
        ...             _ = model.weight.fill_(float(t))   # a training step
        ...         if t % 2 == 0:
        ...             momenta = posthoc.update(step=t)
        ...     posthoc.snapshot()   # one at 200 already: a no-op here
        ...     ema_015 = posthoc.reconstruct(0.15)   # not tracked, at the last snapshot (t = 200)

        Weights in proportion to :math:`\tau^\gamma` over [0, 200] average
        :math:`\tau` to :math:`200 (\gamma + 1) / (\gamma + 2)`, here plus 1 as each
        update stands for the two steps up to it:

        >>> [round(float(ema["weight"]), 1) for ema in posthoc.model_state_dicts()]   # 189.5 + 1, 177.6 + 1
        [190.4, 178.6]
        >>> round(float(ema_015["weight"]), 1)   # 165.0 if the EMA of width 0.15 had been tracked
        165.2
        >>> [round(m, 4) for m in momenta]   # 1 - (1 - 2/200) ** (gamma + 1)
        [0.1653, 0.0767]
    """

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
        self.last_step = 0
        self._every: int | None = None  # snapshot_every in steps: known in a plain loop, resolved by a run's start
        self._started = False  # the directory checked and the student looked up since the last load
        self._writer: SnapshotWriter = SnapshotFiles(self.snapshot_dir)  # the adapter's DiskSaver on an engine
        self._restored = False  # a state was loaded
        # The Ignite adapter that attach() made. Its clock's offset is part of this object's state, for Checkpoint;
        # a state loaded before attach() leaves it here for the adapter to take.
        self._adapter: EngineAdapter | None = None
        self._loaded_offset = 0

    # ------------------------------------------------------------------ updates and snapshots

    def update(self, step: int | None = None) -> tuple[float, ...]:
        """Update every EMA at ``step`` in a plain loop; returns each EMA's momentum (``1 - beta``), in order.

        Call it after ``optimizer.step()``. A snapshot of every EMA is written
        when ``step`` reaches the next multiple of ``snapshot_every``.

        Args:
            step: the training step, which must come after the last update's;
                the next one of the EMAs' own count (1, 2, 3, ...) by default.
                Steps may jump (an update every few steps, skipped steps): each
                update then stands for the steps since the previous one.
        """
        if self._adapter is not None:
            raise RuntimeError(
                "this PostHocEMA is attached to an engine, which updates it at its event: call update() only in a "
                "plain loop, with a PostHocEMA that is not attached"
            )
        step = next_step(step, self.last_step)
        if self._every is None:
            self._every = _steps_between_snapshots(self._snapshot_every, None)
        if not self._started:
            self._start()
        return self._update(step)

    def _start(self) -> None:
        """Before the first update after construction or a load, and when an engine's run starts: the student's
        tensors looked up again, writes to the EMAs from outside adopted, the snapshot directory checked."""
        for ema in self._emas:
            ema.rebind()
            ema.check_outside_writes()
        if rank() == 0:  # the rank that writes
            self._check_directory()
        self._started = True

    def _update(self, step: int) -> tuple[float, ...]:
        """Update at ``step`` (after :attr:`last_step`, checked by the caller) and snapshot if one is due."""
        delta = step - self.last_step
        momenta = tuple(power_momentum(g, step, delta) for g in self.gammas)
        for ema, momentum in zip(self._emas, momenta, strict=True):
            if delta == step:  # the first update: each EMA starts as the student
                ema.copy_student()
            else:  # a power momentum, near 1 early in the run by design: not a decay passed as a momentum
                ema._average(momentum)
        self.last_step = step
        assert self._every is not None  # known before the first update of a plain loop or of a run
        if step // self._every > self._last_snapshot_iteration() // self._every:
            self._write_snapshots(step)
        return momenta

    def _check_directory(self) -> None:
        """Every listed snapshot is there; any other is this run's, written after the point it resumed from."""
        directory = self.snapshot_dir
        directory.mkdir(parents=True, exist_ok=True)
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
            if info.run_id != self._run_id or info.iteration <= self.last_step:
                raise ValueError(
                    f"snapshot_dir '{directory}' holds '{name}', a snapshot that this PostHocEMA did not write "
                    f"(iteration {info.iteration}, run {info.run_id[:8]}): give each training run its own "
                    "snapshot_dir, or load the state of the run that wrote it (load_state_dict(), or through "
                    "Checkpoint) before going on"
                )
            stale.append(name)
        for name in stale:
            self._writer.remove(name)
        if stale:
            warn_at_caller(
                f"removed {len(stale)} snapshot(s) of this run from '{directory}', the first '{stale[0]}': they "
                f"were written after iteration {self.last_step}, where the run resumes, and are "
                "written again as it goes on"
            )

    def _last_snapshot_iteration(self) -> int:
        return self._records[-1]["iteration"] if self._records else 0

    def snapshot(self) -> None:
        """Write a snapshot of every EMA now, as of its last update (a no-op if that one has one already).

        On an engine, called when a run completes; call it yourself at the end
        of a plain loop, or to keep a run that you terminate (the snapshot then
        stands in the state that you checkpoint after it).
        """
        if self.last_step == 0:
            raise RuntimeError(
                "this PostHocEMA has no update to snapshot yet: snapshot() writes the EMAs as of their last update "
                "(call update() first, or run the engine it is attached to)"
            )
        if self._last_snapshot_iteration() < self.last_step:
            if not self._started:
                self._start()
            self._write_snapshots(self.last_step)

    def model_state_dicts(self) -> list[dict[str, Any]]:
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
        for index, (ema, sigma_rel, gamma) in enumerate(zip(self._emas, self.sigma_rels, self.gammas, strict=True)):
            filename = snapshot_filename(iteration, index, sigma_rel)
            tensors = ema.state_dict()["tensors"]  # on every rank: for a sharded model, a collective
            if rank() == 0:
                self._writer(self._payload(tensors, iteration, index), filename)
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

    # ------------------------------------------------------------------ an engine

    def attach(
        self,
        engine: Engine,
        name: str = "posthoc_momentum",
        warn_if_exists: bool = True,
        event: Event | None = None,
    ) -> None:
        r"""Update the EMAs on ``event`` of an Ignite ``engine``, at its iterations, and publish their momenta as
        ``engine.state.<name>``.

        The engine's iterations are the steps; a new ``engine.run()`` that
        restarts the engine's count goes on from the last update. ``"ep"`` and
        ``"dur"`` in ``snapshot_every`` are resolved when a run starts, the
        snapshots are written through Ignite's ``DiskSaver``, and a run that
        completes ends with a snapshot. Checkpoint the handler with the rest
        (``Checkpoint(to_save={"posthoc": posthoc, ...})``) to resume it.

        Args:
            engine: the trainer; a handler belongs to one engine.
            name: attribute of ``engine.state`` that receives a tuple with each
                EMA's momentum of the last update (``None`` before the first).
            warn_if_exists: warn if ``engine.state`` already has ``name``.
            event: when to update, e.g. ``Events.ITERATION_COMPLETED(every=4)``
                (``Events.ITERATION_COMPLETED`` by default).

        Example: the plain loop of the class's example, on an engine.

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
            ...     ema_015 = posthoc.reconstruct(0.15)
            >>> [round(float(ema["weight"]), 1) for ema in posthoc.model_state_dicts()]
            [190.4, 178.6]
            >>> round(float(ema_015["weight"]), 1), [round(m, 4) for m in trainer.state.posthoc_momentum]
            (165.2, [0.1653, 0.0767])
        """
        from ignite_ema.posthoc.handler import EngineAdapter  # Ignite, loaded when a PostHocEMA first meets an engine

        attached = None if self._adapter is None else self._adapter.engine
        self._adapter = EngineAdapter(self, engine, attached, name, warn_if_exists, event)

    def _iteration_offset(self) -> int:
        return self._loaded_offset if self._adapter is None else self._adapter.clock.offset

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
        """The power EMA of width ``sigma_rel`` at ``iteration``, from this object's snapshots.

        As :func:`~ignite_ema.reconstruct_from_snapshots` (the same arguments
        and result) on the snapshots listed in this object's state; the files
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
        """The snapshots this object wrote, each checked to be there and to be what it wrote."""
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

    def state_dict(self) -> dict[str, Any]:
        """The EMAs (float32 shadows included), the step of the last update and the list of snapshots.

        Tensors are references, as in ``nn.Module.state_dict``.
        ``iteration_offset`` is the engine adapter's (0 in a plain loop).
        """
        return {
            "sigma_rels": list(self.sigma_rels),
            "handle_buffers": self.handle_buffers,
            "run_id": self._run_id,
            "emas": [ema.state_dict() for ema in self._emas],
            "snapshots": [dict(r) for r in self._records],
            "last_update_iteration": self.last_step,
            "iteration_offset": self._iteration_offset(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises naming what does not fit, before anything changes.

        The next update (or an engine's next run) checks ``snapshot_dir``
        against the restored list of snapshots, and removes those of this run
        written after the restored step (a crash after the last checkpoint).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Argument state_dict should be a dictionary, but given {type(state_dict)}")
        check_keys(state_dict, STATE_KEYS, "the PostHocEMA state")
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
        last_step, offset = (
            check_count(f"PostHocEMA state '{key}'", state_dict[key], minimum=0)
            for key in ("last_update_iteration", "iteration_offset")
        )
        emas = state_dict["emas"]
        if not isinstance(emas, Sequence) or len(emas) != len(self._emas):
            raise ValueError(f"PostHocEMA state 'emas' must be a list of {len(self._emas)} EMA states")
        for ema, state in zip(self._emas, emas, strict=True):
            ema.check_state_dict(state)
        records = self._check_records(state_dict["snapshots"], last_step)
        # Everything is checked: from here on nothing raises, so nothing is half-loaded.
        for ema, state in zip(self._emas, emas, strict=True):
            ema.load_state_dict(state)
        self._records = records
        self._run_id = state_dict["run_id"]
        self.last_step = last_step
        self._restored, self._started = True, False
        self._loaded_offset = offset
        if self._adapter is not None:
            self._adapter.restore(offset)

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


def _steps_between_snapshots(spec: int | HalfLife, run: tuple[int | None, int | None] | None) -> int:
    """``snapshot_every`` in steps; ``run`` is an engine's ``(epoch_length, max_epochs)``, ``None`` in a plain loop."""
    if isinstance(spec, int):
        return spec
    if run is None and spec.unit != "it":
        what = "epochs" if spec.unit == "ep" else "a fraction of the run"
        raise ValueError(
            f"snapshot_every='{spec.value:g}{spec.unit}' is in {what}, which only an Ignite engine knows: in a plain "
            "loop give it in iterations (an int, or '500it'), or attach(engine) and let the engine update"
        )
    return max(1, round(spec.in_iterations(*(run or (None, None)))))


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
