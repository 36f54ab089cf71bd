"""Our segment-, event- and clip-level micro F1 and macro event F1 against sed_eval 0.2.1 itself, on random activity.

sed_eval and its dcase_util need old pandas and setuptools (pkg_resources), so
they live in their own tox env: ``tox -e sed_eval``. Elsewhere this module is
skipped. The frame-level F1 has no sed_eval counterpart and is not compared.

Events for sed_eval are extracted independently of our code, with dcase_util's
``DecisionEncoder.find_contiguous_regions`` and ``frame index * frame_seconds``
(what the DCASE baselines do), and each clip is evaluated as one file.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine

with warnings.catch_warnings():
    # dcase_util imports pkg_resources, which warns that it is deprecated: that is why setuptools<81 is pinned
    warnings.simplefilter("ignore")
    sed_eval = pytest.importorskip(
        "sed_eval", reason="sed_eval is not installed; this check runs in its own env: tox -e sed_eval"
    )
    import dcase_util

from examples.sed_f1.metrics import (
    Counts,
    SEDScores,
    activity_to_events,
    clip_counts,
    event_counts,
    event_f1_macro,
    segment_counts,
)

LABELS = ["alarm", "cat", "dishes", "speech"]

# (frame_seconds, frames): our model's 64 frames for 10 s; 50 Hz, where a collar of 10 frames is not exactly
# 0.2 s in floating point; 0.1 s, where onset differences of 2 frames land a hair either side of 0.2; and a
# 6.4-s clip, so that the last 1-s segment is partial
GRIDS = [(0.15625, 64), (0.02, 500), (0.1, 100), (0.064, 100)]


def _random_clips(rng: np.random.Generator, clips: int, frames: int, frame_seconds: float) -> tuple[Any, Any]:
    """Binary ``(pred, target)`` [clips, frames, classes]: reference events, and estimates near them.

    Each reference event is estimated with its onset and offset moved by up to
    0.4 s (so that the collars decide), or missed, or split in two; and some
    estimates come from nowhere. Overlaps merge, as they would in a real roll.
    """
    jitter = max(1, round(0.4 / frame_seconds))
    target = np.zeros((clips, frames, len(LABELS)), dtype=bool)
    pred = np.zeros_like(target)
    for clip in range(clips):
        for cls in range(len(LABELS)):
            for _ in range(rng.integers(0, 4)):
                length = int(rng.integers(1, frames // 3))
                onset = int(rng.integers(0, frames - length + 1))
                target[clip, onset : onset + length, cls] = True
                action = rng.random()
                if action < 0.1:
                    continue  # missed
                start = int(np.clip(onset + rng.integers(-jitter, jitter + 1), 0, frames - 1))
                stop = int(np.clip(onset + length + rng.integers(-jitter, jitter + 1), start + 1, frames))
                pred[clip, start:stop, cls] = True
                if action < 0.25 and stop - start > 2:  # split: two estimates for one reference
                    pred[clip, int(rng.integers(start + 1, stop - 1)), cls] = False
            for _ in range(rng.integers(0, 2)):  # an insertion
                length = int(rng.integers(1, frames // 4))
                onset = int(rng.integers(0, frames - length + 1))
                pred[clip, onset : onset + length, cls] = True
    return pred, target


def _events(activity: Any, frame_seconds: float, filename: str) -> list[dict[str, Any]]:
    """One clip's [frames, classes] activity as a sed_eval event list, extracted by dcase_util."""
    encoder = dcase_util.data.DecisionEncoder()
    events = []
    for cls, label in enumerate(LABELS):
        if activity[:, cls].any():
            for onset, offset in encoder.find_contiguous_regions(activity[:, cls]):
                events.append(
                    {
                        "filename": filename,
                        "event_label": label,
                        "onset": float(onset * frame_seconds),
                        "offset": float(offset * frame_seconds),
                    }
                )
    return events


def _sed_eval_scores(pred: Any, target: Any, frame_seconds: float) -> dict[str, Any]:
    segment = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=LABELS, time_resolution=1.0)
    # the DCASE baselines' call (desed_task.evaluation.evaluation_measures.event_based_evaluation_df)
    event = sed_eval.sound_event.EventBasedMetrics(
        event_label_list=LABELS, t_collar=0.2, percentage_of_length=0.2, empty_system_output_handling="zero_score"
    )
    assert event.event_matching_type == "optimal"  # the default we claim to follow
    tagging = sed_eval.audio_tag.AudioTaggingMetrics(tags=LABELS)
    clip_seconds = pred.shape[1] * frame_seconds
    for clip in range(pred.shape[0]):
        filename = f"clip{clip}.wav"
        reference, estimated = (
            _events(target[clip], frame_seconds, filename),
            _events(pred[clip], frame_seconds, filename),
        )
        segment.evaluate(reference, estimated, evaluated_length_seconds=clip_seconds)
        event.evaluate(reference, estimated)
        tagging.evaluate(
            reference_tag_list=[{"filename": filename, "tags": sorted({e["event_label"] for e in reference})}],
            estimated_tag_list=[{"filename": filename, "tags": sorted({e["event_label"] for e in estimated})}],
        )
    return {
        "segment": (segment.overall, segment.overall_f_measure()["f_measure"]),
        "event": (event.overall, event.overall_f_measure()["f_measure"]),
        "event_macro": event.results_class_wise_average_metrics()["f_measure"]["f_measure"],
        "clip": (tagging.overall, tagging.results_overall_metrics()["f_measure"]["f_measure"]),
    }


def _as_counts(overall: dict[str, Any]) -> Counts:
    return Counts(int(overall["Ntp"]), int(overall["Nsys"]), int(overall["Nref"]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("frame_seconds", "frames"), GRIDS)
def test_segment_event_and_clip_scores_match_sed_eval(seed: int, frame_seconds: float, frames: int) -> None:
    pred, target = _random_clips(np.random.default_rng(seed), clips=8, frames=frames, frame_seconds=frame_seconds)
    theirs = _sed_eval_scores(pred, target, frame_seconds)
    ours = {
        "segment": segment_counts(pred, target, frame_seconds),
        "event": event_counts(pred, target, frame_seconds),
        "clip": clip_counts(pred.any(axis=1), target.any(axis=1)),
    }
    macro = theirs.pop("event_macro")
    for name, (overall, f_measure) in theirs.items():
        assert 0.0 < f_measure < 1.0, f"{name}: a trivial case compares nothing; change the generator"
        assert ours[name] == _as_counts(overall), name
        assert ours[name].f1 == pytest.approx(f_measure, abs=1e-6), name
    assert event_f1_macro(pred, target, frame_seconds) == pytest.approx(macro, abs=1e-6)


def test_macro_event_f1_leaves_out_a_class_without_references_as_sed_eval_does() -> None:
    """A class with estimates but no reference has recall 0/0: sed_eval's class-wise average skips it, so do we."""
    pred, target = _random_clips(np.random.default_rng(3), clips=8, frames=64, frame_seconds=0.15625)
    target[..., 2] = False  # no "dishes" reference anywhere; its estimates remain
    pred[..., 3] = False  # "speech" is never estimated: F1 0 (zero_score), not skipped
    macro = _sed_eval_scores(pred, target, 0.15625)["event_macro"]
    assert event_f1_macro(pred, target, 0.15625) == pytest.approx(macro, abs=1e-6)


@pytest.mark.parametrize(("frame_seconds", "frames"), GRIDS)
def test_our_events_are_dcase_utils_contiguous_regions(frame_seconds: float, frames: int) -> None:
    _, target = _random_clips(np.random.default_rng(7), clips=4, frames=frames, frame_seconds=frame_seconds)
    for clip in target:
        theirs = [(e["onset"], e["offset"], LABELS.index(e["event_label"])) for e in _events(clip, frame_seconds, "x")]
        assert activity_to_events(clip, frame_seconds) == sorted(theirs)


def test_the_ignite_metric_matches_sed_eval_over_batches() -> None:
    frame_seconds, frames, clips = 0.15625, 64, 12
    pred, target = _random_clips(np.random.default_rng(11), clips=clips, frames=frames, frame_seconds=frame_seconds)
    gen = torch.Generator().manual_seed(0)
    # probabilities that binarise (>= 0.5) to pred, with some exactly at the threshold
    frame_probs = torch.where(
        torch.from_numpy(pred), 0.5 + 0.5 * torch.rand(pred.shape, generator=gen), 0.49 * torch.rand(pred.shape)
    )
    frame_probs[torch.from_numpy(pred) & (torch.rand(pred.shape, generator=gen) < 0.1)] = 0.5
    clip_pred = pred.any(axis=1) ^ (np.random.default_rng(12).random((clips, len(LABELS))) < 0.2)
    clip_probs = torch.from_numpy(clip_pred).float() * 0.6 + 0.2
    batches = [
        (frame_probs[i : i + 5], clip_probs[i : i + 5], torch.from_numpy(target[i : i + 5]).float())
        for i in range(0, clips, 5)
    ]
    evaluator = Engine(lambda engine, batch: batch)
    SEDScores(frame_seconds).attach(evaluator, "sed")
    scores = evaluator.run(batches).metrics["sed"]

    theirs = _sed_eval_scores(pred, target, frame_seconds)
    assert scores["segment_f1"] == pytest.approx(theirs["segment"][1], abs=1e-6)
    assert scores["event_f1"] == pytest.approx(theirs["event"][1], abs=1e-6)
    assert scores["event_f1_macro"] == pytest.approx(theirs["event_macro"], abs=1e-6)
    tagging = sed_eval.audio_tag.AudioTaggingMetrics(tags=LABELS)
    for clip in range(clips):
        tags = {"reference": target[clip].any(axis=0), "estimated": clip_pred[clip]}
        lists = {
            k: [{"filename": f"c{clip}", "tags": [t for t, on in zip(LABELS, v, strict=True) if on]}]
            for k, v in tags.items()
        }
        tagging.evaluate(reference_tag_list=lists["reference"], estimated_tag_list=lists["estimated"])
    assert scores["clip_f1"] == pytest.approx(tagging.results_overall_metrics()["f_measure"]["f_measure"], abs=1e-6)


def test_where_sed_eval_has_no_f_we_return_zero() -> None:
    """No estimated events: sed_eval's precision is 0/0 and F is NaN, or 0 with 'zero_score'; ours is 0.0."""
    target = np.zeros((1, 64, len(LABELS)), dtype=bool)
    target[0, 10:20, 1] = True
    pred = np.zeros_like(target)
    reference, estimated = _events(target[0], 0.15625, "a.wav"), _events(pred[0], 0.15625, "a.wav")

    default = sed_eval.sound_event.EventBasedMetrics(LABELS, t_collar=0.2, percentage_of_length=0.2)
    default.evaluate(reference, estimated)
    assert np.isnan(default.overall_f_measure()["f_measure"])
    zero_score = sed_eval.sound_event.EventBasedMetrics(
        LABELS, t_collar=0.2, percentage_of_length=0.2, empty_system_output_handling="zero_score"
    )
    zero_score.evaluate(reference, estimated)
    assert zero_score.overall_f_measure()["f_measure"] == 0.0
    assert event_counts(pred, target, 0.15625).f1 == 0.0


def _compare_one_clip(pred: Any, target: Any, frame_seconds: float) -> dict[str, tuple[Counts, Counts]]:
    theirs = _sed_eval_scores(pred[None], target[None], frame_seconds)
    return {
        "segment": (segment_counts(pred, target, frame_seconds), _as_counts(theirs["segment"][0])),
        "event": (event_counts(pred, target, frame_seconds), _as_counts(theirs["event"][0])),
    }


def test_float_rounding_at_a_segment_boundary_is_decided_as_sed_eval_decides() -> None:
    """With 0.07-s frames, frame 100 starts at 100 * 0.07 = 7.000000000000001 s, not 7 s.

    An event over frames 90-99 then ends a hair after 7 s, and sed_eval's
    ceil(offset) gives it segment 7 as well as segment 6; so do we. The
    estimate over frames 101-105 (7.07-7.42 s) shares segment 7 with it.
    """
    assert 100 * 0.07 > 7.0
    target = np.zeros((143, len(LABELS)), dtype=bool)
    pred = np.zeros_like(target)
    target[90:100, 0] = True
    pred[101:106, 0] = True
    ours, theirs = _compare_one_clip(pred, target, 0.07)["segment"]
    assert ours == theirs == Counts(tp=1, n_sys=1, n_ref=2)


def test_float_rounding_at_the_onset_collar_is_decided_as_sed_eval_decides() -> None:
    """With 0.1-s frames, an onset 2 frames (0.2 s) early is within the collar, 2 frames late is not.

    1.0 - 0.8 = 0.19999999999999996 <= 0.2, but 1.2000000000000002 - 1.0 =
    0.20000000000000018 > 0.2: class 0's early estimate matches, class 1's
    late one does not.
    """
    target = np.zeros((50, len(LABELS)), dtype=bool)
    pred = np.zeros_like(target)
    target[10:20, 0] = target[10:20, 1] = True
    pred[8:20, 0] = True
    pred[12:20, 1] = True
    ours, theirs = _compare_one_clip(pred, target, 0.1)["event"]
    assert ours == theirs == Counts(tp=1, n_sys=2, n_ref=2)
