"""WAV input/output and resampling for the audio tokenizers (standard library ``wave`` + numpy; no audio package).

- ``read_wav(path_or_bytes) -> (float32 mono waveform in [-1, 1], sample_rate)``: integer PCM WAV, 8-bit
  (unsigned), 16-, 24- or 32-bit (signed); channels are averaged. Anything else (not a WAV, float or compressed
  WAV, a truncated file) raises a ValueError naming the file and the fix.
- ``write_wav(path, waveform, sample_rate)``: mono 16-bit PCM (x * 2^15, clipped), atomic (a temporary file in the
  same folder, then os.replace), so a reader never sees half a file.
- ``resample(waveform, src_rate, dst_rate)``: linear interpolation (numpy.interp) on the output sample times
  i * src_rate / dst_rate; when downsampling, a box (moving-average) pre-filter of width round(src_rate / dst_rate)
  first damps the content above the new Nyquist frequency. Cheap and dependency-free, not studio quality: use a
  polyphase resampler upstream when aliasing matters. Output length: round(len * dst_rate / src_rate).
"""

from __future__ import annotations

import io
import os
import tempfile
import wave
from typing import Tuple, Union

import numpy as np

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of WAV data>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def _pcm_to_float(frames: bytes, width: int) -> np.ndarray:
    if width == 1:  # unsigned 8-bit
        return (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:  # 24-bit little-endian: sign-extend into int32
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        return values.astype(np.float32) / float(1 << 23)
    if width == 4:
        return (np.frombuffer(frames, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    raise ValueError(f"unsupported sample width {width * 8} bits")


def read_wav(path_or_bytes: PathOrBytes) -> Tuple[np.ndarray, int]:
    """A PCM WAV file (path or bytes) -> (float32 mono waveform in [-1, 1], sample_rate); channels averaged."""
    name = _describe(path_or_bytes)
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(path_or_bytes))
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        if not os.path.isfile(path_or_bytes):
            raise FileNotFoundError(f"read_wav: {name} does not exist (or is not a file)")
        source = os.fspath(path_or_bytes)
    else:
        raise ValueError(f"read_wav: expected a path or bytes, got {type(path_or_bytes).__name__}")
    try:
        with wave.open(source, "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            n_frames = wav.getnframes()
            frames = wav.readframes(n_frames)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"read_wav: {name} is not a readable PCM WAV file ({exc}); convert it to 16-bit PCM WAV, "
                         f"e.g. `ffmpeg -i in -acodec pcm_s16le out.wav`") from exc
    if channels < 1 or rate <= 0:
        raise ValueError(f"read_wav: {name} declares {channels} channels at {rate} Hz; the header is corrupt")
    try:
        samples = _pcm_to_float(frames[:len(frames) - len(frames) % (width * channels)], width)
    except ValueError as exc:
        raise ValueError(f"read_wav: {name}: {exc}; supported: 8-, 16-, 24- and 32-bit integer PCM") from exc
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


def write_wav(path: Union[str, os.PathLike], waveform, sample_rate: int) -> str:
    """Mono float waveform (clipped to [-1, 1]) -> 16-bit PCM WAV at `path`, written atomically. Returns the path."""
    if hasattr(waveform, "detach"):
        waveform = waveform.detach().cpu().numpy()
    samples = np.asarray(waveform, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"write_wav: {os.fspath(path)}: expected a mono 1-D waveform, got shape {samples.shape}")
    if int(sample_rate) <= 0:
        raise ValueError(f"write_wav: {os.fspath(path)}: sample_rate={sample_rate} must be positive")
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    # the same scale read_wav divides by (2^15), so a write/read round trip is exact to half a step; +1.0 clips
    pcm = np.clip(np.rint(np.clip(samples, -1.0, 1.0) * 32768.0), -32768, 32767).astype("<i2")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".wav", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            with wave.open(handle, "wb") as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(int(sample_rate))
                wav.writeframes(pcm.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def resample(waveform, src_rate: int, dst_rate: int, antialias: bool = True) -> np.ndarray:
    """float waveform [n] at src_rate -> float32 [round(n * dst_rate / src_rate)] at dst_rate (linear interp)."""
    if int(src_rate) <= 0 or int(dst_rate) <= 0:
        raise ValueError(f"resample: rates must be positive, got src_rate={src_rate} dst_rate={dst_rate}")
    if hasattr(waveform, "detach"):
        waveform = waveform.detach().cpu().numpy()
    samples = np.asarray(waveform, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"resample: expected a mono 1-D waveform, got shape {samples.shape}")
    src_rate, dst_rate = int(src_rate), int(dst_rate)
    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.float32)
    width = int(round(src_rate / dst_rate))
    if antialias and width > 1:
        # centred moving average; edges average over the samples that exist (no zero-padding dip)
        kernel = np.ones(width)
        sums = np.convolve(samples, kernel, mode="same")
        counts = np.convolve(np.ones_like(samples), kernel, mode="same")
        samples = sums / counts
    n_out = max(1, int(round(samples.size * dst_rate / src_rate)))
    times = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    return np.interp(times, np.arange(samples.size, dtype=np.float64), samples).astype(np.float32)
