"""Frozen latent encoders and their registry: ``build_encoder(name, **config)``.

Built in: ``pixel`` (no weights), ``vae`` (diffusers AutoencoderKL, local folder), ``hf-vision`` (transformers
vision model, local folder). ``register_encoder`` adds a name; a name of the form "package.module:Class" imports a
custom encoder class (a megafusion.encoders.base.Encoder subclass), which also works inside spawned workers.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict

from megafusion.encoders.base import Encoder

_REGISTRY: Dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str, factory: Callable[..., Encoder]) -> None:
    _REGISTRY[name] = factory


def _pixel(**config):
    from megafusion.encoders.pixel import PixelEncoder

    return PixelEncoder(**config)


def _vae(**config):
    from megafusion.encoders.vae import VAEEncoder

    return VAEEncoder(**config)


def _hf_vision(**config):
    from megafusion.encoders.hf_vision import HFVisionEncoder

    return HFVisionEncoder(**config)


register_encoder("pixel", _pixel)
register_encoder("vae", _vae)
register_encoder("hf-vision", _hf_vision)


def import_object(target: str, where: str):
    """"package.module:Attr" -> the object; ValueError naming `where` when it cannot be imported."""
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: cannot import {attr} from {module_name}: {exc}") from exc


def encoder_names():
    return sorted(_REGISTRY)


def build_encoder(name: str, **config) -> Encoder:
    if name in _REGISTRY:
        factory = _REGISTRY[name]
    elif ":" in name:
        factory = import_object(name, f"encoder {name!r}")
    else:
        raise ValueError(f"unknown encoder {name!r}; choose one of {encoder_names()} or 'package.module:Class'")
    try:
        encoder = factory(**config)
    except TypeError as exc:
        raise ValueError(f"encoder {name!r}: bad configuration {sorted(config)}: {exc}") from exc
    if not isinstance(encoder, Encoder):
        raise TypeError(f"encoder {name!r} built a {type(encoder).__name__}, not a megafusion.encoders.base.Encoder")
    return encoder


__all__ = ["Encoder", "build_encoder", "register_encoder", "encoder_names"]
