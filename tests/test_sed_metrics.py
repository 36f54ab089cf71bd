"""SED scores: frame, segment, event and clip micro F1 and macro event F1, the functions and the Ignite metric.

Expected values are worked out in the comments. The comparison with sed_eval
itself is in tests/sed_eval_check (its own tox env).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Precision, Recall

from examples.sed_f1.metrics import (
    Counts,
    SEDScores,
    activity_to_events,
    clip_counts,
    clip_f1,
    event_counts,
    event_counts_per_class,
    event_f1,
    event_f1_macro,
    frame_counts,
    frame_f1,
    macro_f1,
    segment_counts,
    segment_f1,
)
from examples.sed_f1.metrics import _max_matching as max_matching
from examples.sed_f1.psds import (
    INTERSECTION_F1,
    PSDS1,
    PSDS2,
    Criteria,
    PSDSScores,
    intersection_counts,
    intersection_f1,
    psd_roc,
    psds,
)

OUR_FRAME = 0.15625  # the model frames of this example: 32 per 5-s clip (64 per 10 s)


def _roll(frames: int, classes: int, clips: int | None = None) -> Any:
    shape = (frames, classes) if clips is None else (clips, frames, classes)
    return np.zeros(shape, dtype=bool)


# ----------------------------------------------------------------------------- events from activity


def test_runs_of_active_frames_become_events_in_seconds() -> None:
    activity = _roll(64, 3)
    activity[0:4, 0] = True  # from the first frame: 0 s
    activity[10, 0] = True  # one frame
    activity[60:, 2] = True  # to the last frame: ends at 64 * 0.15625 = 10 s
    activity[5:7, 1] = True
    assert activity_to_events(activity, OUR_FRAME) == [
        (0.0, 0.625, 0),
        (0.78125, 1.09375, 1),
        (1.5625, 1.71875, 0),
        (9.375, 10.0, 2),
    ]
    assert activity_to_events(_roll(64, 3), OUR_FRAME) == []


# ----------------------------------------------------------------------------- frame and clip level


def _ignite_micro_f1(pred: Any, target: Any) -> float:
    """F1 from Ignite's own micro precision and recall, multilabel, as an independent reference."""
    precision, recall = Precision(average="micro", is_multilabel=True), Recall(average="micro", is_multilabel=True)
    y_pred, y = (
        torch.from_numpy(pred.reshape(-1, pred.shape[-1])).long(),
        torch.from_numpy(target.reshape(-1, pred.shape[-1])).long(),
    )
    for metric in (precision, recall):
        metric.update((y_pred, y))
    p, r = float(precision.compute()), float(recall.compute())
    return 2 * p * r / (p + r)


def test_frame_f1_counts_every_clip_frame_class_cell() -> None:
    pred, target = _roll(4, 2, clips=2), _roll(4, 2, clips=2)
    pred[0, :2, 0] = target[0, 1:3, 0] = True  # TP 1 (frame 1), FP 1, FN 1
    pred[1, :, 1] = target[1, :, 1] = True  # TP 4
    target[1, 0, 0] = True  # FN 1
    assert frame_counts(pred, target) == Counts(tp=5, n_sys=6, n_ref=7)
    assert frame_f1(pred, target) == pytest.approx(10 / 13)


def test_frame_and_clip_f1_equal_f1_of_ignites_micro_precision_and_recall() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.random((5, 64, 4)) < 0.3, rng.random((5, 64, 4)) < 0.4
    assert frame_f1(pred, target) == pytest.approx(_ignite_micro_f1(pred, target), abs=1e-9)
    assert clip_f1(pred[:, 0], target[:, 0]) == pytest.approx(_ignite_micro_f1(pred[:, 0], target[:, 0]), abs=1e-9)


def test_clip_f1_is_tagging_over_clip_class_pairs() -> None:
    pred = np.array([[1, 0, 1], [0, 0, 0]])
    target = np.array([[1, 1, 0], [0, 0, 1]])
    # TP 1 (clip 0, class 0); FP 1 (clip 0, class 2); FN 2: 2 * 1 / (2 + 3)
    assert clip_counts(pred, target) == Counts(tp=1, n_sys=2, n_ref=3)
    assert clip_f1(pred, target) == pytest.approx(0.4)
    assert clip_f1(np.array([1, 0]), np.array([1, 0])) == 1.0  # one clip's tags


# ----------------------------------------------------------------------------- segment based


def test_a_class_is_active_in_every_segment_its_events_touch() -> None:
    # 0.125-s frames (exact in binary), 20 frames: a 2.5-s clip, so three 1-s segments, the last one partial
    pred, target = _roll(20, 2), _roll(20, 2)
    target[7:9, 0] = True  # 0.875-1.125 s spans the boundary at 1 s: segments 0 and 1
    pred[8:16, 0] = True  # 1.0-2.0 s: segment 1 only (it ends exactly where segment 2 starts)
    target[18:20, 1] = True  # 2.25-2.5 s: the partial segment 2
    # reference cells {(0, 0), (1, 0), (2, 1)}, estimated {(1, 0)}: TP 1, FP 0, FN 2: 2 * 1 / (1 + 3)
    assert segment_counts(pred, target, 0.125) == Counts(tp=1, n_sys=1, n_ref=3)
    assert segment_f1(pred, target, 0.125) == pytest.approx(0.5)
    # 0.5-s segments: reference {1, 2} for 0.875-1.125, {4} for 2.25-2.5, estimate {2, 3}: TP 1, FP 1, FN 2
    assert segment_counts(pred, target, 0.125, segment_seconds=0.5) == Counts(tp=1, n_sys=2, n_ref=3)


def _segments_on_the_frame_grid(activity: Any, frame_seconds: float, segment_seconds: float) -> Any:
    """Plain loop: segment k of a class is active when an active frame overlaps [k s, (k + 1) s) by more than a point.

    Exact for frame and segment lengths that are binary fractions, as 0.15625 and 1.0 are.
    """
    clips, frames, classes = activity.shape
    n_segments = int(np.ceil(frames * frame_seconds / segment_seconds))
    segments = np.zeros((clips, n_segments, classes), dtype=bool)
    for clip, frame, cls in zip(*np.nonzero(activity), strict=True):
        for k in range(n_segments):
            start, end = k * segment_seconds, (k + 1) * segment_seconds
            if frame * frame_seconds < end and (frame + 1) * frame_seconds > start:
                segments[clip, k, cls] = True
    return segments


@pytest.mark.parametrize("segment_seconds", [1.0, 0.5])
def test_segment_counts_match_a_frame_grid_loop(segment_seconds: float) -> None:
    rng = np.random.default_rng(1)
    # runs rather than salt-and-pepper: a random walk that switches state now and then
    pred, target = (np.cumsum(rng.random((6, 64, 3)) < 0.15, axis=1) % 2 == 1 for _ in range(2))
    ref = _segments_on_the_frame_grid(target, OUR_FRAME, segment_seconds)
    est = _segments_on_the_frame_grid(pred, OUR_FRAME, segment_seconds)
    expected = Counts(int((ref & est).sum()), int(est.sum()), int(ref.sum()))
    assert segment_counts(pred, target, OUR_FRAME, segment_seconds) == expected


# ----------------------------------------------------------------------------- event based


def test_onset_collar_is_200_ms() -> None:
    # 0.05-s frames; reference 1.0-2.0 s in both clips
    pred, target = _roll(60, 1, clips=2), _roll(60, 1, clips=2)
    target[:, 20:40] = True
    pred[0, 23:40] = True  # onset 1.15 s: 150 ms late, matches
    pred[1, 25:40] = True  # onset 1.25 s: 250 ms late, does not
    assert event_counts(pred, target, 0.05) == Counts(tp=1, n_sys=2, n_ref=2)
    assert event_f1(pred, target, 0.05) == pytest.approx(0.5)


def test_offset_collar_is_200_ms_or_20_percent_of_a_long_reference() -> None:
    # 0.05-s frames, 10-s clips, each with a 5-s reference (offset collar max(0.2, 0.2 * 5) = 1 s) and a 0.5-s one
    # (collar max(0.2, 0.1) = 0.2 s); onsets are exact, offsets early or late
    pred, target = _roll(200, 1, clips=2), _roll(200, 1, clips=2)
    target[:, 20:120] = True  # 1.0-6.0 s
    target[:, 140:150] = True  # 7.0-7.5 s
    pred[0, 20:102] = True  # ends 5.1 s: 0.9 s early, within 1 s: match
    pred[1, 20:98] = True  # ends 4.9 s: 1.1 s early: no match
    pred[0, 140:153] = True  # ends 7.65 s: 150 ms late: match
    pred[1, 140:155] = True  # ends 7.75 s: 250 ms late: no match
    assert event_counts(pred, target, 0.05) == Counts(tp=2, n_sys=4, n_ref=4)


def test_two_estimates_of_one_reference_are_one_tp_and_one_fp() -> None:
    # 0.025-s frames; reference 1.0-1.3 s. Both estimates are within both collars of it:
    # 0.975-1.125 s (onset 25 ms early, offset 175 ms early) and 1.15-1.325 s (150 ms late, 25 ms late)
    pred, target = _roll(80, 1), _roll(80, 1)
    target[40:52] = True
    pred[39:45] = pred[46:53] = True
    assert event_counts(pred, target, 0.025) == Counts(tp=1, n_sys=2, n_ref=1)
    assert event_f1(pred, target, 0.025) == pytest.approx(2 / 3)


def test_events_match_only_within_their_clip_and_class() -> None:
    pred, target = _roll(64, 2, clips=2), _roll(64, 2, clips=2)
    target[0, 10:20, 0] = True
    pred[1, 10:20, 0] = True  # same times, other clip
    pred[0, 10:20, 1] = True  # same times, other class
    assert event_counts(pred, target, OUR_FRAME) == Counts(tp=0, n_sys=2, n_ref=1)


def test_an_event_running_to_the_last_frame_ends_at_the_clip_end() -> None:
    pred, target = _roll(64, 1), _roll(64, 1)
    target[60:] = True  # 9.375-10.0 s
    pred[61:] = True  # 9.53125-10.0 s: onset 156.25 ms late, same offset
    assert event_counts(pred, target, OUR_FRAME) == Counts(tp=1, n_sys=1, n_ref=1)


def test_an_onset_exactly_200_ms_off_is_decided_by_floating_point_as_in_sed_eval() -> None:
    # 0.1-s frames: 1.0 - 8 * 0.1 = 0.19999999999999996 (in), 12 * 0.1 - 1.0 = 0.20000000000000018 (out)
    pred, target = _roll(40, 2), _roll(40, 2)
    target[10:20, :] = True
    pred[8:20, 0] = True
    pred[12:20, 1] = True
    assert event_counts(pred, target, 0.1) == Counts(tp=1, n_sys=2, n_ref=2)


def _brute_force_matching(hits: Any) -> int:
    """Largest number of disjoint (reference, estimate) hits, by trying every injection of references."""
    n_ref, n_est = hits.shape
    best = 0
    for assignment in itertools.product(range(-1, n_est), repeat=n_ref):
        chosen = [e for e in assignment if e >= 0]
        if len(chosen) == len(set(chosen)) and all(hits[r, e] for r, e in enumerate(assignment) if e >= 0):
            best = max(best, len(chosen))
    return best


def test_matching_is_maximum_not_greedy() -> None:
    # reference 0 hits estimates 0 and 1, reference 1 only estimate 0: taking the first hit for reference 0
    # (greedy) leaves reference 1 unmatched; the maximum matching pairs 0-1 and 1-0
    assert max_matching(np.array([[True, True], [True, False]])) == 2
    rng = np.random.default_rng(2)
    for _ in range(200):
        hits = rng.random((int(rng.integers(0, 5)), int(rng.integers(0, 5)))) < 0.4
        assert max_matching(hits) == _brute_force_matching(hits)


# ----------------------------------------------------------------------------- edge cases


def test_nothing_to_find_and_nothing_found_scores_zero_not_nan() -> None:
    empty = _roll(64, 3, clips=2)
    assert frame_f1(empty, empty) == segment_f1(empty, empty, OUR_FRAME) == event_f1(empty, empty, OUR_FRAME) == 0.0
    assert clip_f1(empty[:, 0], empty[:, 0]) == 0.0
    found = empty.copy()
    found[0, 5:9, 1] = True  # only false positives
    assert event_counts(found, empty, OUR_FRAME) == Counts(tp=0, n_sys=1, n_ref=0)
    assert event_f1(found, empty, OUR_FRAME) == event_f1(empty, found, OUR_FRAME) == 0.0


# ----------------------------------------------------------------------------- the Ignite metric


def _three_clips() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three 4-s clips of eight 0.5-s frames and two classes, with every score worked out by hand below.

    clip 0: class 0 reference 0-2 s, estimated 0-2 s; class 1 estimated 3-4 s, no reference
    clip 1: class 1 reference 1-3 s, estimated 1.5-3 s (onset 0.5 s late: outside the 200-ms collar)
    clip 2: class 0 reference 2-3 s, estimated 2-3 s; class 1 reference 0-1 s, not estimated
    Tags (clip_probs >= 0.5): clip 0 {0, 1}, clip 1 {1}, clip 2 {0}.
    """
    targets = torch.zeros(3, 8, 2)
    targets[0, 0:4, 0] = targets[1, 2:6, 1] = targets[2, 4:6, 0] = targets[2, 0:2, 1] = 1
    frame_probs = torch.full((3, 8, 2), 0.2)
    frame_probs[0, 0:4, 0] = frame_probs[0, 6:8, 1] = frame_probs[1, 3:6, 1] = frame_probs[2, 4:6, 0] = 0.8
    frame_probs[0, 3, 0] = frame_probs[2, 4, 0] = 0.5  # exactly at the threshold: active
    frame_probs[1, 2, 1] = 0.49  # just below: inactive
    clip_probs = torch.tensor([[0.9, 0.6], [0.2, 0.7], [0.8, 0.3]])
    return frame_probs, clip_probs, targets


# Worked out from _three_clips:
# frames:   TP 4 + 3 + 2 = 9; estimated 6 + 3 + 2 = 11; reference 4 + 4 + 4 = 12: F1 18 / 23
# segments (1 s = 2 frames): TP clip 0 {0, 1}, clip 1 {1, 2}, clip 2 {2} = 5; estimated 5 + 1 (clip 0, class 1,
#           segment 3) = 6; reference 5 + 1 (clip 2, class 1, segment 0) = 6: F1 10 / 12
# events:   4 references, 4 estimates, TP 2 (clip 0 and clip 2, class 0): F1 4 / 8; per class: class 0 TP 2 of
#           2 and 2 (F1 1), class 1 TP 0 of 2 and 2 (F1 0): macro 0.5
# tags:     TP 3 (clip 0 class 0, clip 1 class 1, clip 2 class 0), estimated 4, reference 4: F1 6 / 8
THREE_CLIPS_SCORES = {
    "frame_f1": 18 / 23,
    "segment_f1": 10 / 12,
    "event_f1": 0.5,
    "clip_f1": 0.75,
    "event_f1_macro": 0.5,
}


def test_metric_on_an_evaluator_adds_up_the_counts_of_all_batches() -> None:
    frame_probs, clip_probs, frame_targets = _three_clips()
    batches = [
        (frame_probs[:2], clip_probs[:2], frame_targets[:2]),
        (frame_probs[2:], clip_probs[2:], frame_targets[2:]),
    ]
    evaluator = Engine(lambda engine, batch: batch)
    SEDScores(frame_seconds=0.5).attach(evaluator, "sed")
    for _ in range(2):  # a second run starts from zero again
        metrics = evaluator.run(batches).metrics
        assert metrics["sed"] == pytest.approx(THREE_CLIPS_SCORES, abs=1e-12)
        assert {name: metrics[name] for name in THREE_CLIPS_SCORES} == metrics["sed"]  # also flattened, as Ignite does


def test_a_probability_equal_to_the_threshold_is_active() -> None:
    frame_probs = torch.full((1, 4, 1), 0.5)
    metric = SEDScores(frame_seconds=0.5)
    metric.update((frame_probs, torch.full((1, 1), 0.5), torch.ones(1, 4, 1)))
    assert metric.compute() == dict.fromkeys(THREE_CLIPS_SCORES, 1.0)
    strict = SEDScores(frame_seconds=0.5, threshold=0.6)
    strict.update((frame_probs, torch.full((1, 1), 0.5), torch.ones(1, 4, 1)))
    assert strict.compute() == dict.fromkeys(THREE_CLIPS_SCORES, 0.0)


def test_metric_takes_a_dict_output_and_refuses_to_compute_before_any_clip() -> None:
    metric = SEDScores(frame_seconds=0.5, output_transform=lambda out: out)
    with pytest.raises(NotComputableError, match="at least one clip"):
        metric.compute()
    evaluator = Engine(
        lambda engine, batch: {"frame_probs": batch[0], "clip_probs": batch[1], "frame_targets": batch[2]}
    )
    metric.attach(evaluator, "sed")
    scores = evaluator.run([_three_clips()]).metrics["sed"]
    assert scores == pytest.approx(THREE_CLIPS_SCORES, abs=1e-12)


def test_macro_event_f1_averages_the_classes_with_references() -> None:
    # 0.1-s frames. Class 0: two references, both found (F1 1). Class 1: one reference, found, plus an insertion
    # (TP 1, 2 estimates, 1 reference: F1 2/3). Class 2: an insertion only, no reference: left out, as sed_eval's
    # class-wise average leaves out a class whose recall is 0/0. Macro (1 + 2/3) / 2; micro 2 * 3 / (5 + 3).
    pred, target = _roll(40, 3), _roll(40, 3)
    target[0:5, 0] = pred[0:5, 0] = target[20:30, 0] = pred[20:30, 0] = True
    target[10:15, 1] = pred[10:15, 1] = pred[30:35, 1] = True
    pred[36:39, 2] = True
    assert event_counts_per_class(pred, target, 0.1).tolist() == [[2, 2, 2], [1, 2, 1], [0, 1, 0]]
    assert event_f1_macro(pred, target, 0.1) == pytest.approx((1 + 2 / 3) / 2)
    assert event_f1(pred, target, 0.1) == pytest.approx(6 / 8)
    assert macro_f1([[0, 0, 0]]) == 0.0  # no class has a reference


# ----------------------------------------------------------------------------- bad input


def test_functions_reject_bad_input_saying_what_was_expected() -> None:
    activity = _roll(64, 3, clips=2)
    with pytest.raises(ValueError, match=r"same shape; found pred \(2, 64, 3\), target \(2, 64, 2\)"):
        frame_f1(activity, activity[..., :2])
    with pytest.raises(
        ValueError, match=r"expected binary activity \[clips, frames, classes\].*found an array of shape \(64,\)"
    ):
        event_f1(activity[0, :, 0], activity[0, :, 0], OUR_FRAME)
    with pytest.raises(ValueError, match=r"found the value 0\.7.*probs >= 0\.5"):
        segment_f1(np.full((64, 3), 0.7), activity[0], OUR_FRAME)
    with pytest.raises(ValueError, match=r"frame_seconds must be a finite number of seconds > 0; found 0"):
        event_f1(activity, activity, 0)
    with pytest.raises(ValueError, match=r"percentage_of_length must be in \[0, 1\]; found 20"):
        event_counts(activity, activity, OUR_FRAME, percentage_of_length=20)
    with pytest.raises(ValueError, match=r"\[clips, classes\] or \[classes\]"):
        clip_f1(activity, activity)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ((torch.rand(2, 64, 3), torch.rand(2, 64, 3)), r"expected the output \(frame_probs .*found 2 items"),
        ((torch.rand(64, 3), torch.rand(2, 3), torch.ones(64, 3)), r"found frame_probs of shape \(64, 3\)"),
        ((torch.rand(2, 64, 3), torch.rand(2, 3), torch.ones(2, 32, 3)), r"frame_targets must have the shape"),
        ((torch.rand(2, 64, 3), torch.rand(2, 4), torch.ones(2, 64, 3)), r"clip_probs must be \[B, C\] = \(2, 3\)"),
        ((torch.randn(2, 64, 3) * 5, torch.rand(2, 3), torch.ones(2, 64, 3)), r"apply a sigmoid to logits"),
        ((torch.full((2, 64, 3), float("nan")), torch.rand(2, 3), torch.ones(2, 64, 3)), r"and NaN"),
        ((torch.rand(2, 64, 3), torch.rand(2, 3), torch.full((2, 64, 3), 0.5)), r"frame_targets must be 0/1"),
    ],
)
def test_metric_rejects_bad_output_saying_what_was_expected(output: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SEDScores(frame_seconds=OUR_FRAME).update(output)


def test_metric_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"clip_probs must be a torch\.Tensor; found ndarray"):
        SEDScores(frame_seconds=OUR_FRAME).update((torch.rand(1, 4, 2), np.ones((1, 2)), torch.ones(1, 4, 2)))
    with pytest.raises(ValueError, match="frame_seconds must be a finite number of seconds > 0; found -1"):
        SEDScores(frame_seconds=-1)
    with pytest.raises(ValueError, match=r"threshold must be a probability in \[0, 1\]; found 2"):
        SEDScores(frame_seconds=OUR_FRAME, threshold=2)
    with pytest.raises(ValueError, match="t_collar must be a finite number of seconds > 0; found 0"):
        SEDScores(frame_seconds=OUR_FRAME, t_collar=0)


# ----------------------------------------------------------------------------- intersection based: PSDS


def _one_clip_two_classes() -> tuple[Any, Any]:
    """20 frames, two classes, binary scores; the counts are worked out in the tests that use it.

    References: class 0 frames 2-11 (10 frames), class 1 frames 14-17 (4 frames).
    Detections: A, class 0 frames 4-11 (8 frames, all inside the class-0 reference);
    B, class 0 frames 13-16 (4 frames: none on a class-0 reference, 3 on the class-1 one);
    C, class 1 frames 0-1 (on no reference).
    """
    scores, target = np.zeros((1, 20, 2)), np.zeros((1, 20, 2), dtype=bool)
    target[0, 2:12, 0] = target[0, 14:18, 1] = True
    scores[0, 4:12, 0] = scores[0, 13:17, 0] = scores[0, 0:2, 1] = 1.0
    return scores, target


def test_intersection_counts_follow_the_dtc_gtc_and_cttc() -> None:
    scores, target = _one_clip_two_classes()
    (counts,) = intersection_counts(scores, target, [0.5], [Criteria(dtc=0.7, gtc=0.7, cttc=0.3)])
    # class 0: A passes the DTC (8/8 on its reference) and covers 8/10 >= 0.7 of it: 1 TP; B fails the DTC (0/4):
    # an FP, and a cross-trigger on class 1 (3/4 >= 0.3). Class 1: C fails (0/2): an FP, no cross-trigger; its
    # reference is not detected.
    assert counts[0].tolist() == [[1, 1, 0, 1], [0, 1, 0, 0]]
    (strict,) = intersection_counts(scores, target, [0.5], [Criteria(dtc=0.7, gtc=0.9, cttc=0.8)])
    # A covers 0.8 < 0.9 of its reference: no TP, but A still passes the DTC, so it is no FP; B's 3/4 < 0.8
    assert strict[0].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]


def test_the_gtc_adds_up_detections_and_one_detection_can_find_two_references() -> None:
    scores, target = np.zeros((1, 20, 1)), np.zeros((1, 20, 1), dtype=bool)
    target[0, 0:10, 0] = True
    scores[0, 0:4, 0] = scores[0, 5:9, 0] = 1.0  # two detections, 4 frames each, together 8/10 of the reference
    (counts,) = intersection_counts(scores, target, [0.5], [Criteria(dtc=0.7, gtc=0.7)])
    assert counts[0].tolist() == [[1, 0, 0]]
    target[0, 4:6, 0] = False  # now references 0-3 and 6-9; one detection over frames 0-9
    scores[0, :10, 0] = 1.0
    (counts,) = intersection_counts(scores, target, [0.5], [Criteria(dtc=0.7, gtc=0.7)])
    assert counts[0].tolist() == [[2, 0, 0]]  # 8/10 of it on references: it passes, and covers both fully


def test_operating_points_are_the_thresholds_of_the_scores() -> None:
    scores, target = np.zeros((1, 10, 1)), np.zeros((1, 10, 1), dtype=bool)
    target[0, 2:6, 0] = True
    scores[0, 2:6, 0] = 0.6  # the reference's frames: detected at thresholds <= 0.6
    scores[0, 8:10, 0] = 0.3  # a false alarm at thresholds <= 0.3
    (counts,) = intersection_counts(scores, target, [0.2, 0.3, 0.5, 0.6, 0.7], [Criteria(dtc=0.7, gtc=0.7)])
    assert counts[:, 0, :2].tolist() == [[1, 1], [1, 1], [1, 0], [1, 0], [0, 0]]  # a score equal to t is active


def _counts(*rows: tuple[int, int]) -> Any:
    """One class's (TP, FP) per threshold as psd_roc's [thresholds, classes = 1, 3] counts, no cross-triggers."""
    return np.array([[[tp, fp, 0]] for tp, fp in rows])


def test_psds_is_the_area_under_the_staircase_roc() -> None:
    # one class of 2 references, one hour of audio: TPR 0.5 at 0 FP, then TPR 1 at 1 FP per hour. The staircase
    # is 0.5 on [0, 1) and 1 on [1, 100]: (0.5 * 1 + 1 * 99) / 100
    one = (_counts((1, 0), (2, 1)), np.array([2]), np.array([100.0]), 3600.0)
    assert psds(*one, Criteria(0.5, 0.5, alpha_st=0.0)) == pytest.approx(0.995)
    assert psds(*one, Criteria(0.5, 0.5, alpha_st=1.0)) == pytest.approx(0.995)  # one class: no spread
    assert psds(*one, Criteria(0.5, 0.5, alpha_st=0.0, max_efpr=0.5)) == pytest.approx(0.5)
    # a second class, 0 until 50 FP per hour, then 1. Means: 0.25 on [0, 1), 0.5 on [1, 50), 1 on [50, 100];
    # standard deviations (ddof 0): 0.25, 0.5, 0
    a = np.array([[[1, 0, 0], [0, 0, 0]], [[2, 1, 0], [0, 0, 0]], [[2, 1, 0], [1, 50, 0]]])
    two = (a, np.array([2, 1]), np.array([100.0, 100.0]), 3600.0)
    assert psds(*two, Criteria(0.5, 0.5, alpha_st=0.0)) == pytest.approx((0.25 * 1 + 0.5 * 49 + 1.0 * 50) / 100)
    assert psds(*two, Criteria(0.5, 0.5, alpha_st=1.0)) == pytest.approx(50 / 100)  # mean - std: 0, 0, 1


def test_cross_triggers_raise_the_effective_fp_rate_by_alpha_ct() -> None:
    # class 0: its 1 reference found with no FP but 1 cross-trigger on class 1, whose references last half an
    # hour: CTR 2 per hour, eFPR 0 + 0.5 * 2 = 1 with alpha_ct = 0.5. Class 1 is never detected.
    counts = np.array([[[1, 0, 0, 1], [0, 0, 0, 0]]])
    totals = (np.array([1, 1]), np.array([100.0, 1800.0]), 3600.0)
    x, etpr = psd_roc(counts, *totals, Criteria(0.5, 0.5, alpha_ct=0.5, alpha_st=0.0))
    assert x.tolist() == [0.0, 1.0] and etpr.tolist() == [0.0, 0.5]  # class 0 reaches TPR 1 only at eFPR 1
    x, etpr = psd_roc(counts, *totals, Criteria(0.5, 0.5, alpha_ct=0.0, alpha_st=0.0))
    assert x.tolist() == [0.0] and etpr.tolist() == [0.5]


def test_a_class_without_references_is_left_out() -> None:
    counts = np.array([[[1, 0, 0], [0, 3, 0]]])  # class 1 has no reference: TPR undefined
    assert psds(counts, np.array([1, 0]), np.array([10.0, 0.0]), 3600.0, PSDS1) == pytest.approx(1.0)
    assert intersection_f1(counts[0], np.array([1, 0])) == 1.0
    assert psds(counts, np.array([0, 0]), np.array([0.0, 0.0]), 3600.0, PSDS1) == 0.0


def test_intersection_f1_scores_a_class_without_tp_zero() -> None:
    scores, target = _one_clip_two_classes()
    (counts,) = intersection_counts(scores, target, [0.5], [INTERSECTION_F1])
    # class 0: TP 1, FP 1 (B), 1 reference: 2 / (2 + 1 + 0); class 1: TP 0, FP 1, FN 1: 0 (psds_eval drops it)
    assert intersection_f1(counts[0], np.array([1, 1])) == pytest.approx((2 / 3 + 0) / 2)


def _plain_loop_counts(scores: Any, target: Any, threshold: float, criteria: Criteria) -> Any:
    """psds_eval's counting, event by event in plain loops: the reference for intersection_counts."""
    clips, _, classes = scores.shape
    counts = np.zeros((classes, 2 + classes), dtype=int)

    def events(activity: Any) -> list[tuple[int, int]]:
        runs, start = [], None
        for i, on in enumerate([*activity, False]):
            if on and start is None:
                start = i
            elif not on and start is not None:
                runs.append((start, i))
                start = None
        return runs

    def inter(a: tuple[int, int], b: tuple[int, int]) -> int:
        return max(0, min(a[1], b[1]) - max(a[0], b[0]))

    for clip in range(clips):
        refs = [events(target[clip, :, c]) for c in range(classes)]
        for c in range(classes):
            dets = events(scores[clip, :, c] >= threshold)
            passing = []
            for d in dets:
                length = d[1] - d[0]
                if sum(inter(d, r) for r in refs[c]) / length >= criteria.dtc:
                    passing.append(d)
                    continue
                counts[c, 1] += 1
                for other in range(classes):
                    if other != c and sum(inter(d, r) for r in refs[other]) / length >= criteria.cttc:
                        counts[c, 2 + other] += 1
            for r in refs[c]:
                if sum(inter(d, r) for d in passing) / (r[1] - r[0]) >= criteria.gtc:
                    counts[c, 0] += 1
    return counts


@pytest.mark.parametrize("criteria", [PSDS1, PSDS2, INTERSECTION_F1])
def test_intersection_counts_match_a_plain_loop_over_events(criteria: Criteria) -> None:
    rng = np.random.default_rng(5)
    target = np.cumsum(rng.random((6, 64, 3)) < 0.1, axis=1) % 2 == 1
    scores = np.clip(0.6 * target + rng.normal(0.2, 0.25, size=target.shape).cumsum(axis=1) * 0.2, 0, 1)
    thresholds = [0.1, 0.3, 0.5, 0.7]
    (counts,) = intersection_counts(scores, target, thresholds, [criteria])
    for k, threshold in enumerate(thresholds):
        expected = _plain_loop_counts(scores, target, threshold, criteria)
        assert counts[k].tolist() == expected.tolist(), threshold
    assert counts[..., 0].sum() > 0 and counts[..., 1].sum() > 0 and counts[..., 2:].sum() > 0  # all three occur


def test_psds_metric_on_an_evaluator_adds_up_batches() -> None:
    scores, target = _one_clip_two_classes()
    exact = np.where(target, 1.0, 0.0)  # a second clip, the same references each detected exactly
    # Two batches of one clip, 20 frames of 180 s each: 2 hours in all, 2 references per class, 2 x 4 frames =
    # 0.4 h of class-1 reference. At both thresholds:
    # class 0: TP 2 (A covers 8/10 of its reference, the exact detection all of it), FP 1 (B) -> TPR 1, FPR 0.5/h;
    #   for PSDS2 B is also a cross-trigger on class 1: 1 / 0.4 h = 2.5/h, eFPR 0.5 + 0.5 * 2.5 = 1.75/h.
    # class 1: TP 1 (the exact one), FP 1 (C, no cross-trigger) -> TPR 0.5, eFPR 0.5/h.
    # PSDS1: from eFPR 0.5 the classes' TPRs are (1, 0.5): mean 0.75 - std 0.25 = 0.5, over 99.5 of 100 per hour.
    # PSDS2: (0, 0.5) from 0.5 gives 0.25 - 0.25 = 0; (1, 0.5) from 1.75 gives 0.5, over 98.25 of 100 per hour.
    # Intersection F1: class 0 2 TP / (TP 2 + FP 1 + N_ref 2) = 4/5, class 1 2 / (1 + 1 + 2) = 1/2. A metric that
    # kept one batch would give 1/3 or 1; one that averaged the batches' F1, 2/3.
    batches = [
        (torch.from_numpy(clip), torch.zeros(1, 2), torch.from_numpy(target).float()) for clip in (scores, exact)
    ]
    evaluator = Engine(lambda engine, b: b)
    PSDSScores(frame_seconds=180.0, thresholds=[0.5, 1.0]).attach(evaluator, "psds")
    result = evaluator.run(batches).metrics["psds"]
    assert result == pytest.approx({"psds1": 0.5 * 99.5 / 100, "psds2": 0.5 * 98.25 / 100, "intersection_f1": 0.65})
    with pytest.raises(NotComputableError, match="at least one clip"):
        PSDSScores(frame_seconds=0.1).compute()
