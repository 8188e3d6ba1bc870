"""Frozen discrete tokenizers (image / audio -> codebook codes -> back) and their registry.

This module owns the `DiscreteTokenizer` interface and ``build_discrete_tokenizer(spec)``. A spec is the JSON-able
dict ``{"name": ..., "config": {...}}`` that datasets and checkpoints store; ``tok.spec()`` returns the full spec
(defaults filled in), and ``build_discrete_tokenizer(tok.spec())`` rebuilds an equal tokenizer.

Built in: ``palette`` (image, no weights), ``vq`` (image, diffusers VQModel from a local folder), ``mulaw`` (audio,
no weights), ``encodec`` (audio, transformers EncodecModel from a local folder). ``register_discrete_tokenizer``
adds a name; a name "package.module:Class" imports a custom DiscreteTokenizer subclass. diffusers / transformers are
imported only when a ``vq`` / ``encodec`` tokenizer is built.

Every tokenizer exposes ``modality`` ("image" | "audio"), ``codebook_size`` (codes lie in [0, codebook_size)),
``encode`` -> int64 codes and ``decode``. Image tokenizers add ``resolution``, ``tokens_per_item``, ``grid`` (h, w)
(row-major code order); audio tokenizers add ``sample_rate``, ``tokens_for_seconds`` and ``encode_wav``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from megafusion.encoders import import_object

MODALITIES = ("image", "audio")


class DiscreteTokenizer:
    """Base: subclasses set ``name`` and ``modality`` and implement ``config``, ``codebook_size``, encode, decode."""

    name = "base"
    modality = "image"

    @property
    def config(self) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define config")

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define codebook_size")

    def spec(self) -> Dict[str, Any]:
        """{"name", "config"}: JSON-able; build_discrete_tokenizer(spec) rebuilds an equal tokenizer."""
        return {"name": self.name, "config": dict(self.config)}

    def encode(self, item) -> np.ndarray:
        raise NotImplementedError

    def decode(self, codes) -> np.ndarray:
        raise NotImplementedError

    def code_range(self, position: int) -> Tuple[int, int]:
        """[lo, hi) of the codes that may stand at `position` of an item's code sequence (generation restricts
        each position to it): the whole codebook, unless the layout ties positions to sub-codebooks."""
        return 0, self.codebook_size

    def check_codes(self, codes, length: Optional[int] = None) -> np.ndarray:
        """codes (any int sequence / array / tensor) -> 1-D int64 array in [0, codebook_size), or a ValueError."""
        if hasattr(codes, "detach"):  # torch tensor
            codes = codes.detach().cpu().numpy()
        array = np.asarray(codes)
        if array.ndim != 1:
            raise ValueError(f"discrete tokenizer {self.name}: codes must be 1-D, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"discrete tokenizer {self.name}: codes must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
        if length is not None and array.size != length:
            raise ValueError(f"discrete tokenizer {self.name}: expected {length} codes, got {array.size}")
        if array.size and (array.min() < 0 or array.max() >= self.codebook_size):
            raise ValueError(f"discrete tokenizer {self.name}: codes must lie in [0, {self.codebook_size}), got "
                             f"min {int(array.min())} max {int(array.max())}")
        return array

    def __eq__(self, other) -> bool:
        return isinstance(other, DiscreteTokenizer) and type(other) is type(self) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(sorted(self.config.items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class ImageTokenizer(DiscreteTokenizer):
    """Image tokenizers: fixed R x R RGB input, ``tokens_per_item`` codes in a row-major ``grid``."""

    modality = "image"
    resolution: int
    crop: str = "center"

    @property
    def grid(self) -> Tuple[int, int]:
        raise NotImplementedError

    @property
    def tokens_per_item(self) -> int:
        h, w = self.grid
        return h * w

    def prepare(self, image) -> np.ndarray:
        """PIL image or uint8 array [H, W, 3] -> uint8 [R, R, 3] (megafusion.encoders.transforms crop policy)."""
        from PIL import Image

        from megafusion.encoders.transforms import image_to_pixels, pixels_to_uint8

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in
                                                                         (1, 3, 4)):
                raise ValueError(f"discrete tokenizer {self.name}: expected a uint8 array [H, W, 3] (or a PIL "
                                 f"image), got {image.dtype} {image.shape}")
            image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        elif not isinstance(image, Image.Image):
            raise ValueError(f"discrete tokenizer {self.name}: expected a PIL image or a uint8 array [H, W, 3], "
                             f"got {type(image).__name__}")
        return pixels_to_uint8(image_to_pixels(image, self.resolution, self.crop))


class AudioTokenizer(DiscreteTokenizer):
    """Audio tokenizers: mono float32 waveforms at ``sample_rate``; the code count depends on the duration."""

    modality = "audio"
    sample_rate: int

    def tokens_for_seconds(self, seconds: float) -> int:
        raise NotImplementedError

    def check_waveform(self, waveform) -> np.ndarray:
        if hasattr(waveform, "detach"):
            waveform = waveform.detach().cpu().numpy()
        array = np.asarray(waveform, dtype=np.float32)
        if array.ndim != 1:
            raise ValueError(f"discrete tokenizer {self.name}: expected a mono 1-D waveform at {self.sample_rate} Hz, "
                             f"got shape {array.shape} (average the channels first)")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"discrete tokenizer {self.name}: the waveform holds NaN or inf values")
        return array

    def encode_wav(self, path_or_bytes) -> np.ndarray:
        """A WAV file (path or bytes) -> codes: read_wav (channels averaged) + resample to sample_rate + encode."""
        from megafusion.encoders.discrete.audio_io import read_wav, resample

        waveform, rate = read_wav(path_or_bytes)
        return self.encode(resample(waveform, rate, self.sample_rate))


# ---------------------------------------------------------------------------------------------------- registry
# built-ins as "module:Class", imported when first built (vq / encodec pull in diffusers / transformers)
_REGISTRY: Dict[str, Union[str, Callable[..., DiscreteTokenizer]]] = {
    "palette": "megafusion.encoders.discrete.palette:PaletteTokenizer",
    "vq": "megafusion.encoders.discrete.vq:VQTokenizer",
    "mulaw": "megafusion.encoders.discrete.mulaw:MuLawTokenizer",
    "encodec": "megafusion.encoders.discrete.encodec:EncodecTokenizer",
}


def register_discrete_tokenizer(name: str, factory: Callable[..., DiscreteTokenizer]) -> None:
    """`factory(**config)` -> DiscreteTokenizer; the tokenizer's ``name`` attribute should equal `name`."""
    _REGISTRY[name] = factory


def discrete_tokenizer_names():
    return sorted(_REGISTRY)


def _accepted_keys(factory) -> str:
    try:
        return str([p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")])
    except (TypeError, ValueError):
        return "(see the tokenizer's docstring)"


def build_discrete_tokenizer(spec: Dict[str, Any]) -> DiscreteTokenizer:
    """{"name": ..., "config": {...}} -> DiscreteTokenizer. Unknown name or bad config -> ValueError."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or set(spec) - {"name", "config"}:
        raise ValueError(f"discrete tokenizer spec {spec!r} must be a dict {{'name': str, 'config': dict}}; names: "
                         f"{discrete_tokenizer_names()} or 'package.module:Class'")
    name, config = spec["name"], spec.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"discrete tokenizer spec {spec!r}: 'config' must be a dict, got {type(config).__name__}")
    if name not in _REGISTRY and ":" not in name:
        raise ValueError(f"discrete tokenizer spec {spec!r}: unknown name {name!r}; choose one of "
                         f"{discrete_tokenizer_names()} or 'package.module:Class'")
    factory = _REGISTRY.get(name, name)
    if isinstance(factory, str):
        factory = import_object(factory, f"discrete tokenizer spec {spec!r}")
    try:
        tokenizer = factory(**config)
    except TypeError as exc:
        raise ValueError(f"discrete tokenizer spec {spec!r}: bad config keys {sorted(config)}; {name!r} accepts "
                         f"{_accepted_keys(factory)} ({exc})") from exc
    if not isinstance(tokenizer, DiscreteTokenizer):
        raise TypeError(f"discrete tokenizer {name!r} built a {type(tokenizer).__name__}, not a "
                        f"megafusion.encoders.discrete.DiscreteTokenizer")
    if tokenizer.modality not in MODALITIES:
        raise TypeError(f"discrete tokenizer {name!r}: modality {tokenizer.modality!r} is not one of {MODALITIES}")
    return tokenizer


__all__ = ["DiscreteTokenizer", "ImageTokenizer", "AudioTokenizer", "build_discrete_tokenizer",
           "register_discrete_tokenizer", "discrete_tokenizer_names", "MODALITIES"]
