"""Synthetic sound scenes as 16-kHz waveforms: events of ten distinct spectro-temporal shapes over coloured noise.

Each 5-s clip is a coloured-noise background (a random spectral slope, from
pink to brown) with 1-3 events, possibly overlapping, at random onsets,
durations and levels. Each class is made by its own generator (a voiced
harmonic sound, sweeps up and down, a whistle, a pulsed alarm, broadband and
band-limited noises, an engine's rumble, clicks, a struck bell), scaled to a
signal-to-noise ratio against the background, with 10-ms fades. Everything is
deterministic from a seed, clip by clip, so clips can be made in any order and
on any number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
CLIP_SECONDS = 5.0  # DCASE's clips are 10 s; 5 s halves the CRNN's cost, which two CPU cores need
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)
EVENTS_PER_CLIP = (1, 3)  # inclusive
SNR_DB = (0.0, 15.0)  # event RMS against the background's, over the event
FADE_SECONDS = 0.01

Rng = np.random.Generator
Generator = Callable[[Rng, int], np.ndarray]  # (rng, samples) -> waveform, any scale


@dataclass(frozen=True)
class Event:
    """One event of a clip: class index and its onset and offset in seconds."""

    label: int
    onset: float
    offset: float


# ----------------------------------------------------------------------------- building blocks


def _seconds(n: int) -> np.ndarray:
    return np.arange(n) / SAMPLE_RATE


def _phase(frequency: np.ndarray | float, n: int) -> np.ndarray:
    """The phase (radians) of a sine of instantaneous frequency ``frequency`` (Hz, a constant or one per sample)."""
    hz = np.broadcast_to(np.asarray(frequency, dtype=np.float64), (n,))
    phase: np.ndarray = 2 * np.pi * np.cumsum(hz) / SAMPLE_RATE
    return phase


def _sine(frequency: np.ndarray | float, n: int, rng: Rng) -> np.ndarray:
    return np.sin(_phase(frequency, n) + rng.uniform(0, 2 * np.pi))


def _fft_length(n: int) -> int:
    """``n`` rounded up to a multiple of 4,096: an FFT length with small factors (an event's own length can be
    prime, and its FFT 10 times slower)."""
    return -(-n // 4096) * 4096


def _filtered(signal: np.ndarray, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``signal`` filtered in the frequency domain by ``gain(frequencies in Hz)``, in float32 (twice as fast)."""
    m = _fft_length(len(signal))
    return _from_spectrum(np.fft.rfft(signal.astype(np.float32), m), m, gain)[: len(signal)]


def _shaped_noise(rng: Rng, n: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``n`` samples of Gaussian noise with the amplitude spectrum ``gain(frequencies in Hz)``, drawn in the
    frequency domain."""
    m = _fft_length(n)
    real, imaginary = rng.standard_normal((2, m // 2 + 1), dtype=np.float32)
    return _from_spectrum(real + 1j * imaginary, m, gain)[:n]


def _from_spectrum(spectrum: np.ndarray, m: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    weights = gain(np.fft.rfftfreq(m, 1 / SAMPLE_RATE).astype(np.float32))
    out: np.ndarray = np.fft.irfft(spectrum.astype(np.complex64) * weights, m)
    return out.astype(np.float64)


def _harmonics(phase: np.ndarray, weights: list[float]) -> np.ndarray:
    """``sum_k weights[k - 1] sin(k phase)``, by powers of ``exp(i phase)``: a complex product per harmonic, no sine."""
    unit = np.exp(1j * phase)
    power = unit.copy()
    out = np.zeros(len(phase))
    for weight in weights:
        out += weight * power.imag
        power *= unit
    return out


def _band(centre: float, width: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda f: np.exp(-0.5 * ((f - centre) / width) ** 2)


def _slow_envelope(rng: Rng, n: int, rate_hz: float) -> np.ndarray:
    """A random positive envelope that changes at about ``rate_hz``, between 0.2 and 1."""
    knots = rng.uniform(0.2, 1.0, size=max(2, int(n / SAMPLE_RATE * rate_hz) + 2))
    envelope: np.ndarray = np.interp(np.linspace(0, len(knots) - 1, n), np.arange(len(knots)), knots)
    return envelope


# ----------------------------------------------------------------------------- the classes


def speech(rng: Rng, n: int) -> np.ndarray:
    """Voiced sound: a harmonic stack on a gliding fundamental, two formants, syllable-rate amplitude."""
    t = _seconds(n)
    f0 = rng.uniform(100, 220) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 6)))
    phase = _phase(f0, n)
    formants = (rng.uniform(400, 800), rng.uniform(1100, 2200))
    harmonics = [k * f0.mean() for k in range(1, int(4000 / f0.max()) + 1)]
    weights = [sum(float(np.exp(-0.5 * ((h - f) / 250) ** 2)) for f in formants) + 0.05 for h in harmonics]
    out = _harmonics(phase, weights)
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6))
    return out * (0.15 + 0.85 * syllables)


def rising_chirp(rng: Rng, n: int) -> np.ndarray:
    """An exponential sweep up by a factor of 3 to 6 from 300-800 Hz."""
    start, ratio = rng.uniform(300, 800), rng.uniform(3, 6)
    return _sine(start * ratio ** (np.arange(n) / n), n, rng)


def falling_chirp(rng: Rng, n: int) -> np.ndarray:
    """An exponential sweep down by a factor of 3 to 6 from 3-6 kHz."""
    start, ratio = rng.uniform(3000, 6000), rng.uniform(3, 6)
    return _sine(start / ratio ** (np.arange(n) / n), n, rng)


def whistle(rng: Rng, n: int) -> np.ndarray:
    """A high tone (2.5-5 kHz) with a slight vibrato."""
    t = _seconds(n)
    return _sine(rng.uniform(2500, 5000) * (1 + 0.01 * np.sin(2 * np.pi * 5 * t)), n, rng)


def alarm(rng: Rng, n: int) -> np.ndarray:
    """A beeping alarm: a 0.8-1.5 kHz tone and its second harmonic, on and off every 0.2-0.4 s."""
    f, period = rng.uniform(800, 1500), rng.uniform(0.2, 0.4)
    gate = (_seconds(n) % period) < period / 2
    return (_sine(f, n, rng) + 0.5 * _sine(2 * f, n, rng)) * gate


def vacuum(rng: Rng, n: int) -> np.ndarray:
    """A vacuum cleaner: steady broadband noise above 100 Hz with a gentle slope."""
    slope = rng.uniform(0.0, 0.5)
    return _shaped_noise(rng, n, lambda f: (f > 100) / np.maximum(f, 100) ** slope)


def engine(rng: Rng, n: int) -> np.ndarray:
    """An engine: noise below about 300 Hz and a low harmonic series (25-60 Hz), slowly varying."""
    f0 = rng.uniform(25, 60)
    rumble = _shaped_noise(rng, n, lambda f: 1 / (1 + (f / 200) ** 4))
    rumble /= rumble.std() + 1e-12
    harmonics = _harmonics(_phase(f0, n), [1 / k for k in range(1, 9)])
    out: np.ndarray = (rumble + harmonics) * _slow_envelope(rng, n, 2.0)
    return out


def dishes(rng: Rng, n: int) -> np.ndarray:
    """Dishes: clicks of high-passed noise, 3-15 ms long, every 80-300 ms."""
    out = np.zeros(n)
    position = 0
    while position < n:
        length = int(rng.uniform(0.003, 0.015) * SAMPLE_RATE)
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 4))
        out[position : position + length] += burst[: n - position] * rng.uniform(0.5, 1.0)
        position += int(rng.uniform(0.08, 0.3) * SAMPLE_RATE)
    return _filtered(out, lambda f: 1 / (1 + (2000 / np.maximum(f, 1)) ** 4))


def water(rng: Rng, n: int) -> np.ndarray:
    """Running water: a noise band around 1-3 kHz with a fluttering amplitude."""
    centre = rng.uniform(1000, 3000)
    out: np.ndarray = _shaped_noise(rng, n, _band(centre, 0.25 * centre)) * _slow_envelope(rng, n, 8.0)
    return out


def bell(rng: Rng, n: int) -> np.ndarray:
    """A struck bell, struck every 0.4-1 s: inharmonic partials (1, 2, 2.76, 5.4 x 0.5-1.2 kHz) decaying."""
    f = rng.uniform(500, 1200)
    partials = sum(a * _sine(r * f, n, rng) for r, a in ((1.0, 1.0), (2.0, 0.6), (2.76, 0.4), (5.4, 0.25)))
    period, decay = rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.4)
    since_strike = _seconds(n) % period
    return partials * np.exp(-since_strike / decay)


# name -> (generator, shortest and longest duration in seconds)
CLASSES: dict[str, tuple[Generator, float, float]] = {
    "speech": (speech, 0.5, 2.5),
    "rising_chirp": (rising_chirp, 0.4, 2.0),
    "falling_chirp": (falling_chirp, 0.4, 2.0),
    "whistle": (whistle, 0.3, 2.0),
    "alarm": (alarm, 1.0, 3.0),
    "vacuum": (vacuum, 1.5, 4.5),
    "engine": (engine, 1.5, 4.5),
    "dishes": (dishes, 0.5, 2.0),
    "water": (water, 1.0, 4.0),
    "bell": (bell, 1.0, 3.0),
}


# ----------------------------------------------------------------------------- clips


def background(rng: Rng, n: int = CLIP_SAMPLES) -> np.ndarray:
    """Coloured noise with a spectral slope between pink (1/f power) and brown (1/f^2), above 20 Hz."""
    slope = rng.uniform(0.5, 1.0)  # amplitude ~ f^-slope
    noise = _shaped_noise(rng, n, lambda f: (f > 20) / np.maximum(f, 20) ** slope)
    scaled: np.ndarray = noise * (rng.uniform(0.01, 0.05) / (noise.std() + 1e-12))
    return scaled


def synth_clip(rng: Rng) -> tuple[np.ndarray, list[Event]]:
    """One clip: a float32 waveform of ``CLIP_SAMPLES`` samples and its events."""
    generators = list(CLASSES.values())
    audio = background(rng)
    noise_rms = audio.std()
    fade = int(FADE_SECONDS * SAMPLE_RATE)
    events = []
    for _ in range(int(rng.integers(EVENTS_PER_CLIP[0], EVENTS_PER_CLIP[1] + 1))):
        label = int(rng.integers(len(generators)))
        make, shortest, longest = generators[label]
        n = int(rng.uniform(shortest, longest) * SAMPLE_RATE)
        onset = int(rng.integers(0, CLIP_SAMPLES - n + 1))
        wave = make(rng, n)
        ramp = np.minimum(1.0, np.minimum(np.arange(n) + 1, np.arange(n, 0, -1)) / fade)
        wave = wave * ramp
        wave *= noise_rms * 10 ** (rng.uniform(*SNR_DB) / 20) / (wave.std() + 1e-12)
        audio[onset : onset + n] += wave
        events.append(Event(label, onset / SAMPLE_RATE, (onset + n) / SAMPLE_RATE))
    return audio.astype(np.float32), events


def synth_clips(n_clips: int, seed: int, first: int = 0) -> tuple[np.ndarray, list[list[Event]]]:
    """Clips ``first .. first + n_clips - 1`` of the stream ``seed``: each clip from its own generator."""
    audio = np.empty((n_clips, CLIP_SAMPLES), dtype=np.float32)
    events = []
    for i in range(n_clips):
        audio[i], clip_events = synth_clip(np.random.default_rng([seed, first + i]))
        events.append(clip_events)
    return audio, events


def event_roll(events: list[list[Event]], n_classes: int, frames: int, frame_seconds: float) -> np.ndarray:
    """Strong labels ``[clips, frames, classes]``: frame ``i`` of a class is 1 when one of its events overlaps
    ``[i * frame_seconds, (i + 1) * frame_seconds)``."""
    roll = np.zeros((len(events), frames, n_classes), dtype=np.float32)
    for clip, clip_events in enumerate(events):
        for event in clip_events:
            first = int(np.floor(event.onset / frame_seconds))
            end = min(frames, int(np.ceil(event.offset / frame_seconds)))
            roll[clip, first:end, event.label] = 1.0
    return roll
