"""The SED experiment: its data, its model, the regression it exists to show, and its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.sed_f1.cli import main
from examples.sed_f1.data import CLASSES, LABEL_FRAMES, N_FRAMES, N_MELS, load_npz_dir, synthesize, to_label_rate
from examples.sed_f1.experiment import TrainConfig, train_run
from examples.sed_f1.metrics import SCORES
from examples.sed_f1.model import CRNN


def test_synthetic_data_is_deterministic_and_shaped_as_documented() -> None:
    a, b, c = synthesize(20, 30, 10, seed=0), synthesize(20, 30, 10, seed=0), synthesize(20, 30, 10, seed=1)
    assert np.array_equal(a.labelled.x, b.labelled.x) and np.array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.labelled.x, c.labelled.x)
    assert a.labelled.x.shape == (20, 1, N_MELS, N_FRAMES) and a.labelled.x.dtype == np.float32
    assert a.unlabelled.y.shape == (30, LABEL_FRAMES, len(CLASSES)) and len(CLASSES) >= 8
    events_per_clip = (a.labelled.y.max(axis=1) > 0).sum(axis=1)
    assert events_per_clip.min() >= 1 and events_per_clip.max() <= 4  # 1-4 events, some may share a class
    assert a.frame_seconds == pytest.approx(10.0 / LABEL_FRAMES)


def test_events_raise_the_spectrogram_where_they_are_labelled() -> None:
    data = synthesize(200, 1, 1, seed=3)
    x, y = data.labelled.x[:, 0], data.labelled.y  # [clips, mels, frames], [clips, label frames, classes]
    active = np.repeat(y.max(axis=2) > 0, N_FRAMES // LABEL_FRAMES, axis=1)  # [clips, frames]
    loudest_bin = x.max(axis=1)  # [clips, frames]
    assert loudest_bin[active].mean() > loudest_bin[~active].mean() + 3.0  # dB


def test_label_rate_pooling_marks_a_label_frame_active_if_any_input_frame_is() -> None:
    activity = np.zeros((1, 8, 2), dtype=np.float32)
    activity[0, 3, 0] = 1.0  # input frame 3 -> label frame 1 (frames 2-3)
    activity[0, 4:8, 1] = 1.0  # frames 4-7 -> label frames 2-3
    assert to_label_rate(activity, 4)[0].tolist() == [[0, 0], [1, 0], [0, 1], [0, 1]]
    with pytest.raises(ValueError, match="cannot be pooled"):
        to_label_rate(activity, 3)


def test_npz_features_load_as_documented(tmp_path: Path) -> None:
    data = synthesize(6, 5, 4, seed=0)
    for name, part in (("labelled", data.labelled), ("unlabelled", data.unlabelled), ("test", data.test)):
        arrays = {"features": part.x[:, 0], "labels": part.y}
        if name == "unlabelled":
            del arrays["labels"]  # allowed: unlabelled clips need no labels
        if name == "test":
            arrays |= {"classes": np.array(data.classes), "frame_seconds": np.array(data.frame_seconds)}
        np.savez(tmp_path / f"{name}.npz", **arrays)
    loaded = load_npz_dir(tmp_path)
    assert loaded.classes == data.classes and loaded.frame_seconds == data.frame_seconds
    assert np.array_equal(loaded.labelled.x, data.labelled.x) and np.array_equal(loaded.test.y, data.test.y)
    (tmp_path / "test.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.npz is missing"):
        load_npz_dir(tmp_path)


def test_npz_with_misshaped_labels_is_refused(tmp_path: Path) -> None:
    for name in ("labelled", "unlabelled", "test"):
        np.savez(tmp_path / f"{name}.npz", features=np.zeros((2, 64, 128), np.float32), labels=np.zeros((2, 128, 3)))
    with pytest.raises(ValueError, match=r"labels must be \[clips, frames/2, classes\]"):
        load_npz_dir(tmp_path)


@pytest.mark.parametrize("mels", [48, 16])
def test_npz_features_with_too_few_mels_for_the_crnn_are_refused(tmp_path: Path, mels: int) -> None:
    for name in ("labelled", "unlabelled", "test"):
        features, labels = np.zeros((2, mels, 8), np.float32), np.zeros((2, 4, 3))
        np.savez(tmp_path / f"{name}.npz", features=features, labels=labels, classes=["a", "b", "c"], frame_seconds=0.1)
    if mels == 16:  # the CRNN would divide 16 bins by 32: refused when loading, not deep inside training
        with pytest.raises(ValueError, match=r"mels \(a multiple of 16, at least 32\)"):
            load_npz_dir(tmp_path)
        return
    data = load_npz_dir(tmp_path)
    frames, clips = CRNN(n_classes=3, n_mels=mels)(torch.from_numpy(data.test.x))
    assert frames.shape == (2, 4, 3) and clips.shape == (2, 3)


def test_crnn_outputs_frame_and_clip_probabilities() -> None:
    model = CRNN(n_classes=10).eval()
    frames, clips = model(torch.randn(3, 1, N_MELS, N_FRAMES))
    assert frames.shape == (3, LABEL_FRAMES, 10) and clips.shape == (3, 10)
    assert frames.min() >= 0 and frames.max() <= 1 and clips.min() > 0 and clips.max() < 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Attribute 'ema_momentum' is not defined")
def test_the_copy_teacher_regression_is_reproduced() -> None:
    """The bug this package fixes, as a test: an eval-mode teacher on copied student statistics scores far lower.

    A small deterministic configuration (one seed, 300 iterations, smaller data): if a change lets "copy"
    catch up with "ema_train" here, the comparison no longer shows what it is for.
    """
    torch.set_num_threads(1)
    data = synthesize(n_labelled=200, n_unlabelled=600, n_test=200, seed=0)
    config = TrainConfig(iterations=300, eval_every=300)
    teacher_f1 = {name: train_run(name, 0, data, config).teacher for name in ("copy", "ema_train")}
    copy, ema_train = teacher_f1["copy"], teacher_f1["ema_train"]
    assert copy is not None and ema_train is not None
    assert copy["frame_f1"] < ema_train["frame_f1"] - 0.15
    assert copy["event_f1"] < ema_train["event_f1"] - 0.05


@pytest.mark.slow
def test_the_command_line_writes_table_json_plot_and_tensorboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["--quick", "--iters", "100", "--runs", "supervised", "ema_train", "--workers", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| ema_train | 1 |" in printed and "| supervised | 1 |" in printed

    results = json.loads((tmp_path / "results.json").read_text())
    names = [(run["name"], run["mode"], run["seed"]) for run in results["runs"]]
    assert names == [("supervised", "none", 0), ("ema_train", "ema_train", 0)]
    for run in results["runs"]:
        assert set(run["student"]) == set(SCORES) and run["seconds"] > 0
        assert all(0.0 <= v <= 1.0 for v in run["student"].values())
    assert results["runs"][0]["teacher"] is None and set(results["runs"][1]["teacher"]) == set(SCORES)
    assert "| ema_train |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "f1_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = EventAccumulator(str(tmp_path / "tensorboard" / "ema_train-seed0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/consistency_weight", "train/ema_momentum", "teacher/event_f1", "student/frame_f1"}
    assert expected <= tags
    assert [e.step for e in events.Scalars("teacher/frame_f1")] == [50, 100]


@pytest.mark.slow
def test_the_comparison_runs_each_run_on_two_processes(tmp_path: Path) -> None:
    # The command a user types, in a fresh interpreter: each run on 2 gloo processes through idist.Parallel.
    command = [
        "--quick",
        "--iters",
        "100",
        "--runs",
        "ema_train",
        "--nproc",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "examples.sed_f1", *command], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert (run["name"], run["seed"]) == ("ema_train", 0)
    assert set(run["teacher"]) == set(SCORES) and all(0.0 <= v <= 1.0 for v in run["teacher"].values())
    assert (tmp_path / "tensorboard" / "ema_train-seed0").is_dir()  # written by rank 0
