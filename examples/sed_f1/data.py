"""Synthetic sound-event-detection data, made directly as log-mel spectrograms (no audio, no download).

Each clip is ``N_MELS x N_FRAMES`` (64 x 128, 10 s) of coloured background
noise with 1-4 events from ``CLASSES``, possibly overlapping, at random onsets,
durations and levels. Every class has its own time-frequency shape (harmonic
stacks, chirps, tones, noise bands, impulse trains...), mixed in the power
domain and then taken to decibels, as a real log-mel front end would.
Strong labels are frame activities at the model's output rate (64 frames).

Everything is deterministic from a seed. ``load_npz_dir`` reads the same
layout from disk, so the experiment can run on real features instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_MELS, N_FRAMES, CLIP_SECONDS = 64, 128, 10.0
LABEL_FRAMES = 64  # the CRNN's output rate: one label frame per 2 input frames
FRAME_SECONDS = CLIP_SECONDS / N_FRAMES

Rng = np.random.Generator
Shape = Callable[[Rng, int], np.ndarray]  # (rng, duration in frames) -> power pattern [N_MELS, duration]


@dataclass(frozen=True)
class SEDSet:
    """Features ``x`` [clips, 1, mels, frames] (float32, dB) and strong labels ``y`` [clips, LABEL_FRAMES, classes]."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class SEDData:
    classes: tuple[str, ...]
    labelled: SEDSet
    unlabelled: SEDSet  # its labels are never used in training
    test: SEDSet
    frame_seconds: float  # duration of one label frame


# ----------------------------------------------------------------------------- event shapes


def _bins() -> np.ndarray:
    return np.arange(N_MELS, dtype=np.float64)[:, None]


def _band(centre: np.ndarray | float, width: float) -> np.ndarray:
    """A Gaussian bump over the mel bins, per frame when ``centre`` is a row."""
    return np.exp(-0.5 * ((_bins() - centre) / width) ** 2)


def harmonic_stack(rng: Rng, n: int) -> np.ndarray:
    """A voiced sound: a low fundamental with decaying harmonics and a little vibrato."""
    f0 = rng.uniform(3.0, 7.0)
    vibrato = 1 + 0.04 * np.sin(2 * np.pi * np.arange(n) / rng.uniform(6, 12))
    return sum((0.7**k) * _band(f0 * (k + 1) * vibrato, 0.8) for k in range(6))  # type: ignore[return-value]


def rising_chirp(rng: Rng, n: int) -> np.ndarray:
    start = rng.uniform(8, 20)
    return _band(np.linspace(start, start + rng.uniform(20, 35), n), 1.2)


def falling_chirp(rng: Rng, n: int) -> np.ndarray:
    start = rng.uniform(40, 58)
    return _band(np.linspace(start, start - rng.uniform(20, 35), n), 1.2)


def high_tone(rng: Rng, n: int) -> np.ndarray:
    return np.repeat(_band(rng.uniform(44, 58), 0.7), n, axis=1)


def pulsed_tone(rng: Rng, n: int) -> np.ndarray:
    """An alarm: a mid tone switched on and off every few frames."""
    period = int(rng.integers(4, 7))
    gate = (np.arange(n) % period) < period // 2
    return _band(rng.uniform(24, 34), 0.8) * gate


def broadband_noise(rng: Rng, n: int) -> np.ndarray:
    tilt = np.exp(-_bins() / rng.uniform(30, 60))
    return np.repeat(tilt, n, axis=1) * rng.uniform(0.5, 1.0, size=(N_MELS, n))


def low_rumble(rng: Rng, n: int) -> np.ndarray:
    return np.repeat(_band(rng.uniform(2, 6), 3.0), n, axis=1) * rng.uniform(0.4, 1.0, size=(N_MELS, n))


def impulse_train(rng: Rng, n: int) -> np.ndarray:
    """Clicks: broadband frames at irregular intervals, as from dishes or footsteps."""
    clicks = np.zeros(n)
    clicks[:: int(rng.integers(3, 6))] = 1.0
    clicks[0] = 1.0
    return np.repeat(np.exp(-_bins() / 40.0), n, axis=1) * clicks


def mid_noise_band(rng: Rng, n: int) -> np.ndarray:
    """Running water: a noisy band in the middle of the spectrum."""
    return np.repeat(_band(rng.uniform(26, 36), 4.0), n, axis=1) * rng.uniform(0.3, 1.0, size=(N_MELS, n))


def tremolo_tone(rng: Rng, n: int) -> np.ndarray:
    """A tone with a slow, deep amplitude modulation."""
    depth = 0.5 + 0.5 * np.sin(2 * np.pi * np.arange(n) / rng.uniform(8, 14))
    pattern: np.ndarray = _band(rng.uniform(12, 20), 0.8) * depth
    return pattern


# name -> (shape, shortest and longest duration in seconds)
CLASSES: dict[str, tuple[Shape, float, float]] = {
    "speech": (harmonic_stack, 0.5, 3.0),
    "rising_chirp": (rising_chirp, 0.4, 2.0),
    "falling_chirp": (falling_chirp, 0.4, 2.0),
    "whistle": (high_tone, 0.3, 2.5),
    "alarm": (pulsed_tone, 1.0, 4.0),
    "vacuum": (broadband_noise, 2.0, 8.0),
    "engine": (low_rumble, 2.0, 8.0),
    "dishes": (impulse_train, 0.5, 2.5),
    "water": (mid_noise_band, 1.5, 6.0),
    "bell": (tremolo_tone, 1.0, 4.0),
}


# ----------------------------------------------------------------------------- clips


def synth_clip(rng: Rng, shapes: list[tuple[Shape, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """One clip: log-mel [N_MELS, N_FRAMES] in dB and frame activity [N_FRAMES, classes]."""
    tilt = np.exp(-_bins() / rng.uniform(20, 50))
    power = rng.uniform(0.02, 0.08) * tilt * rng.exponential(1.0, size=(N_MELS, N_FRAMES))
    active = np.zeros((N_FRAMES, len(shapes)), dtype=np.float32)
    for _ in range(int(rng.integers(1, 5))):
        label = int(rng.integers(len(shapes)))
        shape, shortest, longest = shapes[label]
        duration = max(2, round(rng.uniform(shortest, longest) / FRAME_SECONDS))
        onset = int(rng.integers(0, N_FRAMES - duration + 1))
        level = 10 ** (rng.uniform(-5.0, 10.0) / 10)  # -5 to +10 dB against a unit reference
        envelope = np.minimum(1.0, np.minimum(np.arange(1, duration + 1), np.arange(duration, 0, -1)) / 2)
        power[:, onset : onset + duration] += level * shape(rng, duration) * envelope
        active[onset : onset + duration, label] = 1.0
    log_mel = 10 * np.log10(power + 1e-6)
    return log_mel.astype(np.float32), active


def synth_set(n_clips: int, seed: int) -> SEDSet:
    """``n_clips`` clips from their own stream of random numbers."""
    rng = np.random.default_rng(seed)
    shapes = list(CLASSES.values())
    x = np.empty((n_clips, 1, N_MELS, N_FRAMES), dtype=np.float32)
    y = np.empty((n_clips, N_FRAMES, len(shapes)), dtype=np.float32)
    for i in range(n_clips):
        x[i, 0], y[i] = synth_clip(rng, shapes)
    return SEDSet(x, to_label_rate(y, LABEL_FRAMES))


def to_label_rate(activity: np.ndarray, label_frames: int) -> np.ndarray:
    """Frame activity [clips, frames, classes] at ``label_frames`` per clip: active if active in any input frame."""
    clips, frames, classes = activity.shape
    if frames % label_frames:
        raise ValueError(f"{frames} frames cannot be pooled to {label_frames} label frames")
    pooled: np.ndarray = activity.reshape(clips, label_frames, frames // label_frames, classes).max(axis=2)
    return pooled


def synthesize(n_labelled: int = 300, n_unlabelled: int = 2000, n_test: int = 400, seed: int = 0) -> SEDData:
    """The three sets, each from its own seed, all from the same distribution."""
    return SEDData(
        classes=tuple(CLASSES),
        labelled=synth_set(n_labelled, seed * 1000 + 1),
        unlabelled=synth_set(n_unlabelled, seed * 1000 + 2),
        test=synth_set(n_test, seed * 1000 + 3),
        frame_seconds=CLIP_SECONDS / LABEL_FRAMES,
    )


# ----------------------------------------------------------------------------- real features from disk

NPZ_LAYOUT = """\
--data DIR holds labelled.npz, unlabelled.npz and test.npz, each with
  features: float32 [clips, mels, frames]   log-mel features (mels a multiple of 16, at least 32;
                                             frames a multiple of 2)
  labels:   0/1     [clips, frames/2, classes]  strong labels at half the feature frame rate
            (unlabelled.npz may omit labels)
and one of them (or every one) with
  classes:        str [classes]  class names
  frame_seconds:  float          duration of one label frame in seconds"""


def load_npz_dir(directory: Path) -> SEDData:
    """Read real features in the layout of :data:`NPZ_LAYOUT`."""
    sets: dict[str, SEDSet] = {}
    classes: tuple[str, ...] | None = None
    frame_seconds: float | None = None
    for name in ("labelled", "unlabelled", "test"):
        path = directory / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; expected this layout:\n{NPZ_LAYOUT}")
        with np.load(path, allow_pickle=False) as archive:
            if "features" not in archive:
                raise ValueError(f"{path} has no 'features' array; expected this layout:\n{NPZ_LAYOUT}")
            x = archive["features"].astype(np.float32)
            # The CRNN divides frequency by 32 (see model.py) and time by 2.
            if x.ndim != 3 or x.shape[1] % 16 or x.shape[1] < 32 or x.shape[2] % 2:
                raise ValueError(
                    f"{path}: features must be [clips, mels (a multiple of 16, at least 32), frames (even)]; "
                    f"found {x.shape}"
                )
            if "labels" in archive:
                y = archive["labels"].astype(np.float32)
            elif name == "unlabelled":
                y = np.zeros((len(x), x.shape[2] // 2, 0), dtype=np.float32)
            else:
                raise ValueError(f"{path} has no 'labels' array; expected this layout:\n{NPZ_LAYOUT}")
            if y.shape[:2] != (len(x), x.shape[2] // 2):
                raise ValueError(
                    f"{path}: labels must be [clips, frames/2, classes] = [{len(x)}, {x.shape[2] // 2}, "
                    f"classes]; found {y.shape}"
                )
            if "classes" in archive:
                classes = tuple(str(c) for c in archive["classes"])
            if "frame_seconds" in archive:
                frame_seconds = float(archive["frame_seconds"])
            sets[name] = SEDSet(x[:, None], y)
    if classes is None or frame_seconds is None or not math.isfinite(frame_seconds):
        raise ValueError(f"no 'classes' or 'frame_seconds' array in {directory}; expected this layout:\n{NPZ_LAYOUT}")
    for name in ("labelled", "test"):
        if sets[name].y.shape[2] != len(classes):
            raise ValueError(f"{name}.npz has {sets[name].y.shape[2]} label columns for {len(classes)} classes")
    if not (sets["labelled"].x.shape[1:] == sets["unlabelled"].x.shape[1:] == sets["test"].x.shape[1:]):
        raise ValueError("labelled, unlabelled and test features must have the same [mels, frames]")
    return SEDData(classes, sets["labelled"], sets["unlabelled"], sets["test"], frame_seconds)
