"""Intersection-based SED scores: PSDS (Bilen et al., 2020) over a sweep of thresholds, and intersection F1.

Definitions, as ``psds_eval`` 0.5.3 implements them (``tests/psds_eval_check``
checks these functions against it), for binarised detections and strong
reference events of ``C`` classes:

- A detection of class ``c`` passes the **detection tolerance criterion**
  (DTC) when the references of class ``c`` cover at least ``dtc`` of its
  duration. A detection that fails it is a false positive (FP).
- A reference event is **detected** (a TP) when the detections of its class
  that pass the DTC cover at least ``gtc`` of its duration (the **ground-truth
  intersection criterion**, GTC).
- An FP of class ``c`` is also a **cross-trigger** (CT) on class ``c'`` when
  the references of class ``c'`` cover at least ``cttc`` of its duration.
- Per class and operating point: TPR = TPs / references; FPR = FPs per hour
  of evaluated audio; CTR on ``c'`` = CTs per hour of ``c'`` references; the
  effective FPR is ``FPR + alpha_ct * mean over c' != c of CTR``.
- Each class's ROC is a staircase: at an eFPR ``x``, the highest TPR of the
  operating points (and of the origin) with eFPR <= ``x``. The PSD-ROC is the
  mean of the classes' ROCs minus ``alpha_st`` times their standard deviation
  (over classes, ``ddof=0``), floored at 0; PSDS is its area from 0 to
  ``max_efpr`` (100 per hour), divided by ``max_efpr``.

The operating points are the binarisations ``probability >= t`` of the
(median-filtered) frame probabilities at ``THRESHOLDS``, the 50 thresholds
0.01, 0.03, ..., 0.99 of the DCASE 2021-2022 baselines (psds_eval takes the
thresholds given to it; sed_scores_eval, the DCASE 2023+ tool, sweeps every
distinct score, which the DCASE 2023 baseline notes scores about 1 % higher).
Events are runs of active frames, as in ``metrics.py``; a clip lasts its
frames times ``frame_seconds``.

Where psds_eval is undefined or odd, here: a class without reference events
is left out of the PSD-ROC and of the means (psds_eval reads uninitialised
memory for its TPR); in the intersection F1, a class with references but no
TP scores 0 (psds_eval computes its reference count as ``TP / TPR = 0 / 0``
and drops the class from the average).

``PSDSScores`` is the Ignite metric: each batch adds its counts (TPs, FPs and
CTs per threshold and class), which add up over clips and processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from examples.sed_f1.metrics import macro_f1, runs_of

__all__ = [
    "INTERSECTION_F1",
    "PSDS1",
    "PSDS2",
    "THRESHOLDS",
    "Criteria",
    "PSDSScores",
    "intersection_counts",
    "intersection_f1",
    "psd_roc",
    "psds",
]

SECONDS_PER_HOUR = 3600.0
MAX_EFPR = 100.0  # per hour, as in DCASE
THRESHOLDS = np.arange(1 / 100, 1, 1 / 50)  # 0.01, 0.03, ..., 0.99: DESED_task's n_test_thresholds = 50

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Criteria(NamedTuple):
    """The intersection criteria and PSDS weights of one DCASE scenario."""

    dtc: float
    gtc: float
    cttc: float = 0.3
    alpha_ct: float = 0.0
    alpha_st: float = 1.0
    max_efpr: float = MAX_EFPR


PSDS1 = Criteria(dtc=0.7, gtc=0.7, alpha_ct=0.0, alpha_st=1.0)  # DCASE Task 4 scenario 1: where exactly
PSDS2 = Criteria(dtc=0.1, gtc=0.1, cttc=0.3, alpha_ct=0.5, alpha_st=1.0)  # scenario 2: which class, avoiding confusion
INTERSECTION_F1 = Criteria(dtc=0.5, gtc=0.5)  # the DCASE baselines' intersection-based F1, at threshold 0.5


def _cumulative(activity: npt.NDArray[Any], axis: int) -> IntArray:
    """Cumulative sum along ``axis`` with a leading 0, so that ``c[b] - c[a]`` counts frames ``a .. b - 1``."""
    padding = [(0, 0)] * activity.ndim
    padding[axis] = (1, 0)
    return np.pad(np.cumsum(activity, axis=axis, dtype=np.int64), padding)


def intersection_counts(
    scores: npt.ArrayLike, target: npt.ArrayLike, thresholds: Sequence[float], criteria: Sequence[Criteria]
) -> list[IntArray]:
    """The counts behind PSDS for each of ``criteria``, at each threshold: ``[thresholds, classes, 2 + classes]``.

    Args:
        scores: frame scores ``[clips, frames, classes]`` (probabilities, median-filtered if the recipe wants).
        target: binary strong labels of the same shape.
        thresholds: the operating points: a frame is active when its score is ``>= threshold``.
        criteria: the DTC, GTC and CTTC to count with (the PSDS weights are not used here).

    Column 0 is the detected references (TPs), column 1 the FPs, column
    ``2 + c'`` the cross-triggers on class ``c'`` (0 on the diagonal).
    Counts from different clips add up.
    """
    probs = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(target).astype(bool)
    if probs.ndim != 3 or probs.shape != truth.shape:
        raise ValueError(
            f"scores and target must be [clips, frames, classes] of the same shape; found {probs.shape}, {truth.shape}"
        )
    levels = np.asarray(thresholds, dtype=np.float64)
    clips, frames, classes = probs.shape
    k = len(levels)
    # every operating point at once: "clip" n of the stack is threshold n // clips, clip n % clips
    detections = runs_of((probs[None] >= levels[:, None, None, None]).reshape(k * clips, frames, classes))
    level_of, clip_of = detections.clip // clips, detections.clip % clips
    length = detections.stop - detections.start
    reference_frames = _cumulative(truth, axis=1)  # [clips, frames + 1, classes]
    overlap = reference_frames[clip_of, detections.stop] - reference_frames[clip_of, detections.start]  # [dets, C]
    own = overlap[np.arange(len(length)), detections.cls]
    references = runs_of(truth)
    stacked_clip = np.arange(k)[:, None] * clips + references.clip[None]  # [K, refs]: each reference at each level

    results = []
    for criterion in criteria:
        passes = own / length >= criterion.dtc
        # frames covered by the passing detections, per stacked clip and class
        covered = np.zeros((k * clips, classes, frames + 1), dtype=np.int32)
        np.add.at(covered, (detections.clip[passes], detections.cls[passes], detections.start[passes]), 1)
        np.add.at(covered, (detections.clip[passes], detections.cls[passes], detections.stop[passes]), -1)
        covered_frames = _cumulative(np.cumsum(covered, axis=-1)[..., :-1] > 0, axis=2)  # [K * clips, C, frames + 1]
        cover = (
            covered_frames[stacked_clip, references.cls, references.stop]
            - covered_frames[stacked_clip, references.cls, references.start]
        )
        detected = cover / (references.stop - references.start) >= criterion.gtc  # [K, refs]

        counts = np.zeros((k, classes, 2 + classes), dtype=np.int64)
        np.add.at(counts[..., 0], (np.nonzero(detected)[0], references.cls[np.nonzero(detected)[1]]), 1)
        fails = ~passes
        np.add.at(counts[..., 1], (level_of[fails], detections.cls[fails]), 1)
        crosses = fails[:, None] & (overlap / length[:, None] >= criterion.cttc)
        crosses[np.arange(len(length)), detections.cls] = False
        np.add.at(counts[..., 2:], (level_of, detections.cls), crosses.astype(np.int64))
        results.append(counts)
    return results


def _reference_totals(target: npt.NDArray[Any]) -> tuple[IntArray, IntArray]:
    """Reference events and reference frames per class of binary ``[clips, frames, classes]`` labels."""
    references = runs_of(np.asarray(target).astype(bool))
    classes = target.shape[2]
    return np.bincount(references.cls, minlength=classes), np.asarray(target, dtype=bool).sum(axis=(0, 1))


def _rates(
    counts: IntArray, n_references: IntArray, reference_seconds: FloatArray, total_seconds: float, alpha_ct: float
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """TPR and eFPR ``[thresholds, classes]``, and which classes have references."""
    scored = n_references > 0
    tpr = np.asarray(counts[..., 0] / np.maximum(n_references, 1), dtype=np.float64)
    fpr = np.asarray(counts[..., 1] * SECONDS_PER_HOUR / total_seconds, dtype=np.float64)
    others = scored[None, :] & ~np.eye(len(scored), dtype=bool)  # [c, c']: the classes c' whose CTR c averages
    if alpha_ct:
        ctr = counts[..., 2:] * SECONDS_PER_HOUR / np.where(scored, reference_seconds, 1.0)  # [K, c, c']
        n_others = np.maximum(others.sum(axis=1), 1)
        fpr = np.asarray(fpr + alpha_ct * (ctr * others).sum(axis=2) / n_others, dtype=np.float64)
    return tpr, fpr, scored


def psd_roc(
    counts: IntArray,
    n_references: IntArray,
    reference_seconds: FloatArray,
    total_seconds: float,
    criteria: Criteria,
) -> tuple[FloatArray, FloatArray]:
    """The PSD-ROC as a staircase: eFPR points ``x`` (sorted, from 0) and the eTPR from each ``x`` to the next.

    Args:
        counts: :func:`intersection_counts` ``[thresholds, classes, 2 + classes]``, over the whole evaluation set.
        n_references: reference events per class.
        reference_seconds: reference duration per class, in seconds.
        total_seconds: duration of the evaluation set.
        criteria: ``alpha_ct`` and ``alpha_st`` are used here.
    """
    tpr, efpr, scored = _rates(counts, n_references, reference_seconds, total_seconds, criteria.alpha_ct)
    tpr, efpr = tpr[:, scored], efpr[:, scored]
    if not scored.any():
        return np.zeros(1), np.zeros(1)
    # the origin is an operating point of every class (psds_eval pads each ROC with it)
    tpr = np.vstack([np.zeros((1, tpr.shape[1])), tpr])
    efpr = np.vstack([np.zeros((1, efpr.shape[1])), efpr])
    x = np.unique(efpr)
    per_class = np.empty((len(x), tpr.shape[1]))
    for c in range(tpr.shape[1]):
        order = np.argsort(efpr[:, c], kind="stable")
        best = np.maximum.accumulate(tpr[order, c])  # the highest TPR at or below each point's eFPR
        per_class[:, c] = best[np.searchsorted(efpr[order, c], x, side="right") - 1]
    etpr = np.maximum(per_class.mean(axis=1) - criteria.alpha_st * per_class.std(axis=1), 0.0)
    return x, etpr


def psds(
    counts: IntArray,
    n_references: IntArray,
    reference_seconds: FloatArray,
    total_seconds: float,
    criteria: Criteria,
) -> float:
    """The area under :func:`psd_roc` from eFPR 0 to ``criteria.max_efpr``, divided by ``max_efpr``."""
    x, etpr = psd_roc(counts, n_references, reference_seconds, total_seconds, criteria)
    right = np.minimum(np.append(x[1:], criteria.max_efpr), criteria.max_efpr)
    width = np.maximum(right - x, 0.0)
    return float(np.sum(width * etpr) / criteria.max_efpr)


def intersection_f1(counts: IntArray, n_references: IntArray) -> float:
    """Macro F1 ``2 TP / (2 TP + FP + FN)`` of one operating point's counts ``[classes, 2 + classes]``.

    TP are the detected references, FP the detections failing the DTC (so a
    cross-trigger is an FP too), FN the references not detected; averaged
    over the classes with references (0.0 if none).
    """
    tp = counts[:, 0]
    # 2 TP + FP + FN = (TP + FP) + N_ref: the detections and references of metrics.macro_f1
    return macro_f1(np.column_stack([tp, tp + counts[:, 1], n_references]))


class PSDSScores(Metric):
    """PSDS1, PSDS2 and the intersection F1 of an evaluator's ``(frame_probs, clip_probs, frame_targets)``.

    ``frame_probs`` ``[B, T, C]`` are scores in [0, 1] (median-filter them
    before, in the evaluator's ``output_transform``, if the recipe wants);
    ``frame_targets`` are the 0/1 strong labels; ``clip_probs`` is not used
    (it is there so that the output can be the one :class:`SEDScores` takes).
    ``compute`` returns ``{"psds1", "psds2", "intersection_f1"}``; PSDS over
    ``thresholds``, the F1 at ``threshold``.

    Args:
        frame_seconds: duration of one frame, for the FP and CT rates per hour.
        thresholds: the operating points of the PSD-ROC.
        threshold: the operating point of the intersection F1.
        output_transform: maps the engine's output to the triple (Ignite's usual argument).
        device: where the counts are kept.
    """

    required_output_keys = ("frame_probs", "clip_probs", "frame_targets")
    _state_dict_all_req_keys = ("_psds1", "_psds2", "_f1", "_references", "_reference_frames", "_frames")

    def __init__(
        self,
        frame_seconds: float,
        *,
        thresholds: Sequence[float] = tuple(THRESHOLDS),
        threshold: float = 0.5,
        output_transform: Callable[[Any], Any] = lambda output: output,
        device: str | torch.device = "cpu",
    ) -> None:
        if not frame_seconds > 0:
            raise ValueError(f"frame_seconds must be > 0; found {frame_seconds!r}")
        if not len(thresholds) or not all(0.0 <= t <= 1.0 for t in (*thresholds, threshold)):
            raise ValueError(f"thresholds must be probabilities in [0, 1]; found {list(thresholds)} and {threshold}")
        self.frame_seconds = float(frame_seconds)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.threshold = float(threshold)
        super().__init__(output_transform=output_transform, device=device)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int64, device=self._device)

    @reinit__is_reduced
    def reset(self) -> None:
        # sized by the first batch (its number of classes): every process must see one
        self._psds1 = self._psds2 = self._f1 = self._zeros(0)
        self._references = self._reference_frames = self._zeros(0)
        self._frames = self._zeros()

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        frame_probs, _, frame_targets = output
        if frame_probs.ndim != 3 or frame_targets.shape != frame_probs.shape:
            raise ValueError(
                "PSDSScores expected frame_probs and frame_targets [B, T, C] of one shape; found "
                f"{tuple(frame_probs.shape)} and {tuple(frame_targets.shape)}"
            )
        scores, target = frame_probs.detach().cpu().numpy(), frame_targets.detach().cpu().numpy().astype(bool)
        psds1, psds2 = intersection_counts(scores, target, self.thresholds, [PSDS1, PSDS2])
        (f1,) = intersection_counts(scores, target, [self.threshold], [INTERSECTION_F1])
        references, reference_frames = _reference_totals(target)
        if not self._psds1.numel():
            classes = target.shape[2]
            self._psds1, self._psds2 = self._zeros(*psds1.shape), self._zeros(*psds2.shape)
            self._f1 = self._zeros(classes, 2 + classes)
            self._references, self._reference_frames = self._zeros(classes), self._zeros(classes)
        for state, counts in (
            (self._psds1, psds1),
            (self._psds2, psds2),
            (self._f1, f1[0]),
            (self._references, references),
            (self._reference_frames, reference_frames),
        ):
            state += torch.from_numpy(counts).to(state)
        self._frames += target.shape[0] * target.shape[1]

    @sync_all_reduce("_psds1", "_psds2", "_f1", "_references", "_reference_frames", "_frames")
    def compute(self) -> dict[str, float]:
        if int(self._frames) == 0:
            raise NotComputableError("PSDSScores must have at least one clip before it can be computed")
        references = self._references.cpu().numpy()
        reference_seconds = self._reference_frames.cpu().numpy() * self.frame_seconds
        total_seconds = float(self._frames) * self.frame_seconds
        return {
            "psds1": psds(self._psds1.cpu().numpy(), references, reference_seconds, total_seconds, PSDS1),
            "psds2": psds(self._psds2.cpu().numpy(), references, reference_seconds, total_seconds, PSDS2),
            "intersection_f1": intersection_f1(self._f1.cpu().numpy(), references),
        }
