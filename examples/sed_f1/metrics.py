"""Sound-event-detection scores as in DCASE and ``sed_eval`` 0.2.1: frame, segment, event and clip F1.

Four micro-averaged F1 scores, and one class-averaged, of binarised
predictions against binary frame targets, for clips of ``T`` frames of
``frame_seconds`` each and ``C`` classes:

``frame_f1``
    Over all (clip, frame, class) cells.
``segment_f1``
    ``sed_eval.sound_event.SegmentBasedMetrics(time_resolution=1.0)``: over
    all (clip, 1-s segment, class) cells, a class being active in a segment
    when any of its events overlaps it.
``event_f1``
    ``sed_eval.sound_event.EventBasedMetrics(t_collar=0.2,
    percentage_of_length=0.2)`` (onset and offset evaluated, its default
    ``'optimal'`` matching): over the events of all clips and classes.
``clip_f1``
    Audio tagging (``sed_eval.audio_tag.AudioTaggingMetrics``): over all
    (clip, class) pairs, a class being present in a clip's reference when any
    of its frames is active.
``event_f1_macro``
    The event-based F1 of each class, averaged over the classes with
    reference events (sed_eval's ``class_wise_average`` with
    ``empty_system_output_handling="zero_score"``, the DCASE baselines'
    "collar-based F1").

The intersection-based scores (PSDS, intersection F1) are in ``psds.py``.

Conventions, the same as sed_eval's so that the numbers can be compared with
published DCASE results (``tests/sed_eval_check`` checks them against
sed_eval itself on random activity):

- Binarisation is ``probability >= threshold`` (dcase_util's
  ``ProbabilityEncoder.binarization``, ``'global_threshold'``), 0.5 by default.
- Frame ``i`` covers ``[i * frame_seconds, (i + 1) * frame_seconds)``. A run of
  active frames ``a .. b - 1`` of one class is the event
  ``(a * frame_seconds, b * frame_seconds)``, so an event active until the
  last frame ends at ``T * frame_seconds``. Runs are taken as they are: no
  median filtering or gap filling (do that before, if the recipe wants it).
- Segments: an event covers segments ``floor(onset / s) .. ceil(offset / s) - 1``
  (sed_eval's ``event_list_to_event_roll``), and a clip has
  ``ceil(T * frame_seconds / s)`` segments, the last possibly partial.
- Events: an estimated event hits a reference event of the same clip and
  class when ``|onset difference| <= t_collar`` and ``|offset difference| <=
  max(t_collar, percentage_of_length * reference length)``. True positives
  are the size of a maximum matching of hits, one estimate per reference at
  most, so two estimates of one reference are one TP and one FP. sed_eval
  finds its maximum matching with Hopcroft-Karp (from mir_eval); every
  maximum matching has the same size, and we find one with augmenting paths.
  Its substitutions change the error rate, not F.
- Event times are ``frame_index * frame_seconds`` in float64 and the collar
  tests are the expressions sed_eval evaluates, so a difference that lies
  exactly on a collar in exact arithmetic (which floating point can put a hair
  either side) is decided as sed_eval decides it.
- F1 is ``2 TP / (N_sys + N_ref)``, which equals sed_eval's ``2 P R / (P + R)``
  whenever that is defined. With no estimated or no reference items sed_eval's
  precision or recall is 0/0 and its F is NaN (0 for an empty system output
  with ``empty_system_output_handling='zero_score'``); here F is then 0.0:
  all false positives or all misses score 0, and nothing at all to find and
  nothing found scores 0.0 rather than NaN, so that logs, early stopping and
  model selection never see a NaN.

The functions take numpy (or array-like) binary activity, ``[B, T, C]`` or one
clip's ``[T, C]`` (clip level: ``[B, C]`` or ``[C]``). Their ``*_counts`` forms
return the counts (TP, N_sys, N_ref) behind a micro F1, which add up over
batches. ``SEDScores`` is the Ignite metric: it binarises an evaluator's
probabilities, adds up the counts of the scores batch by batch (a fixed
number of integers, never the predictions) and returns the five F1s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

__all__ = [
    "SCORES",
    "Counts",
    "Runs",
    "SEDScores",
    "activity_to_events",
    "clip_counts",
    "clip_f1",
    "event_counts",
    "event_counts_per_class",
    "event_f1",
    "event_f1_macro",
    "frame_counts",
    "frame_f1",
    "macro_f1",
    "runs_of",
    "segment_counts",
    "segment_f1",
]

#: The scores SEDScores computes, in its order.
SCORES = ("frame_f1", "segment_f1", "event_f1", "clip_f1", "event_f1_macro")
THRESHOLD = 0.5
SEGMENT_SECONDS = 1.0
T_COLLAR = 0.2
PERCENTAGE_OF_LENGTH = 0.2

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]


class Counts(NamedTuple):
    """The counts behind a micro F1: true positives, estimated items, reference items.

    >>> Counts(tp=3, n_sys=4, n_ref=6).f1  # 2 * 3 / (4 + 6)
    0.6
    >>> Counts(tp=0, n_sys=0, n_ref=0).f1  # nothing to find, nothing found
    0.0
    """

    tp: int
    n_sys: int
    n_ref: int

    @property
    def fp(self) -> int:
        return self.n_sys - self.tp

    @property
    def fn(self) -> int:
        return self.n_ref - self.tp

    @property
    def f1(self) -> float:
        """``2 TP / (N_sys + N_ref)``; 0.0 when both are 0 (sed_eval would give NaN)."""
        total = self.n_sys + self.n_ref
        return 2.0 * self.tp / total if total else 0.0


# ----------------------------------------------------------------------------- input checks


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0; found {value!r}")
    return float(value)


def _fraction(name: str, value: float, must_be: str = "in [0, 1]") -> float:
    if isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be {must_be}; found {value!r}")
    return float(value)


def _binary(name: str, value: npt.ArrayLike, ranks: dict[int, str]) -> BoolArray:
    """``value`` as a bool array, after checking its rank (``ranks``: rank -> layout) and that it is 0/1."""
    array = np.asarray(value)
    if array.ndim not in ranks:
        layouts = " or ".join(ranks.values())
        raise ValueError(f"{name}: expected binary activity {layouts}; found an array of shape {tuple(array.shape)}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name}: expected a bool or numeric array of 0/1; found dtype {array.dtype}")
    not_binary = (array != 0) & (array != 1)
    if not_binary.any():
        example = array[not_binary].flat[0].item()
        raise ValueError(
            f"{name}: expected binary activity (bool, or 0/1); found the value {example!r}. "
            f"Binarise probabilities first, e.g. probs >= {THRESHOLD}"
        )
    return array.astype(np.bool_)


_FRAME_RANKS = {3: "[clips, frames, classes]", 2: "[frames, classes] (one clip)"}
_CLIP_RANKS = {2: "[clips, classes]", 1: "[classes] (one clip)"}


def _pair(pred: npt.ArrayLike, target: npt.ArrayLike, ranks: dict[int, str]) -> tuple[BoolArray, BoolArray]:
    """Checked bool ``pred`` and ``target`` of the same shape, with a leading clip axis added to one clip."""
    pred_b, target_b = _binary("pred", pred, ranks), _binary("target", target, ranks)
    if pred_b.shape != target_b.shape:
        raise ValueError(
            f"pred and target must have the same shape; found pred {tuple(pred_b.shape)}, "
            f"target {tuple(target_b.shape)}"
        )
    if pred_b.ndim == min(ranks):
        return pred_b[None], target_b[None]
    return pred_b, target_b


def _counts_of(pred: BoolArray, target: BoolArray) -> Counts:
    return Counts(int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred)), int(np.count_nonzero(target)))


# ----------------------------------------------------------------------------- events


class Runs(NamedTuple):
    """Runs of active frames of a ``[B, T, C]`` activity, sorted by (clip, class, start)."""

    clip: IntArray
    cls: IntArray
    start: IntArray  # first active frame
    stop: IntArray  # one past the last active frame


def runs_of(activity: BoolArray) -> Runs:
    """The runs of active frames of bool ``[B, T, C]`` activity: one event per run, per clip and class."""
    by_class = activity.transpose(0, 2, 1)  # [B, C, T]: runs are along the last axis
    padded = np.zeros((*by_class.shape[:2], by_class.shape[2] + 2), dtype=np.int8)
    padded[..., 1:-1] = by_class
    step = np.diff(padded, axis=-1)
    # np.nonzero walks in C order, so the k-th rise and the k-th fall belong to the same run
    clip, cls, start = np.nonzero(step == 1)
    stop = np.nonzero(step == -1)[2]
    return Runs(clip, cls, start, stop)


def activity_to_events(activity: npt.ArrayLike, frame_seconds: float) -> list[tuple[float, float, int]]:
    """One clip's binary activity ``[frames, classes]`` as events ``(onset, offset, class_index)`` in time order.

    >>> activity = np.zeros((8, 2), dtype=bool)
    >>> activity[2:5, 0] = activity[6:, 0] = activity[1:3, 1] = True
    >>> activity_to_events(activity, frame_seconds=0.5)
    [(0.5, 1.5, 1), (1.0, 2.5, 0), (3.0, 4.0, 0)]
    """
    seconds = _positive("frame_seconds", frame_seconds)
    clip = _binary("activity", activity, {2: "[frames, classes]"})
    runs = runs_of(clip[None])
    onsets, offsets = runs.start * seconds, runs.stop * seconds
    events = [(float(on), float(off), int(k)) for on, off, k in zip(onsets, offsets, runs.cls, strict=True)]
    return sorted(events)


def _max_matching(hits: BoolArray) -> int:
    """Size of a maximum matching in the bipartite graph ``hits[reference, estimate]`` (Kuhn's augmenting paths).

    Each reference gets one breadth-first search for a path that ends at a
    free estimate and alternates between unmatched and matched edges; flipping
    the path's edges grows the matching by one. A reference for which no path
    exists now never gets one later (the matching only grows), so one search
    per reference is enough.
    """
    neighbours = [np.flatnonzero(row).tolist() for row in hits]
    estimate_of: list[int] = [-1] * hits.shape[0]
    reference_of: list[int] = [-1] * hits.shape[1]
    size = 0
    for root in range(hits.shape[0]):
        reached_from: dict[int, int] = {}  # estimate -> the reference the search reached it from
        queue, free = [root], -1
        for reference in queue:  # the queue grows while it is walked: breadth-first
            for estimate in neighbours[reference]:
                if estimate in reached_from:
                    continue
                reached_from[estimate] = reference
                if reference_of[estimate] < 0:
                    free = estimate
                    break
                queue.append(reference_of[estimate])
            if free >= 0:
                break
        if free < 0:
            continue
        estimate = free
        while estimate >= 0:  # flip the path, from its free end back to the root
            reference = reached_from[estimate]
            previous = estimate_of[reference]
            estimate_of[reference], reference_of[estimate] = estimate, reference
            estimate = previous
        size += 1
    return size


def _event_tp(
    ref: Runs, est: Runs, n_classes: int, frame_seconds: float, t_collar: float, percentage_of_length: float
) -> IntArray:
    """True positives per class: the size of a maximum matching of hits, within each clip and class."""
    # one key per (clip, class), non-decreasing because runs are sorted by (clip, class, start)
    ref_key, est_key = ref.clip * n_classes + ref.cls, est.clip * n_classes + est.cls
    both = np.intersect1d(ref_key, est_key)  # only (clip, class) pairs with events on both sides can hit
    ref_lo, ref_hi = np.searchsorted(ref_key, both, "left"), np.searchsorted(ref_key, both, "right")
    est_lo, est_hi = np.searchsorted(est_key, both, "left"), np.searchsorted(est_key, both, "right")
    ref_on, ref_off = ref.start * frame_seconds, ref.stop * frame_seconds
    est_on, est_off = est.start * frame_seconds, est.stop * frame_seconds
    tp = np.zeros(n_classes, dtype=np.intp)
    for key, r0, r1, e0, e1 in zip(both, ref_lo, ref_hi, est_lo, est_hi, strict=True):
        on_r, off_r, on_e, off_e = ref_on[r0:r1, None], ref_off[r0:r1, None], est_on[None, e0:e1], est_off[None, e0:e1]
        # sed_eval's validate_onset / validate_offset, term for term
        onset_ok = np.abs(on_r - on_e) <= t_collar
        offset_ok = np.abs(off_r - off_e) <= np.maximum(t_collar, percentage_of_length * (off_r - on_r))
        tp[key % n_classes] += _max_matching(onset_ok & offset_ok)
    return tp


def _segment_roll(activity: BoolArray, frame_seconds: float, segment_seconds: float) -> BoolArray:
    """``[B, C, segments]`` activity, from the events of ``activity`` [B, T, C] as sed_eval builds its event roll."""
    clips, frames, classes = activity.shape
    n_segments = math.ceil(frames * frame_seconds / segment_seconds)
    runs = runs_of(activity)
    # the same float expressions as sed_eval (onset and offset times first, then floor/ceil in segments), so that
    # an offset a rounding error past a segment boundary opens that segment here as it does there
    first = np.floor(runs.start * frame_seconds / segment_seconds).astype(np.intp)
    end = np.ceil(runs.stop * frame_seconds / segment_seconds).astype(np.intp)  # <= n_segments: stop <= frames
    edges = np.zeros((clips, classes, n_segments + 1), dtype=np.int32)
    np.add.at(edges, (runs.clip, runs.cls, first), 1)
    np.add.at(edges, (runs.clip, runs.cls, end), -1)
    covered: BoolArray = np.cumsum(edges, axis=-1)[..., :-1] > 0
    return covered


def _segment_counts(pred: BoolArray, target: BoolArray, frame_seconds: float, segment_seconds: float) -> Counts:
    return _counts_of(
        _segment_roll(pred, frame_seconds, segment_seconds), _segment_roll(target, frame_seconds, segment_seconds)
    )


def _event_counts(
    pred: BoolArray, target: BoolArray, frame_seconds: float, t_collar: float, percentage_of_length: float
) -> IntArray:
    """``[classes, 3]``: each class's (TP, N_sys, N_ref) of events."""
    est, ref = runs_of(pred), runs_of(target)
    classes = pred.shape[2]
    tp = _event_tp(ref, est, classes, frame_seconds, t_collar, percentage_of_length)
    return np.stack([tp, np.bincount(est.cls, minlength=classes), np.bincount(ref.cls, minlength=classes)], axis=1)


def macro_f1(per_class: npt.ArrayLike) -> float:
    """The mean of the classes' F1 ``2 TP / (N_sys + N_ref)``, over the classes with reference items.

    ``per_class`` is ``[classes, 3]`` (TP, N_sys, N_ref). A class with
    references and no estimate scores 0; a class without references is left
    out (sed_eval's class-wise average with ``empty_system_output_handling=
    "zero_score"``, as the DCASE baselines call it); 0.0 if no class has any.

    >>> macro_f1([[1, 2, 2], [0, 0, 3], [0, 4, 0]])  # (2/4 + 0) / 2; the third class has no reference
    0.25
    """
    counts = np.asarray(per_class, dtype=np.float64).reshape(-1, 3)
    scored = counts[counts[:, 2] > 0]
    return float(np.mean(2 * scored[:, 0] / (scored[:, 1] + scored[:, 2]))) if len(scored) else 0.0


# ----------------------------------------------------------------------------- public functions


def frame_counts(pred: npt.ArrayLike, target: npt.ArrayLike) -> Counts:
    """Counts over all (clip, frame, class) cells of binary ``[B, T, C]`` (or ``[T, C]``) activity."""
    return _counts_of(*_pair(pred, target, _FRAME_RANKS))


def frame_f1(pred: npt.ArrayLike, target: npt.ArrayLike) -> float:
    """Frame-level micro F1 of binary ``[B, T, C]`` (or ``[T, C]``) activity.

    >>> pred = np.array([[1, 0], [1, 1], [0, 0]])
    >>> target = np.array([[1, 0], [0, 1], [0, 1]])
    >>> frame_f1(pred, target)  # TP 2, FP 1, FN 1: 2 * 2 / (3 + 3)
    0.6666666666666666
    """
    return frame_counts(pred, target).f1


def segment_counts(
    pred: npt.ArrayLike, target: npt.ArrayLike, frame_seconds: float, segment_seconds: float = SEGMENT_SECONDS
) -> Counts:
    """Counts over all (clip, segment, class) cells, segments of ``segment_seconds`` (sed_eval's segment-based)."""
    pred_b, target_b = _pair(pred, target, _FRAME_RANKS)
    return _segment_counts(
        pred_b, target_b, _positive("frame_seconds", frame_seconds), _positive("segment_seconds", segment_seconds)
    )


def segment_f1(
    pred: npt.ArrayLike, target: npt.ArrayLike, frame_seconds: float, segment_seconds: float = SEGMENT_SECONDS
) -> float:
    """Segment-based micro F1 (sed_eval ``SegmentBasedMetrics``) of binary ``[B, T, C]`` (or ``[T, C]``) activity.

    A class is active in a segment when any of its events overlaps the
    segment. Here 0.4-s frames and 1-s segments: the target's event 0.8-1.2 s
    touches segments 0 and 1, the prediction's 1.2-2.4 s segments 1 and 2:

    >>> target = np.array([[0], [0], [1], [0], [0], [0]])
    >>> pred = np.array([[0], [0], [0], [1], [1], [1]])
    >>> segment_f1(pred, target, frame_seconds=0.4)  # TP 1 (segment 1), FP 1, FN 1
    0.5
    """
    return segment_counts(pred, target, frame_seconds, segment_seconds).f1


def event_counts(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    frame_seconds: float,
    t_collar: float = T_COLLAR,
    percentage_of_length: float = PERCENTAGE_OF_LENGTH,
) -> Counts:
    """Counts of matched, estimated and reference events (sed_eval's event-based, onset and offset)."""
    per_class = event_counts_per_class(pred, target, frame_seconds, t_collar, percentage_of_length)
    return Counts(*(int(v) for v in per_class.sum(axis=0)))


def event_counts_per_class(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    frame_seconds: float,
    t_collar: float = T_COLLAR,
    percentage_of_length: float = PERCENTAGE_OF_LENGTH,
) -> IntArray:
    """``[classes, 3]``: each class's (TP, N_sys, N_ref) of events, as :func:`event_counts` counts them overall."""
    pred_b, target_b = _pair(pred, target, _FRAME_RANKS)
    seconds = _positive("frame_seconds", frame_seconds)
    collar = _positive("t_collar", t_collar)
    return _event_counts(pred_b, target_b, seconds, collar, _fraction("percentage_of_length", percentage_of_length))


def event_f1(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    frame_seconds: float,
    t_collar: float = T_COLLAR,
    percentage_of_length: float = PERCENTAGE_OF_LENGTH,
) -> float:
    """Event-based micro F1 (sed_eval ``EventBasedMetrics``) of binary ``[B, T, C]`` (or ``[T, C]``) activity.

    With 0.1-s frames, a reference event 1.0-2.0 s and an estimate 1.1-2.0 s
    (onset 100 ms late, within the 200-ms collar) match; an estimate 1.3-2.0 s
    would not:

    >>> target, pred = np.zeros((30, 1)), np.zeros((30, 1))
    >>> target[10:20] = 1
    >>> pred[11:20] = 1
    >>> event_f1(pred, target, frame_seconds=0.1)
    1.0
    >>> pred[:] = 0
    >>> pred[13:20] = 1
    >>> event_f1(pred, target, frame_seconds=0.1)
    0.0
    """
    return event_counts(pred, target, frame_seconds, t_collar, percentage_of_length).f1


def event_f1_macro(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    frame_seconds: float,
    t_collar: float = T_COLLAR,
    percentage_of_length: float = PERCENTAGE_OF_LENGTH,
) -> float:
    """Class-averaged event-based F1 (sed_eval's ``class_wise_average``, the DCASE baselines' "event_f1_macro").

    Each class's F1 from its own event counts, then :func:`macro_f1`: here
    class 0 finds its event (F1 1) and class 1 misses its one (F1 0); the
    micro F1 would be 2 * 1 / (1 + 2):

    >>> target, pred = np.zeros((30, 2)), np.zeros((30, 2))
    >>> target[10:20, 0] = pred[10:20, 0] = target[5:8, 1] = 1
    >>> event_f1_macro(pred, target, frame_seconds=0.1), round(event_f1(pred, target, frame_seconds=0.1), 4)
    (0.5, 0.6667)
    """
    return macro_f1(event_counts_per_class(pred, target, frame_seconds, t_collar, percentage_of_length))


def clip_counts(pred: npt.ArrayLike, target: npt.ArrayLike) -> Counts:
    """Counts over all (clip, class) pairs of binary ``[B, C]`` (or ``[C]``) tags."""
    return _counts_of(*_pair(pred, target, _CLIP_RANKS))


def clip_f1(pred: npt.ArrayLike, target: npt.ArrayLike) -> float:
    """Clip-level (tagging) micro F1 of binary ``[B, C]`` (or ``[C]``) tags.

    The reference tags of frame targets ``[B, T, C]`` are ``target.any(axis=1)``.

    >>> clip_f1(np.array([[1, 1, 0], [0, 0, 1]]), np.array([[1, 0, 0], [0, 0, 1]]))  # TP 2, FP 1, FN 0
    0.8
    """
    return clip_counts(pred, target).f1


# ----------------------------------------------------------------------------- Ignite metric


class SEDScores(Metric):
    """Frame, segment, event and clip micro F1 of an evaluator's ``(frame_probs, clip_probs, frame_targets)``.

    The output (after ``output_transform``) is a tuple, or a dict with these
    keys, of torch tensors: ``frame_probs`` ``[B, T, C]`` and ``clip_probs``
    ``[B, C]`` (probabilities in [0, 1], not logits), ``frame_targets``
    ``[B, T, C]`` (0/1). Probabilities are binarised with ``>= threshold``;
    a clip's reference tags are the classes active in any of its frames. Each
    batch adds its counts (TP, N_sys, N_ref per score, and per class for the
    events); ``compute`` returns ``{"frame_f1", "segment_f1", "event_f1",
    "clip_f1", "event_f1_macro"}`` over all clips seen
    since the last reset, with the conventions of the module docstring (F1 is
    0.0 when a score has no estimated and no reference items). The counts are
    summed over processes by Ignite's ``sync_all_reduce`` in a distributed run.

    Args:
        frame_seconds: duration of one frame of ``frame_probs`` (this example: 0.15625).
        threshold: binarisation threshold for frame and clip probabilities.
        segment_seconds: segment length of the segment-based score.
        t_collar: onset collar, and smallest offset collar, of the event-based score, in seconds.
        percentage_of_length: offset collar as a fraction of the reference event's length, when larger.
        output_transform: maps the engine's output to the triple (Ignite's usual argument).
        device: where the counts are kept.

    Example: one clip of four 0.5-s frames and two classes, on a real evaluator.

    >>> from ignite.engine import Engine
    >>> frame_probs = torch.tensor([[[0.9, 0.2], [0.8, 0.1], [0.3, 0.6], [0.1, 0.7]]])
    >>> clip_probs = torch.tensor([[0.9, 0.4]])
    >>> frame_targets = torch.tensor([[[1, 0], [1, 0], [0, 0], [0, 1]]])
    >>> evaluator = Engine(lambda engine, batch: batch)
    >>> SEDScores(frame_seconds=0.5).attach(evaluator, "sed")
    >>> state = evaluator.run([(frame_probs, clip_probs, frame_targets)])
    >>> {name: round(value, 4) for name, value in state.metrics["sed"].items()}
    {'frame_f1': 0.8571, 'segment_f1': 1.0, 'event_f1': 0.5, 'clip_f1': 0.6667, 'event_f1_macro': 0.5}

    Frames: 3 of 4 estimated cells are right, 3 reference cells: 6 / 7. Both
    classes are right in their 1-s segment. Events: class 0 (0-1 s) matches;
    class 1 is estimated at 1.0 s but starts at 1.5 s, outside the 200-ms
    collar: 2 * 1 / (2 + 2), and per class (1 + 0) / 2. Tags: class 1 is
    missed: 2 * 1 / (1 + 2).
    """

    required_output_keys = ("frame_probs", "clip_probs", "frame_targets")
    _state_dict_all_req_keys = ("_counts", "_class_counts", "_num_clips")

    def __init__(
        self,
        frame_seconds: float,
        *,
        threshold: float = THRESHOLD,
        segment_seconds: float = SEGMENT_SECONDS,
        t_collar: float = T_COLLAR,
        percentage_of_length: float = PERCENTAGE_OF_LENGTH,
        output_transform: Callable[[Any], Any] = lambda output: output,
        device: str | torch.device = "cpu",
    ) -> None:
        self.frame_seconds = _positive("frame_seconds", frame_seconds)
        self.segment_seconds = _positive("segment_seconds", segment_seconds)
        self.t_collar = _positive("t_collar", t_collar)
        self.threshold = _fraction("threshold", threshold, "a probability in [0, 1]")
        self.percentage_of_length = _fraction("percentage_of_length", percentage_of_length)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        # rows: frame, segment, event, clip; columns: Counts' tp, n_sys, n_ref
        self._counts = torch.zeros(4, 3, dtype=torch.int64, device=self._device)
        # the event counts per class, [classes, 3], sized by the first batch (every process must see one)
        self._class_counts = torch.zeros(0, 3, dtype=torch.int64, device=self._device)
        self._num_clips = torch.zeros((), dtype=torch.int64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        frame_probs, clip_probs, frame_targets = self._check(output)
        pred = (frame_probs >= self.threshold).cpu().numpy()
        target = frame_targets.bool().cpu().numpy()
        tags = (clip_probs >= self.threshold).cpu().numpy()
        per_class = _event_counts(pred, target, self.frame_seconds, self.t_collar, self.percentage_of_length)
        counts = [
            _counts_of(pred, target),
            _segment_counts(pred, target, self.frame_seconds, self.segment_seconds),
            tuple(per_class.sum(axis=0)),
            _counts_of(tags, np.asarray(target.any(axis=1), dtype=np.bool_)),
        ]
        self._counts += torch.tensor(counts, dtype=torch.int64, device=self._device)
        if not len(self._class_counts):
            self._class_counts = torch.zeros(len(per_class), 3, dtype=torch.int64, device=self._device)
        self._class_counts += torch.from_numpy(per_class).to(self._class_counts)
        self._num_clips += frame_probs.shape[0]

    @sync_all_reduce("_counts", "_class_counts", "_num_clips")
    def compute(self) -> dict[str, float]:
        if int(self._num_clips) == 0:
            raise NotComputableError("SEDScores must have at least one clip before it can be computed")
        rows = self._counts.tolist()
        scores = {name: Counts(*row).f1 for name, row in zip(SCORES[:4], rows, strict=True)}  # the micro ones
        return scores | {"event_f1_macro": macro_f1(self._class_counts.cpu().numpy())}

    @staticmethod
    def _check(output: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The triple, after checking types, ranks, shapes and value ranges; errors say what was expected."""
        expected = "(frame_probs [B, T, C], clip_probs [B, C], frame_targets [B, T, C])"
        if not isinstance(output, Sequence) or len(output) != 3:
            found = f"{len(output)} items" if isinstance(output, Sequence) else type(output).__name__
            raise ValueError(f"SEDScores expected the output {expected}; found {found}")
        frame_probs, clip_probs, frame_targets = output
        for name, value, rank in zip(("frame_probs", "clip_probs", "frame_targets"), output, (3, 2, 3), strict=True):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"SEDScores: {name} must be a torch.Tensor; found {type(value).__name__}")
            if value.ndim != rank:
                raise ValueError(
                    f"SEDScores expected {expected}; found {name} of shape {tuple(value.shape)} ({value.ndim} dims)"
                )
        if frame_targets.shape != frame_probs.shape:
            raise ValueError(
                f"SEDScores: frame_targets must have the shape of frame_probs {tuple(frame_probs.shape)}; "
                f"found {tuple(frame_targets.shape)}"
            )
        batch, _, classes = frame_probs.shape
        if clip_probs.shape != (batch, classes):
            raise ValueError(
                f"SEDScores: clip_probs must be [B, C] = {(batch, classes)} to match frame_probs "
                f"{tuple(frame_probs.shape)}; found {tuple(clip_probs.shape)}"
            )
        for name, probs in (("frame_probs", frame_probs), ("clip_probs", clip_probs)):
            if probs.numel() and (probs.isnan().any() or probs.min() < 0 or probs.max() > 1):
                raise ValueError(
                    f"SEDScores: {name} must be probabilities in [0, 1] (apply a sigmoid to logits); found values "
                    f"from {probs.min().item():g} to {probs.max().item():g}"
                    + (" and NaN" if probs.isnan().any() else "")
                )
        if not ((frame_targets == 0) | (frame_targets == 1)).all():
            raise ValueError("SEDScores: frame_targets must be 0/1 (or bool); found other values")
        return frame_probs, clip_probs, frame_targets
