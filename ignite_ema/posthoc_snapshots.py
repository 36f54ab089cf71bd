"""PostHocEMA's snapshot files, and the reconstruction of any power EMA from them.

A snapshot is one file per tracked EMA and snapshot iteration,
``phema-<iteration>-<index>-<sigma_rel>.pt``, written by ``torch.save``
through Ignite's ``DiskSaver``. It is self-describing: the iteration it was
taken at, the EMA's ``sigma_rel`` and exponent, the buffer mode, the run that
wrote it, which tensors are averages, and every tensor of the EMA by name
(averages in the snapshot dtype, copied tensors as they are). The file names
are for people; the reader goes by the contents.

The reconstruction needs only the directory and the model it was written for,
so it runs after training, in a fresh process; see
:func:`reconstruct_from_snapshots`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor, nn

from ignite_ema._checks import check_count, check_device
from ignite_ema.model_ema import _check_same_names_and_shapes, named_tensors, unwrap_model
from ignite_ema.posthoc_math import check_sigma_rel, sigma_rel_to_gamma, synthesis_coefficients

__all__ = [
    "SNAPSHOT_FORMAT",
    "SnapshotInfo",
    "list_snapshots",
    "load_reconstruction",
    "read_snapshot_info",
    "reconstruct_from_snapshots",
    "snapshot_filename",
]

SNAPSHOT_FORMAT = "ignite_ema.posthoc/1"
_NAME = re.compile(r"^phema-(\d+)-(\d+)-[^/\\]*\.pt$")
_KEYS = ("format", "run_id", "iteration", "index", "sigma_rel", "gamma", "handle_buffers", "averaged", "tensors")


def snapshot_filename(iteration: int, index: int, sigma_rel: float) -> str:
    """``phema-<iteration, 10 digits>-<index>-<sigma_rel>.pt``: sorted by iteration, unique by index."""
    return f"phema-{iteration:010d}-{index}-{sigma_rel:.4g}.pt"


def snapshot_name_matches(filename: str) -> bool:
    """Whether ``filename`` is named like a snapshot (the reader then checks its contents)."""
    return _NAME.match(filename) is not None


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
    shapes: Mapping[str, torch.Size] = field(repr=False)


def _load(path: Path) -> dict[str, Any]:
    """The file's contents, its tensors memory-mapped (read from disk only when used)."""
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
    return data


def read_snapshot_info(path: str | PathLike[str]) -> SnapshotInfo:
    """The metadata, tensor names and shapes of one snapshot file.

    Args:
        path: the file.
    """
    path = Path(path)
    data = _load(path)
    tensors = data["tensors"]
    return SnapshotInfo(
        path=path,
        iteration=int(data["iteration"]),
        index=int(data["index"]),
        sigma_rel=float(data["sigma_rel"]),
        gamma=float(data["gamma"]),
        handle_buffers=str(data["handle_buffers"]),
        run_id=str(data["run_id"]),
        averaged=tuple(data["averaged"]),
        shapes={name: t.shape for name, t in tensors.items()},
    )


def list_snapshots(snapshot_dir: str | PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot in ``snapshot_dir``, by iteration then index; other files are ignored.

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a missing
    directory, ``ValueError`` for one without snapshots or with snapshots of
    more than one run.

    Args:
        snapshot_dir: the directory a :class:`~ignite_ema.PostHocEMA` wrote.
    """
    directory = Path(snapshot_dir).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"snapshot_dir '{directory}' does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"snapshot_dir '{directory}' is not a directory")
    paths = [p for p in sorted(directory.iterdir()) if snapshot_name_matches(p.name) and p.is_file()]
    infos = [read_snapshot_info(p) for p in paths]
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


# ---------------------------------------------------------------------- reconstruction


@overload
def reconstruct_from_snapshots(
    snapshot_dir: str | PathLike[str],
    sigma_rel: float,
    iteration: int | None = None,
    *,
    model: nn.Module,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]: ...


@overload
def reconstruct_from_snapshots(
    snapshot_dir: str | PathLike[str],
    sigma_rel: Sequence[float],
    iteration: int | None = None,
    *,
    model: nn.Module,
    device: torch.device | str | None = None,
) -> list[dict[str, Tensor]]: ...


def reconstruct_from_snapshots(
    snapshot_dir: str | PathLike[str],
    sigma_rel: float | Sequence[float],
    iteration: int | None = None,
    *,
    model: nn.Module,
    device: torch.device | str | None = None,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """The EMA of width ``sigma_rel`` at ``iteration``, from the snapshots in ``snapshot_dir`` alone.

    Returns the EMA's tensors by name (those of ``named_tensors(model)``, which
    are ``model.state_dict()``'s when the model has no tied weights or
    non-persistent buffers); load them with :func:`load_reconstruction`.
    Averages come in float32 (or the model's wider dtype), copied buffers as
    they were saved.

    Args:
        snapshot_dir: the directory the training run's :class:`~ignite_ema.PostHocEMA` wrote.
        sigma_rel: a width in (0, 0.2887], or a sequence of them: all are
            reconstructed in one pass over the files, and a list is returned.
        iteration: a snapshot iteration (the last one by default); only
            snapshots at or before it are used.
        model: the model the snapshots were written for (names and shapes are
            checked); its values are not used.
        device: where to accumulate and return the tensors (CPU by default).
    """
    infos = list_snapshots(snapshot_dir)
    sigma_rels, several = target_sigma_rels(sigma_rel)
    results = reconstruct_listed(infos, sigma_rels, iteration, model=model, device=device)
    return results if several else results[0]


def target_sigma_rels(sigma_rel: object) -> tuple[list[float], bool]:
    """The widths asked for, checked, and whether several were (a sequence or an array, even of one)."""
    if isinstance(sigma_rel, np.ndarray):
        sigma_rel = sigma_rel.tolist()
    if isinstance(sigma_rel, (str, bytes)) or not isinstance(sigma_rel, Sequence):
        return [check_sigma_rel(sigma_rel)], False
    if not sigma_rel:
        raise ValueError("sigma_rel is an empty sequence: give at least one width to reconstruct")
    return [check_sigma_rel(s, f"sigma_rel[{i}]") for i, s in enumerate(sigma_rel)], True


def reconstruct_listed(
    infos: Sequence[SnapshotInfo],
    sigma_rels: Sequence[float],
    iteration: int | None,
    *,
    model: nn.Module,
    device: torch.device | str | None,
) -> list[dict[str, Tensor]]:
    """One reconstruction per width in ``sigma_rels`` (checked already), from snapshots already listed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the nn.Module the snapshots were written for; found {type(model).__name__}")
    placed = check_device(device) or torch.device("cpu")
    module = unwrap_model(model)
    target = _target_iteration(infos, iteration)
    used = [i for i in infos if i.iteration <= target]
    _check_against_model(used, module)

    coefficients = synthesis_coefficients(
        [i.iteration for i in used], [i.gamma for i in used], target, [sigma_rel_to_gamma(s) for s in sigma_rels]
    )
    reference = min((i for i in used if i.iteration == target), key=lambda i: i.index)
    averaged = list(reference.averaged)
    student = named_tensors(module)
    dtypes = [torch.promote_types(student[n].dtype, torch.float32) for n in averaged]
    sums = [
        [torch.zeros(student[n].shape, dtype=d, device=placed) for n, d in zip(averaged, dtypes, strict=True)]
        for _ in sigma_rels
    ]
    copied: dict[str, Tensor] = {}
    for row, info in zip(coefficients, used, strict=True):  # one snapshot in memory at a time
        tensors = _load(info.path)["tensors"]
        values = [tensors[n].to(device=placed, dtype=d) for n, d in zip(averaged, dtypes, strict=True)]
        for out, weight in zip(sums, row.tolist(), strict=True):
            torch._foreach_add_(out, values, alpha=weight)
        if info is reference:
            copied = {n: t.to(placed, copy=True) for n, t in tensors.items() if n not in reference.averaged}
        del tensors, values
    results = []
    for out in sums:
        merged = dict(zip(averaged, out, strict=True))
        results.append({n: merged[n] if n in merged else copied[n] for n in student})
    return results


def _target_iteration(infos: Sequence[SnapshotInfo], iteration: int | None) -> int:
    times = sorted({i.iteration for i in infos})
    if not times:
        raise ValueError("there are no snapshots yet: the first is written snapshot_every iterations into training")
    if iteration is None:
        return times[-1]
    iteration = check_count("iteration", iteration, minimum=1)
    if iteration < times[0]:
        raise ValueError(
            f"iteration {iteration} is before the first snapshot (iteration {times[0]}): a reconstruction needs "
            "snapshots at or before its iteration"
        )
    if iteration > times[-1]:
        raise ValueError(
            f"iteration {iteration} is after the last snapshot (iteration {times[-1]}): the snapshots hold nothing "
            "of the weights after it"
        )
    if iteration not in times:
        at = bisect.bisect(times, iteration)
        raise ValueError(
            f"iteration {iteration} is not a snapshot iteration; the nearest are {times[at - 1]} and {times[at]}. "
            "A reconstruction is exact only where the snapshots end"
        )
    return iteration


def _check_against_model(infos: Sequence[SnapshotInfo], module: nn.Module) -> None:
    """Names and shapes of every snapshot against the model's; one buffer mode; averages that the model has."""
    shapes = {n: t.shape for n, t in named_tensors(module).items()}
    for info in infos:
        _check_same_names_and_shapes(
            shapes,
            info.shapes,
            f"the snapshot '{info.path.name}'",
            hint="were the snapshots written for another model? Pass the model they were written for",
            reference="the model",
        )
        if info.handle_buffers != infos[0].handle_buffers or info.averaged != infos[0].averaged:
            raise ValueError(
                f"the snapshots '{infos[0].path.name}' and '{info.path.name}' average different tensors "
                f"(handle_buffers {infos[0].handle_buffers!r} and {info.handle_buffers!r}): they come from two runs"
            )
        if not all(math.isfinite(v) for v in (info.gamma, info.sigma_rel)) or info.iteration < 1:
            raise ValueError(f"the snapshot '{info.path.name}' has no valid iteration, gamma or sigma_rel")


def load_reconstruction(model: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """Copy a reconstruction into ``model`` (unwrapped) by name, casting to its dtypes; returns ``model``.

    All or nothing: names and shapes are checked before anything is copied.

    Args:
        model: a module of the architecture the snapshots were written for.
        tensors: what :func:`reconstruct_from_snapshots` or :meth:`~ignite_ema.PostHocEMA.reconstruct` returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; found {type(model).__name__}")
    if not isinstance(tensors, Mapping) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise TypeError("tensors must map names to tensors, as a reconstruction returns")
    targets = named_tensors(unwrap_model(model))
    _check_same_names_and_shapes(
        {n: t.shape for n, t in targets.items()},
        {n: t.shape for n, t in tensors.items()},
        "the reconstruction",
        hint="load it into a model of the architecture the snapshots were written for",
        reference="the model",
    )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])
    return model
