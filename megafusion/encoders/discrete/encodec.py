"""The ``encodec`` audio tokenizer: a transformers ``EncodecModel`` (neural codec, residual VQ) from a local folder.

Encode: mono waveform at the model's sampling_rate -> ``model.encode(x [1, 1, L], bandwidth=...)`` -> audio_codes
[1, 1, n_q, T] (T = ceil(L / hop_length) frames, n_q residual codebooks for the chosen bandwidth) -> one flat code
sequence, frame-major with per-codebook offsets:

    flat[t * n_q + k] = k * K + audio_codes[k, t]          K = model.config.codebook_size

so codes lie in [0, n_q * K) and ``codebook_size`` = n_q * K (each position's codebook is position % n_q). Decode
reverses the layout (``unflatten_codes`` checks every code sits in its own codebook's range) and runs
``model.decode`` -> float32 waveform of T * hop_length samples, clipped to [-1, 1].

Supported: mono models without chunking or normalisation (the 24 kHz EnCodec family): the chunked / normalised
48 kHz models attach a scale per chunk that a flat code sequence cannot carry, so they are refused at construction.
Config: path (a folder from EncodecModel.save_pretrained), bandwidth (kbps, one of config.target_bandwidths;
default the smallest, stored resolved), device ("cpu"), dtype ("float32"), subfolder (None). Nothing is fetched from
the network; transformers is imported lazily (construction reads the config, the weights load on first use).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from megafusion.encoders.base import DTYPES
from megafusion.encoders.discrete import AudioTokenizer


def _import_encodec():
    try:
        from transformers import EncodecConfig, EncodecModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("discrete tokenizer 'encodec' needs the transformers package: pip install transformers "
                          "safetensors") from exc
    return EncodecConfig, EncodecModel


class EncodecTokenizer(AudioTokenizer):
    name = "encodec"

    def __init__(self, path: str, bandwidth: Optional[float] = None, device: str = "cpu", dtype: str = "float32",
                 subfolder: Optional[str] = None):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"discrete tokenizer encodec: config.path={path!r} is not a local folder holding "
                                    f"a transformers EncodecModel (config.json + weights from save_pretrained)")
        if dtype not in DTYPES:
            raise ValueError(f"discrete tokenizer encodec: config.dtype={dtype!r} is not one of {list(DTYPES)}")
        self.path, self.subfolder = os.path.abspath(path), subfolder
        self.device, self.dtype = str(device), dtype
        cfg_path = os.path.join(self.path, subfolder or "", "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"discrete tokenizer encodec: {cfg_path} is missing; the folder must come from "
                                    f"transformers EncodecModel.save_pretrained")
        EncodecConfig, _ = _import_encodec()
        try:
            cfg = EncodecConfig.from_pretrained(os.path.dirname(cfg_path), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"discrete tokenizer encodec: {cfg_path} is not an Encodec config: {exc}") from exc
        if getattr(cfg, "model_type", None) != "encodec":
            raise ValueError(f"discrete tokenizer encodec: {cfg_path} has model_type {cfg.model_type!r}, not "
                             f"'encodec'; point config.path at an EncodecModel folder")
        if cfg.chunk_length_s is not None or cfg.normalize or cfg.audio_channels != 1:
            raise ValueError(f"discrete tokenizer encodec: {cfg_path}: chunked / normalised / multi-channel models "
                             f"(chunk_length_s={cfg.chunk_length_s}, normalize={cfg.normalize}, audio_channels="
                             f"{cfg.audio_channels}) are not supported: their per-chunk scales do not fit a flat "
                             f"code sequence; use a mono model such as facebook/encodec_24khz")
        targets = [float(b) for b in cfg.target_bandwidths]
        try:
            bandwidth = targets[0] if bandwidth is None else float(bandwidth)
        except (TypeError, ValueError):
            raise ValueError(f"discrete tokenizer encodec: config.bandwidth={bandwidth!r} must be a number, one of "
                             f"{targets} ({cfg_path})") from None
        if bandwidth not in targets:
            raise ValueError(f"discrete tokenizer encodec: config.bandwidth={bandwidth} is not one of the model's "
                             f"target_bandwidths {targets} ({cfg_path})")
        self.bandwidth = bandwidth
        self.sample_rate = int(cfg.sampling_rate)
        self.hop_length = int(cfg.hop_length)
        self.codes_per_entry = int(cfg.codebook_size)  # K: entries of one residual codebook
        # as EncodecResidualVectorQuantizer.get_num_quantizers_for_bandwidth (checked against the model on load)
        bw_per_q = math.log2(self.codes_per_entry) * cfg.frame_rate
        self.num_quantizers = int(max(1, math.floor(bandwidth * 1000 / bw_per_q))) if bandwidth > 0 else \
            int(cfg.num_quantizers)
        self._model = None

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> Dict[str, Any]:
        return {"path": self.path, "bandwidth": self.bandwidth, "device": self.device, "dtype": self.dtype,
                "subfolder": self.subfolder}

    @property
    def codebook_size(self) -> int:
        return self.num_quantizers * self.codes_per_entry

    def code_range(self, position: int) -> Tuple[int, int]:
        """Position j of the frame-major layout holds a code of residual codebook j % n_q."""
        q = position % self.num_quantizers
        return q * self.codes_per_entry, (q + 1) * self.codes_per_entry

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def tokens_for_seconds(self, seconds: float) -> int:
        """Codes for a clip of `seconds`: n_q * ceil(round(seconds * sample_rate) / hop_length)."""
        if seconds < 0:
            raise ValueError(f"discrete tokenizer encodec: seconds={seconds} must be >= 0")
        samples = int(round(float(seconds) * self.sample_rate))
        return self.num_quantizers * -(-samples // self.hop_length)

    def _torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def model(self):
        """The EncodecModel, loaded on first use (eval mode, no gradients)."""
        if self._model is None:
            _, EncodecModel = _import_encodec()
            kwargs = {"local_files_only": True, "dtype": self._torch_dtype()}
            if self.subfolder:
                kwargs["subfolder"] = self.subfolder
            try:
                model = EncodecModel.from_pretrained(self.path, **kwargs)
            except (OSError, ValueError) as exc:
                raise ValueError(f"discrete tokenizer encodec: cannot load an EncodecModel from {self.path}: "
                                 f"{exc}") from exc
            n_q = model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth)
            if n_q != self.num_quantizers:  # pragma: no cover - guards the formula above against transformers changes
                raise RuntimeError(f"discrete tokenizer encodec: {self.path} uses {n_q} quantizers at "
                                   f"{self.bandwidth} kbps, expected {self.num_quantizers}")
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    # ------------------------------------------------------------------ code layout
    def flatten_codes(self, audio_codes) -> np.ndarray:
        """[n_q, T] per-codebook indices in [0, K) -> flat int64 [T * n_q], frame-major, codebook k offset by k*K."""
        grid = np.asarray(audio_codes, dtype=np.int64)
        if grid.ndim != 2 or grid.shape[0] != self.num_quantizers:
            raise ValueError(f"discrete tokenizer encodec: expected audio codes [{self.num_quantizers}, T], got "
                             f"{grid.shape}")
        offsets = np.arange(self.num_quantizers, dtype=np.int64) * self.codes_per_entry
        return (grid.T + offsets[None, :]).reshape(-1)

    def unflatten_codes(self, codes) -> np.ndarray:
        """flat codes [T * n_q] -> [n_q, T] per-codebook indices in [0, K); the inverse of flatten_codes."""
        flat = self.check_codes(codes)
        n_q, size = self.num_quantizers, self.codes_per_entry
        if flat.size % n_q:
            raise ValueError(f"discrete tokenizer encodec: {flat.size} codes is not a whole number of frames of "
                             f"{n_q} codes (one per residual codebook)")
        frames = flat.reshape(-1, n_q)
        slot = frames // size
        wrong = np.nonzero(slot != np.arange(n_q)[None, :])
        if wrong[0].size:
            t, k = int(wrong[0][0]), int(wrong[1][0])
            raise ValueError(f"discrete tokenizer encodec: code {int(frames[t, k])} at position {t * n_q + k} belongs "
                             f"to codebook {int(slot[t, k])}, but position % {n_q} = {k} needs a code in "
                             f"[{k * size}, {(k + 1) * size}) ({wrong[0].size} misplaced codes)")
        return (frames - np.arange(n_q)[None, :] * size).T.copy()

    # ------------------------------------------------------------------ work
    def encode(self, waveform) -> np.ndarray:
        """mono float waveform [L] at sample_rate -> int64 codes [n_q * ceil(L / hop_length)]."""
        import torch

        samples = self.check_waveform(waveform)
        if samples.size == 0:
            return np.zeros(0, dtype=np.int64)
        x = torch.from_numpy(np.clip(samples, -1.0, 1.0))[None, None]
        with torch.no_grad():
            out = self.model.encode(x.to(self.device, self._torch_dtype()), bandwidth=self.bandwidth)
        audio_codes = out.audio_codes  # [1 chunk, 1 batch, n_q, T]
        return self.flatten_codes(audio_codes[0, 0].long().cpu().numpy())

    def decode(self, codes) -> np.ndarray:
        """flat codes [n_q * T] -> float32 waveform [T * hop_length] in [-1, 1] at sample_rate."""
        import torch

        grid = self.unflatten_codes(codes)
        if grid.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        audio_codes = torch.from_numpy(grid)[None, None].to(self.device)  # [1, 1, n_q, T]
        with torch.no_grad():
            audio = self.model.decode(audio_codes, [None]).audio_values
        return np.clip(audio.reshape(-1).float().cpu().numpy(), -1.0, 1.0).astype(np.float32)
