"""The ``mulaw`` audio tokenizer: weight-free mu-law companding + uniform quantisation (tests, demos, baselines).

Encode (mono float waveform at ``sample_rate``, values clipped to [-1, 1]):

    1. box-filter decimation by ``hop``: each code covers ``hop`` samples, their mean (a last, shorter group is
       averaged over the samples it has), so n = ceil(len / hop);
    2. mu-law companding with mu = levels - 1:  y = sign(x) * ln(1 + mu |x|) / ln(1 + mu)   (y in [-1, 1]);
    3. uniform quantisation of y to ``levels`` bins of width 2 / levels: code = floor((y + 1) / 2 * levels).

Decode maps each code to its bin centre y_c = (2 c + 1) / levels - 1, expands it (x = sign(y) ((1 + mu)^|y| - 1)
/ mu) and repeats each sample ``hop`` times. Bin centres re-encode to themselves, so encode(decode(codes)) ==
codes exactly. Config: sample_rate (default 4000), levels (default 64, 2..65536), hop (default 1).
"""

from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from megafusion.encoders.discrete import AudioTokenizer


def mulaw_compress(x: np.ndarray, mu: float) -> np.ndarray:
    """float [-1, 1] -> companded float [-1, 1] (float64)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    return np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)


def mulaw_expand(y: np.ndarray, mu: float) -> np.ndarray:
    """companded float [-1, 1] -> float [-1, 1] (float64); the inverse of mulaw_compress."""
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu


class MuLawTokenizer(AudioTokenizer):
    name = "mulaw"

    def __init__(self, sample_rate: int = 4000, levels: int = 64, hop: int = 1):
        for field, value, low in (("sample_rate", sample_rate, 1), ("levels", levels, 2), ("hop", hop, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
                raise ValueError(f"discrete tokenizer mulaw: config.{field}={value!r} must be an integer >= {low}")
        if int(levels) > 65536:
            raise ValueError(f"discrete tokenizer mulaw: config.levels={levels} must be at most 65536")
        self.sample_rate, self.levels, self.hop = int(sample_rate), int(levels), int(hop)
        self.mu = float(self.levels - 1)

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> Dict[str, Any]:
        return {"sample_rate": self.sample_rate, "levels": self.levels, "hop": self.hop}

    @property
    def codebook_size(self) -> int:
        return self.levels

    @property
    def codes_per_second(self) -> float:
        return self.sample_rate / self.hop

    def tokens_for_seconds(self, seconds: float) -> int:
        """Codes for a clip of `seconds`: ceil(round(seconds * sample_rate) / hop)."""
        if seconds < 0:
            raise ValueError(f"discrete tokenizer mulaw: seconds={seconds} must be >= 0")
        samples = int(round(float(seconds) * self.sample_rate))
        return -(-samples // self.hop)

    # ------------------------------------------------------------------ work
    def _decimate(self, waveform: np.ndarray) -> np.ndarray:
        if self.hop == 1 or waveform.size == 0:
            return waveform.astype(np.float64)
        n = -(-waveform.size // self.hop)
        padded = np.zeros(n * self.hop, dtype=np.float64)
        padded[:waveform.size] = waveform
        sums = padded.reshape(n, self.hop).sum(axis=1)
        counts = np.full(n, self.hop, dtype=np.float64)
        counts[-1] = waveform.size - (n - 1) * self.hop
        return sums / counts

    def encode(self, waveform) -> np.ndarray:
        """mono float waveform [n_samples] at sample_rate -> int64 codes [ceil(n_samples / hop)]."""
        samples = self._decimate(np.clip(self.check_waveform(waveform), -1.0, 1.0))
        y = mulaw_compress(samples, self.mu)
        codes = np.floor((y + 1.0) * 0.5 * self.levels)
        return np.clip(codes, 0, self.levels - 1).astype(np.int64)

    def decode(self, codes) -> np.ndarray:
        """int codes [n] -> float32 waveform [n * hop] in [-1, 1] at sample_rate."""
        codes = self.check_codes(codes)
        centres = (2.0 * codes + 1.0) / self.levels - 1.0
        samples = np.clip(mulaw_expand(centres, self.mu), -1.0, 1.0).astype(np.float32)
        return np.repeat(samples, self.hop) if self.hop > 1 else samples
