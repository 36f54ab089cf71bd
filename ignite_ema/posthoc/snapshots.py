"""PostHocEMA's snapshot files: what they hold, how they are packed, how they are listed.

A snapshot is one file per tracked EMA and snapshot iteration,
``phema-<iteration>-<index>-<sigma_rel>.pt``, written by ``torch.save``
atomically (a temporary file in the same directory, then a rename): by
:class:`SnapshotFiles` in a plain loop, through Ignite's ``DiskSaver`` on an
engine, the same bytes either way. It is self-describing: the iteration it was
taken at, the EMA's ``sigma_rel`` and exponent, the buffer mode, the run that
wrote it, and every tensor of the EMA by name. The tensors are packed into a
few flat buffers, one per kind (average or copy) and stored dtype (averages
in the snapshot dtype, copied tensors in their own), with a layout of
``[name, buffer, offset, shape]`` kept as one JSON string: a model of 1,800
tensors is then a file of a handful of objects, fast to write, to load
(``weights_only``) and to add up. The file names are for people; the reader
goes by the contents. A file that does not read (truncated by a full disk or
an interrupted copy) is skipped with one warning by default: one bad file
must not cost the snapshots it does not touch.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from ignite_ema._checks import warn_at_caller
from ignite_ema.averaging import _wait_for

__all__ = [
    "SNAPSHOT_FORMAT",
    "SnapshotFiles",
    "SnapshotInfo",
    "SnapshotWriter",
    "list_snapshots",
    "load_snapshot",
    "read_snapshot_info",
    "snapshot_filename",
]

SNAPSHOT_FORMAT = "ignite_ema.posthoc/1"
_NAME = re.compile(r"^phema-(\d+)-(\d+)-[^/\\]*\.pt$")
_KEYS = ("format", "run_id", "iteration", "index", "sigma_rel", "gamma", "handle_buffers", "layout", "buffers")
_SLOTS = "_slots"  # the layout, parsed once, kept with the loaded contents
AVERAGED, COPIED = "averaged", "copied"  # the two kinds of buffer: averages, and tensors copied from the student
OnError = Literal["warn", "raise"]


def snapshot_filename(iteration: int, index: int, sigma_rel: float) -> str:
    """``phema-<iteration, 10 digits>-<index>-<sigma_rel>.pt``: sorted by iteration, unique by index."""
    return f"phema-{iteration:010d}-{index}-{sigma_rel:.4g}.pt"


def snapshot_name_matches(filename: str) -> bool:
    """Whether ``filename`` is named like a snapshot (the reader then checks its contents)."""
    return _NAME.match(filename) is not None


class SnapshotWriter(Protocol):
    """What writes and removes snapshot files in a directory: :class:`SnapshotFiles`, or Ignite's ``DiskSaver``."""

    def __call__(self, checkpoint: Mapping[str, Any], filename: str) -> None: ...

    def remove(self, filename: str) -> None: ...


class SnapshotFiles:
    """Writes snapshot files into ``directory`` atomically, as Ignite's ``DiskSaver(atomic=True)`` does, without Ignite.

    ``torch.save`` into a temporary file in the same directory, then
    ``os.replace``: a reader never sees a half-written file under a snapshot's
    name. The bytes are ``DiskSaver``'s (the same call on the same kind of file
    object), so a plain loop and an engine write the same files. The caller
    decides which rank writes.

    Args:
        directory: where the files go (created when the first is written).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, checkpoint: Mapping[str, Any], filename: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(delete=False, dir=self.directory) as tmp:
            try:
                torch.save(checkpoint, tmp.file)
            except BaseException:  # a full disk, an interrupt: no half-written file left behind
                tmp.close()
                os.remove(tmp.name)
                raise
        path = self.directory / filename
        os.replace(tmp.name, path)
        # readable by the group and others, as DiskSaver leaves it (a temporary file is the owner's alone)
        os.chmod(path, os.stat(path).st_mode | stat.S_IRGRP | stat.S_IROTH)

    def remove(self, filename: str) -> None:
        (self.directory / filename).unlink()


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in a snapshot: its buffer, offset and shape."""

    buffer: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def view(self, buffers: Mapping[str, Tensor]) -> Tensor:
        return buffers[self.buffer][self.offset : self.offset + self.numel].view(self.shape)


def pack_snapshot(
    tensors: Mapping[str, Tensor], averaged: Collection[str], dtype: torch.dtype | None
) -> tuple[str, dict[str, Tensor]]:
    """The layout (JSON) and the flat CPU buffers of ``tensors``: real floating averages in ``dtype`` (if given).

    Each tensor is converted where it lives, so that only the stored dtype
    crosses to the host (half the bytes of float32 for float16). Copies off
    a GPU go into pinned buffers without blocking, and the host waits once,
    after the last: the buffers are complete when this returns.

    Args:
        tensors: the EMA's tensors by name, in order.
        averaged: the names of those that are averages.
        dtype: the dtype of the averages on disk; ``None`` keeps theirs.
    """
    layout: list[list[Any]] = []
    sizes: dict[str, int] = {}
    stored: dict[str, torch.dtype] = {}
    pinned: set[str] = set()
    for name, tensor in tensors.items():
        kind = AVERAGED if name in averaged else COPIED
        want = dtype if kind == AVERAGED and dtype is not None and tensor.is_floating_point() else tensor.dtype
        buffer = f"{kind}/{str(want).removeprefix('torch.')}"
        layout.append([name, buffer, sizes.get(buffer, 0), list(tensor.shape)])
        sizes[buffer] = sizes.get(buffer, 0) + tensor.numel()
        stored[buffer] = want
        if tensor.is_cuda:  # an asynchronous copy to the host needs page-locked memory
            pinned.add(buffer)
    buffers = {b: torch.empty(n, dtype=stored[b], pin_memory=b in pinned) for b, n in sizes.items()}
    devices: set[torch.device] = set()
    with torch.no_grad():
        for (_, buffer, offset, _), tensor in zip(layout, tensors.values(), strict=True):
            # One converted tensor at a time on the device: the allocator reuses its memory only for work queued
            # after this copy, on the same stream, so it may be freed before the copy has run.
            value = tensor.detach().to(stored[buffer]).reshape(-1)
            remote = value.device.type != "cpu"
            buffers[buffer][offset : offset + value.numel()].copy_(value, non_blocking=remote)
            if remote:
                devices.add(value.device)
    for device in devices:  # the copies have landed before anyone reads the buffers
        _wait_for(device)
    return json.dumps(layout), buffers


def layout_of(data: Mapping[str, Any]) -> dict[str, Slot]:
    """The layout of a snapshot that :func:`load_snapshot_data` loaded, by name."""
    slots: dict[str, Slot] = data[_SLOTS]
    return slots


def load_snapshot_data(path: Path) -> dict[str, Any]:
    """The file's contents, its buffers memory-mapped (read from disk only when used); checked to be a snapshot."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, pickle errors, ... for a file it cannot read
        raise ValueError(f"'{path}' is not a readable PostHocEMA snapshot: {error}") from None
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"'{path}' is not a PostHocEMA snapshot: expected format {SNAPSHOT_FORMAT!r}, found {found!r}")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ValueError(f"the snapshot '{path}' lacks {missing}: it was not written by PostHocEMA")
    try:
        entries = json.loads(data["layout"])
        data[_SLOTS] = {str(n): Slot(str(b), int(o), tuple(int(d) for d in s)) for n, b, o, s in entries}
    except (TypeError, ValueError) as error:
        raise ValueError(f"the snapshot '{path}' is damaged: its layout does not read ({error})") from None
    for name, slot in layout_of(data).items():
        buffer = data["buffers"].get(slot.buffer)
        if buffer is None or slot.offset < 0 or slot.offset + slot.numel > buffer.numel():
            raise ValueError(f"the snapshot '{path}' is damaged: tensor '{name}' lies outside its buffer")
    return data


def load_snapshot(path: str | PathLike[str]) -> dict[str, Tensor]:
    """The EMA tensors of one snapshot file by name, as stored (memory-mapped views: clone what you keep).

    Args:
        path: the file.
    """
    data = load_snapshot_data(Path(path))
    return {name: slot.view(data["buffers"]) for name, slot in layout_of(data).items()}


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot file holds, read without loading its tensors' values."""

    path: Path
    iteration: int
    index: int
    sigma_rel: float
    gamma: float
    handle_buffers: str
    run_id: str
    averaged: tuple[str, ...] = field(repr=False)
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False)


def read_snapshot_info(path: str | PathLike[str]) -> SnapshotInfo:
    """The metadata, tensor names and shapes of one snapshot file.

    Args:
        path: the file.
    """
    path = Path(path)
    data = load_snapshot_data(path)
    layout = layout_of(data)
    return SnapshotInfo(
        path=path,
        iteration=int(data["iteration"]),
        index=int(data["index"]),
        sigma_rel=float(data["sigma_rel"]),
        gamma=float(data["gamma"]),
        handle_buffers=str(data["handle_buffers"]),
        run_id=str(data["run_id"]),
        averaged=tuple(n for n, s in layout.items() if s.buffer.startswith(AVERAGED)),
        shapes={n: s.shape for n, s in layout.items()},
    )


def check_on_error(on_error: object) -> OnError:
    """``on_error`` if it is ``"warn"`` or ``"raise"``."""
    if on_error == "warn":
        return "warn"
    if on_error == "raise":
        return "raise"
    raise ValueError(f"on_error can only be 'warn' or 'raise'; found {on_error!r}")


def read_snapshot_infos(paths: Sequence[Path], on_error: OnError, where: str) -> list[SnapshotInfo]:
    """The info of each file of ``paths`` that reads, in order.

    A file that does not read (truncated, or not a snapshot) raises its
    ``ValueError`` with ``on_error="raise"``; with ``"warn"`` it is skipped,
    and one warning names every skipped file. ``ValueError`` if there are
    files and none reads.

    Args:
        paths: the snapshot files.
        on_error: ``"warn"`` or ``"raise"`` (checked by the caller).
        where: where the files are, for the messages.
    """
    infos: list[SnapshotInfo] = []
    skipped: list[tuple[Path, ValueError]] = []
    for path in paths:
        try:
            infos.append(read_snapshot_info(path))
        except ValueError as error:
            if on_error == "raise":
                raise
            skipped.append((path, error))
    if skipped and not infos:
        raise ValueError(f"none of the {len(skipped)} snapshot file(s) in {where} reads; the first: {skipped[0][1]}")
    if skipped:
        names = ", ".join(f"'{p.name}'" for p, _ in skipped)
        warn_at_caller(
            f"skipped {len(skipped)} unreadable snapshot file(s) in {where}: {names} (the first: {skipped[0][1]}). "
            f"The other {len(infos)} are used; pass on_error='raise' to stop instead"
        )
    return infos


def list_snapshots(snapshot_dir: str | PathLike[str], *, on_error: OnError = "warn") -> list[SnapshotInfo]:
    """Every snapshot in ``snapshot_dir``, by iteration then index; other files are ignored.

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a missing
    directory, ``ValueError`` for one without snapshots or with snapshots of
    more than one run.

    Args:
        snapshot_dir: the directory a :class:`~ignite_ema.PostHocEMA` wrote.
        on_error: what to do about a snapshot file that does not read
            (truncated, say): ``"warn"`` skips it, with one warning naming
            every such file, and lists the others; ``"raise"`` raises its
            ``ValueError``.
    """
    on_error = check_on_error(on_error)
    directory = Path(snapshot_dir).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"snapshot_dir '{directory}' does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"snapshot_dir '{directory}' is not a directory")
    paths = [p for p in sorted(directory.iterdir()) if snapshot_name_matches(p.name) and p.is_file()]
    infos = read_snapshot_infos(paths, on_error, f"'{directory}'")
    if not infos:
        raise ValueError(
            f"snapshot_dir '{directory}' holds no PostHocEMA snapshots (files named phema-<iteration>-<index>-"
            "<sigma_rel>.pt): is it the snapshot_dir the training run was given?"
        )
    runs = {i.run_id for i in infos}
    if len(runs) > 1:
        first = next(i for i in infos if i.run_id != infos[0].run_id)
        raise ValueError(
            f"snapshot_dir '{directory}' holds snapshots of {len(runs)} training runs ('{infos[0].path.name}' and "
            f"'{first.path.name}' differ): give each run its own snapshot_dir"
        )
    return sorted(infos, key=lambda i: (i.iteration, i.index))
