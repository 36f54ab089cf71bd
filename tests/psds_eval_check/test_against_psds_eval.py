"""Our PSDS1, PSDS2 and intersection F1 (examples/sed_f1/psds.py) against psds_eval 0.5.3 itself.

psds_eval needs pandas < 3 and numpy < 2.4 (it converts a 2-d array to an
int), so it lives in its own tox env: ``tox -e psds_eval``. Elsewhere this
module is skipped.

Detections and references go to psds_eval as event tables built here from the
binarised frames (``frame index * frame_seconds``), each clip one file, and
the same 50 thresholds as ours, as the DCASE 2021-2022 baselines call it
(``compute_psds_from_operating_points``, ``compute_per_intersection_macro_f1``).
The scores agree to 1e-9 on frame grids exact in binary (see ``GRIDS``): both
sides count the same events, and only the order of some float sums differs.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    psds_eval = pytest.importorskip(
        "psds_eval", reason="psds_eval is not installed; this check runs in its own env: tox -e psds_eval"
    )
    import pandas as pd

from examples.sed_f1.psds import (
    INTERSECTION_F1,
    PSDS1,
    PSDS2,
    THRESHOLDS,
    Criteria,
    intersection_counts,
    intersection_f1,
    psds,
)

LABELS = ["alarm", "cat", "dishes", "speech", "water"]
TOLERANCE = 1e-9
# Frame durations exact in binary (5/32 s, this example's; 1/16 s), so that event times, durations and the ratios
# the criteria compare are exact on both sides. On a grid like 0.1 s, psds_eval's ratios of float seconds can
# fall a hair below a criterion that the exact frame counts meet (1 frame of 10 on a reference: 0.1 against a
# DTC of 0.1), and then a few operating points differ (0.3 % of PSDS2 in one case seen).
GRIDS = [(0.15625, 64), (0.0625, 160)]


def _scores(rng: np.random.Generator, clips: int, frames: int) -> tuple[Any, Any]:
    """Scores that look like a detector's: smooth, higher on the references, with confusions between classes."""
    target = np.zeros((clips, frames, len(LABELS)), dtype=bool)
    for clip in range(clips):
        for cls in range(len(LABELS)):
            for _ in range(rng.integers(0, 3)):
                length = int(rng.integers(1, frames // 3))
                onset = int(rng.integers(0, frames - length + 1))
                target[clip, onset : onset + length, cls] = True
    # the noise drawn on 64 steps and stretched to the grid, so that the scores look alike on any grid
    coarse = (
        rng.normal(size=(clips, 64, len(LABELS))).cumsum(axis=1) * 0.15
        + rng.normal(size=(clips, 64, len(LABELS))) * 0.8
    )
    stretch = np.minimum(np.arange(frames) * 64 // frames, 63)
    logits = 3.0 * (target - 0.5) + coarse[:, stretch]
    logits[..., 1] = np.maximum(logits[..., 1], logits[..., 0] - 1.0)  # class 1 fires on class 0: cross-triggers
    return 1 / (1 + np.exp(-logits)), target


def _table(activity: Any, frame_seconds: float) -> Any:
    """Events of [clips, frames, classes] activity as psds_eval's table (filename, onset, offset, event_label)."""
    rows = []
    for clip in range(activity.shape[0]):
        for cls, label in enumerate(LABELS):
            padded = np.concatenate([[False], activity[clip, :, cls], [False]])
            edges = np.flatnonzero(np.diff(padded.astype(int)))
            for start, stop in zip(edges[::2], edges[1::2], strict=True):
                rows.append(
                    {"filename": f"{clip}.wav", "onset": start * frame_seconds, "offset": stop * frame_seconds,
                     "event_label": label}
                )  # fmt: skip
    table = pd.DataFrame(rows, columns=["filename", "onset", "offset", "event_label"])
    table.index = range(1, len(table) + 1)  # psds_eval issue 3, as the DCASE baselines work around it
    return table


def _their_psds(scores: Any, target: Any, frame_seconds: float, criteria: Criteria) -> float:
    clips, frames, _ = scores.shape
    metadata = pd.DataFrame({"filename": [f"{c}.wav" for c in range(clips)], "duration": frames * frame_seconds})
    evaluation = psds_eval.PSDSEval(
        dtc_threshold=criteria.dtc,
        gtc_threshold=criteria.gtc,
        cttc_threshold=criteria.cttc,
        ground_truth=_table(target, frame_seconds),
        metadata=metadata,
    )
    for i, threshold in enumerate(THRESHOLDS):
        evaluation.add_operating_point(_table(scores >= threshold, frame_seconds), info={"name": i})
    value = evaluation.psds(alpha_ct=criteria.alpha_ct, alpha_st=criteria.alpha_st, max_efpr=criteria.max_efpr)
    return float(value.value)


def _their_intersection_f1(scores: Any, target: Any, frame_seconds: float) -> float:
    clips, frames, _ = scores.shape
    metadata = pd.DataFrame({"filename": [f"{c}.wav" for c in range(clips)], "duration": frames * frame_seconds})
    evaluation = psds_eval.PSDSEval(
        dtc_threshold=0.5, gtc_threshold=0.5, cttc_threshold=0.3, ground_truth=_table(target, frame_seconds),
        metadata=metadata,
    )  # fmt: skip
    f1, per_class = evaluation.compute_macro_f_score(_table(scores >= 0.5, frame_seconds))
    assert not any(np.isnan(v) for v in per_class.values()), "a class without TP: psds_eval would drop it"
    return float(f1)


def _ours(scores: Any, target: Any, frame_seconds: float, criteria: Criteria, thresholds: Any) -> tuple[Any, ...]:
    (counts,) = intersection_counts(scores, target, thresholds, [criteria])
    references = np.array([0] * len(LABELS))
    for clip in target:
        for cls in range(len(LABELS)):
            references[cls] += int(np.sum(np.diff(np.concatenate([[0], clip[:, cls].astype(int)])) == 1))
    reference_seconds = target.sum(axis=(0, 1)) * frame_seconds
    return counts, references, reference_seconds, target.shape[0] * target.shape[1] * frame_seconds


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("frame_seconds", "frames"), GRIDS)
@pytest.mark.parametrize("criteria", [PSDS1, PSDS2], ids=["psds1", "psds2"])
def test_psds_matches_psds_eval(seed: int, frame_seconds: float, frames: int, criteria: Criteria) -> None:
    scores, target = _scores(np.random.default_rng(seed), clips=24, frames=frames)
    ours = psds(*_ours(scores, target, frame_seconds, criteria, THRESHOLDS), criteria)
    theirs = _their_psds(scores, target, frame_seconds, criteria)
    assert 0.05 < theirs < 0.95, "a trivial case compares nothing; change the generator"
    assert ours == pytest.approx(theirs, abs=TOLERANCE)


@pytest.mark.parametrize("seed", range(4))
def test_intersection_f1_matches_psds_eval(seed: int) -> None:
    scores, target = _scores(np.random.default_rng(10 + seed), clips=24, frames=64)
    counts, references, _, _ = _ours(scores, target, 0.15625, INTERSECTION_F1, [0.5])
    theirs = _their_intersection_f1(scores, target, 0.15625)
    assert 0.05 < theirs < 0.95
    assert intersection_f1(counts[0], references) == pytest.approx(theirs, abs=TOLERANCE)


def test_where_psds_eval_drops_a_class_without_tp_we_score_it_zero() -> None:
    """psds_eval computes a class's reference count as TP / TPR, 0 / 0 when TP is 0, and leaves the class out."""
    scores, target = _scores(np.random.default_rng(0), clips=24, frames=64)
    scores[..., 2] = 0.0  # class 2 is never detected
    counts, references, _, _ = _ours(scores, target, 0.15625, INTERSECTION_F1, [0.5])
    clips, frames, _ = scores.shape
    metadata = pd.DataFrame({"filename": [f"{c}.wav" for c in range(clips)], "duration": frames * 0.15625})
    evaluation = psds_eval.PSDSEval(
        dtc_threshold=0.5, gtc_threshold=0.5, cttc_threshold=0.3, ground_truth=_table(target, 0.15625),
        metadata=metadata,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its 0 / 0
        theirs, per_class = evaluation.compute_macro_f_score(_table(scores >= 0.5, 0.15625))
    assert np.isnan(per_class["dishes"])
    ours = intersection_f1(counts[0], references)
    others = [v for k, v in per_class.items() if k != "dishes"]
    assert theirs == pytest.approx(np.mean(others), abs=TOLERANCE)
    assert ours == pytest.approx(np.sum(others) / len(LABELS), abs=TOLERANCE)
