"""The power EMA of any width, reconstructed from PostHocEMA's snapshots; and loading it into a model.

The reconstruction needs only the snapshot directory and a model of the
architecture the snapshots were written for (its weights are not used), so it
runs after training, in a fresh process: ``load_reconstruction(model,
reconstruct_from_snapshots(snapshot_dir, 0.15, model=model))``. The
coefficients come from :func:`~ignite_ema.posthoc.power.synthesis_coefficients`;
the files are read one at a time (memory-mapped), each added with its
coefficient into one flat sum per target a chunk at a time, so memory stays at
one snapshot file's pages plus the results.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import overload

import numpy as np
import torch
from torch import Tensor, nn

from ignite_ema._checks import check_count, check_device, check_same_shapes
from ignite_ema.modules import named_tensors, unwrap_model
from ignite_ema.posthoc.power import check_sigma_rel, sigma_rel_to_gamma, synthesis_coefficients
from ignite_ema.posthoc.snapshots import (
    AVERAGED,
    OnError,
    Slot,
    SnapshotInfo,
    layout_of,
    list_snapshots,
    load_snapshot_data,
)

__all__ = ["load_reconstruction", "reconstruct_from_snapshots"]

_CHUNK = 1 << 20  # elements converted at a time: the float32 copy of a snapshot never exists whole


@overload
def reconstruct_from_snapshots(
    snapshot_dir: str | PathLike[str],
    sigma_rel: float,
    iteration: int | None = None,
    *,
    model: nn.Module,
    device: torch.device | str | None = None,
    on_error: OnError = "warn",
) -> dict[str, Tensor]: ...


@overload
def reconstruct_from_snapshots(
    snapshot_dir: str | PathLike[str],
    sigma_rel: Sequence[float],
    iteration: int | None = None,
    *,
    model: nn.Module,
    device: torch.device | str | None = None,
    on_error: OnError = "warn",
) -> list[dict[str, Tensor]]: ...


def reconstruct_from_snapshots(
    snapshot_dir: str | PathLike[str],
    sigma_rel: float | Sequence[float],
    iteration: int | None = None,
    *,
    model: nn.Module,
    device: torch.device | str | None = None,
    on_error: OnError = "warn",
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """The EMA of width ``sigma_rel`` at ``iteration``, from the snapshots in ``snapshot_dir`` alone.

    Returns the EMA's tensors by name (those of ``named_tensors(model)``, which
    are ``model.state_dict()``'s when the model has no tied weights or
    non-persistent buffers); load them with :func:`load_reconstruction`.
    Averages come in float32 (float64 from float64 snapshots), copied tensors
    as they were saved.

    Args:
        snapshot_dir: the directory the training run's :class:`~ignite_ema.PostHocEMA` wrote.
        sigma_rel: a width in (0, 0.2887], or a sequence of them: all are
            reconstructed in one pass over the files, and a list is returned.
        iteration: a snapshot iteration (the last one by default); only
            snapshots at or before it are used.
        model: the model the snapshots were written for (names and shapes are
            checked); its values are not used.
        device: where to accumulate and return the tensors (CPU by default).
        on_error: what to do about a snapshot file that does not read
            (truncated, say): ``"warn"`` leaves it out, with one warning
            naming every such file, and reconstructs from the others;
            ``"raise"`` raises its ``ValueError``.
    """
    infos = list_snapshots(snapshot_dir, on_error=on_error)
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
    target = _target_iteration(infos, iteration)
    used = [i for i in infos if i.iteration <= target]
    _check_against_model(used, unwrap_model(model))
    coefficients = synthesis_coefficients(
        [i.iteration for i in used], [i.gamma for i in used], target, [sigma_rel_to_gamma(s) for s in sigma_rels]
    )

    # The accumulators follow the layout of the snapshot at the target iteration: one flat sum per buffer.
    reference = min((i for i in used if i.iteration == target), key=lambda i: i.index)
    ref = load_snapshot_data(reference.path)
    ref_layout = layout_of(ref)
    copied = {b: t.to(placed, copy=True) for b, t in ref["buffers"].items() if not b.startswith(AVERAGED)}
    sums: list[dict[str, Tensor]] = [
        {
            b: torch.zeros(t.numel(), dtype=torch.promote_types(t.dtype, torch.float32), device=placed)
            for b, t in ref["buffers"].items()
            if b.startswith(AVERAGED)
        }
        for _ in sigma_rels
    ]
    del ref  # its pages: read again in turn
    members = {b: [n for n, s in ref_layout.items() if s.buffer == b] for b in sums[0]}
    for row, info in zip(coefficients, used, strict=True):  # one snapshot in memory at a time
        data = load_snapshot_data(info.path)
        layout = layout_of(data)
        for buffer, names in members.items():
            _add(sums, row.tolist(), buffer, names, ref_layout, layout, data["buffers"])
        del data
    results = []
    for out in sums:
        merged = {**out, **{b: t.clone() for b, t in copied.items()}}
        results.append({name: slot.view(merged) for name, slot in ref_layout.items()})
    return results


def _add(
    sums: Sequence[dict[str, Tensor]],
    weights: Sequence[float],
    buffer: str,
    names: Sequence[str],
    ref_layout: Mapping[str, Slot],
    layout: Mapping[str, Slot],
    buffers: Mapping[str, Tensor],
) -> None:
    """``sums[j][buffer] += weights[j] * (the tensors ``names`` of this snapshot)``, for every target ``j``."""
    first = layout[names[0]]
    aligned = all(
        layout[n].buffer == first.buffer and layout[n].offset - first.offset == ref_layout[n].offset for n in names
    )
    like = sums[0][buffer]
    if aligned:  # the same tensors in the same order: converted and added a chunk at a time
        source = buffers[first.buffer][first.offset : first.offset + like.numel()]
        for start in range(0, like.numel(), _CHUNK):
            values = _moved_then_converted(source[start : start + _CHUNK], like)
            for out, weight in zip(sums, weights, strict=True):
                out[buffer][start : start + _CHUNK].add_(values, alpha=weight)
        return
    for name in names:  # packed otherwise (another snapshot dtype for some tensors): tensor by tensor
        value = _moved_then_converted(layout[name].view(buffers), like)
        for out, weight in zip(sums, weights, strict=True):
            ref_layout[name].view(out).add_(value, alpha=weight)


def _moved_then_converted(values: Tensor, like: Tensor) -> Tensor:
    """``values`` on ``like``'s device in ``like``'s dtype: moved in the stored dtype (float16: half the bytes of
    float32 over the bus), then converted there. One ``.to(device, dtype)`` would convert on the host first."""
    return values.to(like.device).to(like.dtype)


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
    """Names and shapes of every snapshot against the model's; the same tensors averaged in all."""
    shapes = {n: t.shape for n, t in named_tensors(module).items()}
    for info in infos:
        check_same_shapes(
            shapes,
            info.shapes,  # type: ignore[arg-type]  # tuples, which compare equal to torch.Size
            f"the snapshot '{info.path.name}'",
            hint="were the snapshots written for another model? Pass the model they were written for",
            reference="the model",
        )
        if info.averaged != infos[0].averaged:
            raise ValueError(
                f"the snapshots '{infos[0].path.name}' and '{info.path.name}' average different tensors "
                f"(handle_buffers {infos[0].handle_buffers!r} and {info.handle_buffers!r}): they come from two runs"
            )
        if not all(math.isfinite(v) for v in (info.gamma, info.sigma_rel)) or info.iteration < 1:
            raise ValueError(f"the snapshot '{info.path.name}' has no valid iteration, gamma or sigma_rel")


def load_reconstruction(model: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """Copy a reconstruction into ``model`` (unwrapped) by name, casting to its dtypes; returns ``model``.

    All or nothing: names, shapes and dtypes (castable without a change of
    kind) are checked before anything is copied.

    Args:
        model: a module of the architecture the snapshots were written for.
        tensors: what :func:`reconstruct_from_snapshots` or :meth:`~ignite_ema.PostHocEMA.reconstruct` returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; found {type(model).__name__}")
    if not isinstance(tensors, Mapping) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise TypeError("tensors must map names to tensors, as a reconstruction returns")
    targets = named_tensors(unwrap_model(model))
    hint = "load it into a model of the architecture the snapshots were written for"
    check_same_shapes(
        {n: t.shape for n, t in targets.items()},
        {n: t.shape for n, t in tensors.items()},
        "the reconstruction",
        hint=hint,
        reference="the model",
    )
    for name, target in targets.items():  # what copy_ would fail on, or do lossily, half-way through the model
        value = tensors[name]
        if value.layout != torch.strided or value.is_meta:
            kind = "a meta tensor" if value.is_meta else f"a {value.layout} tensor"
            raise ValueError(f"tensor '{name}' of the reconstruction is {kind}, with no dense values to load")
        if not torch.can_cast(value.dtype, target.dtype):
            raise ValueError(
                f"tensor '{name}' is {value.dtype} in the reconstruction, {target.dtype} in the model, and cannot be "
                f"cast without losing its kind (a complex into a real, a float into an integer): {hint}"
            )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])
    return model
