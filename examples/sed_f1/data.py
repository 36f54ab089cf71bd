"""The SED data: synthetic clips through a real front end, or the user's own features, as ``SEDData``.

``synthesize`` makes 16-kHz waveforms (``audio.py``: events of ten classes over
coloured noise) and their log-mel features (``features.py``: STFT, mel
filterbank, log, as in the DCASE baselines), ``N_MELS x N_FRAMES`` (64 x 64)
per 5-s clip. Strong labels are frame activities at the model's output rate
(``LABEL_FRAMES`` = 32 frames of 156.25 ms), from the events' onsets and
offsets. Everything is deterministic from a seed, clip by clip, whatever the
number of processes that make it.

``save_npz_dir`` writes a ``SEDData`` in the layout of ``NPZ_LAYOUT`` and
``load_npz_dir`` reads it back, so the features are made once and every
training process reads them; ``--data DIR`` reads the user's own features in
the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from examples.sed_f1.audio import CLASSES, CLIP_SECONDS, event_roll, synth_clips
from examples.sed_f1.features import LogMel

N_MELS, N_FRAMES = 64, 64
LABEL_FRAMES = 32  # the CRNN's output rate: one label frame per 2 feature frames
FRONT_END = LogMel(n_mels=N_MELS, hop=1250)  # 80,000 samples / 1,250 = 64 frames
CHUNK = 100  # clips per task when the clips are made on several processes


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


# ----------------------------------------------------------------------------- synthetic data


def synth_set(n_clips: int, seed: int, first: int = 0) -> SEDSet:
    """Clips ``first .. first + n_clips - 1`` of the stream ``seed``: log-mel features and strong labels."""
    audio, events = synth_clips(n_clips, seed, first)
    with torch.no_grad():
        x = FRONT_END(torch.from_numpy(audio)).numpy()[:, None]
    return SEDSet(x, event_roll(events, len(CLASSES), LABEL_FRAMES, CLIP_SECONDS / LABEL_FRAMES))


def _synth_chunk(job: tuple[int, int, int]) -> SEDSet:
    return synth_set(*job)


def synthesize(
    n_labelled: int = 300,
    n_unlabelled: int = 2000,
    n_test: int = 400,
    seed: int = 0,
    map_fn: Callable[[Callable[[Any], SEDSet], Iterable[Any]], Iterator[SEDSet]] = map,
) -> SEDData:
    """The three sets, each from its own stream of clips, all from the same distribution.

    ``map_fn`` runs the chunks of ``CHUNK`` clips: ``map`` in this process, or
    a process pool's ``map`` to share the work; the clips are the same either way.
    """
    sizes = {"labelled": n_labelled, "unlabelled": n_unlabelled, "test": n_test}
    jobs = [
        (name, (min(CHUNK, size - first), seed * 1000 + stream, first))
        for stream, (name, size) in enumerate(sizes.items(), start=1)
        for first in range(0, size, CHUNK)
    ]
    parts: dict[str, list[SEDSet]] = {name: [] for name in sizes}
    for (name, _), part in zip(jobs, map_fn(_synth_chunk, [job for _, job in jobs]), strict=True):
        parts[name].append(part)
    sets = {
        name: SEDSet(np.concatenate([p.x for p in chunks]), np.concatenate([p.y for p in chunks]))
        for name, chunks in parts.items()
    }
    return SEDData(tuple(CLASSES), sets["labelled"], sets["unlabelled"], sets["test"], CLIP_SECONDS / LABEL_FRAMES)


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


def save_npz_dir(data: SEDData, directory: Path) -> None:
    """Write ``data`` in the layout of :data:`NPZ_LAYOUT` (``load_npz_dir`` reads it back unchanged)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("labelled", "unlabelled", "test"):
        part: SEDSet = getattr(data, name)
        np.savez(
            directory / f"{name}.npz",
            features=part.x[:, 0],
            labels=part.y,
            classes=np.array(data.classes),
            frame_seconds=np.array(data.frame_seconds),
        )
