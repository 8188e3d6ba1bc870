"""The ``vq`` image tokenizer: a diffusers ``VQModel`` (VQ-GAN / VQ-VAE) loaded from a local folder.

Encode: image -> R x R RGB (megafusion.encoders.transforms) -> pixels in [-1, 1] -> ``model.encode(x).latents``
(encoder + quant_conv) -> ``model.quantize(latents)``, whose third output holds ``min_encoding_indices`` (one
nearest-codebook index per latent position, row-major over the (h, w) grid) -> int64 [h * w].

Decode: ``model.quantize.get_codebook_entry(indices, (1, h, w, C))`` -> ``model.decode(z_q, force_not_quantize=
True)`` (post_quant_conv + decoder, no second quantisation) -> uint8 [R, R, 3]. Models saved with
``lookup_from_codebook=True`` get the indices themselves (diffusers does the lookup inside decode).

codebook_size = config.num_vq_embeddings; grid side = R / 2^(len(block_out_channels) - 1). The folder's
config.json is read at construction (so these are known without loading weights); the weights load on first use.
Config: path (a folder from VQModel.save_pretrained), resolution (default 256), device ("cpu"), dtype ("float32"),
subfolder (None), crop ("center"). Nothing is fetched from the network. diffusers is imported lazily.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from megafusion.encoders.base import DTYPES
from megafusion.encoders.discrete import ImageTokenizer
from megafusion.encoders.transforms import CROP_POLICIES, pixels_to_uint8


def _import_vq_model():
    try:
        from diffusers import VQModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("discrete tokenizer 'vq' needs the diffusers package: pip install diffusers "
                          "safetensors") from exc
    return VQModel


class VQTokenizer(ImageTokenizer):
    name = "vq"

    def __init__(self, path: str, resolution: int = 256, device: str = "cpu", dtype: str = "float32",
                 subfolder: Optional[str] = None, crop: str = "center"):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"discrete tokenizer vq: config.path={path!r} is not a local folder holding a "
                                    f"diffusers VQModel (config.json + weights saved with VQModel.save_pretrained)")
        if dtype not in DTYPES:
            raise ValueError(f"discrete tokenizer vq: config.dtype={dtype!r} is not one of {list(DTYPES)}")
        if crop not in CROP_POLICIES:
            raise ValueError(f"discrete tokenizer vq: config.crop={crop!r} is not one of {list(CROP_POLICIES)}")
        if isinstance(resolution, bool) or int(resolution) <= 0:
            raise ValueError(f"discrete tokenizer vq: config.resolution={resolution!r} must be a positive integer")
        self.path = os.path.abspath(path)
        self.subfolder = subfolder
        self.resolution, self.device, self.dtype, self.crop = int(resolution), str(device), dtype, crop
        cfg_path = os.path.join(self.path, subfolder or "", "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"discrete tokenizer vq: {cfg_path} is missing; the folder must come from "
                                    f"diffusers VQModel.save_pretrained")
        try:
            with open(cfg_path) as f:
                model_cfg = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"discrete tokenizer vq: cannot read {cfg_path} as JSON: {exc}") from exc
        if model_cfg.get("_class_name") != "VQModel":
            raise ValueError(f"discrete tokenizer vq: {cfg_path} describes a {model_cfg.get('_class_name')!r}, not a "
                             f"diffusers VQModel; point config.path at a VQModel folder (an AutoencoderKL belongs "
                             f"to the continuous 'vae' encoder)")
        self.num_embeddings = int(model_cfg.get("num_vq_embeddings", 256))
        latent_channels = int(model_cfg.get("latent_channels", 3))
        self.embed_dim = int(model_cfg.get("vq_embed_dim") or latent_channels)
        self.downsample = 2 ** (len(model_cfg.get("block_out_channels", [64])) - 1)
        if self.resolution % self.downsample:
            raise ValueError(f"discrete tokenizer vq: config.resolution={self.resolution} is not divisible by the "
                             f"VQModel's downsampling factor {self.downsample} ({cfg_path})")
        self._model = None

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> Dict[str, Any]:
        return {"path": self.path, "resolution": self.resolution, "device": self.device, "dtype": self.dtype,
                "subfolder": self.subfolder, "crop": self.crop}

    @property
    def codebook_size(self) -> int:
        return self.num_embeddings

    @property
    def grid(self) -> Tuple[int, int]:
        side = self.resolution // self.downsample
        return (side, side)

    def _torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def model(self):
        """The VQModel, loaded on first use (eval mode, no gradients)."""
        if self._model is None:
            VQModel = _import_vq_model()
            kwargs = {"local_files_only": True, "torch_dtype": self._torch_dtype()}
            if self.subfolder:
                kwargs["subfolder"] = self.subfolder
            try:
                model = VQModel.from_pretrained(self.path, **kwargs)
            except (OSError, ValueError) as exc:
                raise ValueError(f"discrete tokenizer vq: cannot load a VQModel from {self.path}: {exc}") from exc
            if model.quantize.remap is not None:
                raise ValueError(f"discrete tokenizer vq: {self.path}: the quantizer remaps indices (remap is set); "
                                 f"only plain codebook indices are supported")
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    # ------------------------------------------------------------------ work
    def encode(self, image) -> np.ndarray:
        """PIL image or uint8 [H, W, 3] -> int64 codebook indices [tokens_per_item] (row-major)."""
        import torch

        pixels = self.prepare(image).astype(np.float32) / 127.5 - 1.0  # [R, R, 3] in [-1, 1]
        x = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            latents = self.model.encode(x.to(self.device, self._torch_dtype())).latents
            _, _, (_, _, indices) = self.model.quantize(latents)
        codes = indices.reshape(-1).long().cpu().numpy()
        if codes.size != self.tokens_per_item:
            raise ValueError(f"discrete tokenizer vq: {self.path} gave {codes.size} codes for a {self.resolution}px "
                             f"image, expected {self.tokens_per_item} (grid {self.grid}); check block_out_channels")
        return codes.astype(np.int64)

    def lookup(self, codes):
        """codes [tokens_per_item] -> quantised latents z_q [1, C, h, w] (torch, on the device)."""
        import torch

        codes = self.check_codes(codes, length=self.tokens_per_item)
        h, w = self.grid
        indices = torch.from_numpy(codes).to(self.device)
        with torch.no_grad():
            return self.model.quantize.get_codebook_entry(indices, (1, h, w, self.embed_dim))

    def decode(self, codes) -> np.ndarray:
        """codes [tokens_per_item] -> uint8 [R, R, 3]."""
        import torch

        model = self.model
        with torch.no_grad():
            if model.config.lookup_from_codebook:
                h, w = self.grid
                indices = torch.from_numpy(self.check_codes(codes, length=self.tokens_per_item)).to(self.device)
                sample = model.decode(indices, force_not_quantize=True, shape=(1, h, w, self.embed_dim)).sample
            else:
                sample = model.decode(self.lookup(codes), force_not_quantize=True).sample
        return pixels_to_uint8(sample[0].float().cpu().numpy())
