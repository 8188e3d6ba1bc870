"""The demo's sounds: five tone classes (three steady sine tones and two glides) and the FFT classifier that
scores generated clips.

    low 100 Hz | medium 200 Hz | high 320 Hz | rising 100 -> 320 Hz | falling 320 -> 100 Hz

`classify(waveform, rate)`: the dominant frequency (peak of the Hann-windowed magnitude spectrum, DC removed) of
each half of the clip; a glide when the halves differ by more than GLIDE_HZ (rising / falling by the sign), else
the steady class whose frequency is nearest the whole clip's peak. Chance is 1 / 5.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

STEADY: Dict[str, float] = {"low": 100.0, "medium": 200.0, "high": 320.0}
GLIDES: Dict[str, Tuple[float, float]] = {"rising": (100.0, 320.0), "falling": (320.0, 100.0)}
CLASSES = tuple(STEADY) + tuple(GLIDES)
GLIDE_HZ = 60.0
PHRASES = {
    "low": ("a low tone", "a deep beep", "a low hum", "a low note"),
    "medium": ("a medium tone", "a middle beep", "a medium note", "a tone in the middle"),
    "high": ("a high tone", "a sharp beep", "a high whistle", "a high note"),
    "rising": ("a rising tone", "a tone going up", "a rising whistle", "a rising note"),
    "falling": ("a falling tone", "a tone going down", "a falling whistle", "a falling note"),
}


def tone(kind: str, rate: int, seconds: float, amplitude: float = 0.7, phase: float = 0.0) -> np.ndarray:
    """float32 waveform of class `kind` at `rate` Hz."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    if kind in STEADY:
        arg = 2 * np.pi * STEADY[kind] * t + phase
    elif kind in GLIDES:
        f0, f1 = GLIDES[kind]
        arg = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t ** 2) + phase  # linear chirp
    else:
        raise ValueError(f"tone kind {kind!r} is not one of {CLASSES}")
    return (amplitude * np.sin(arg)).astype(np.float32)


def dominant_frequency(waveform: np.ndarray, rate: int) -> float:
    x = np.asarray(waveform, dtype=np.float64)
    if x.size < 4:
        return 0.0
    x = (x - x.mean()) * np.hanning(x.size)
    n = max(1024, x.size)
    spectrum = np.abs(np.fft.rfft(x, n=n))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(n, 1.0 / rate)[int(np.argmax(spectrum))])


def classify(waveform: np.ndarray, rate: int) -> Optional[str]:
    """The tone class of a clip (None when it is silent)."""
    x = np.asarray(waveform, dtype=np.float64)
    if x.size < 8 or np.abs(x - x.mean()).max() < 1e-3:
        return None
    half = x.size // 2
    first, second = dominant_frequency(x[:half], rate), dominant_frequency(x[half:], rate)
    if second - first > GLIDE_HZ:
        return "rising"
    if first - second > GLIDE_HZ:
        return "falling"
    peak = dominant_frequency(x, rate)
    return min(STEADY, key=lambda k: abs(STEADY[k] - peak))
