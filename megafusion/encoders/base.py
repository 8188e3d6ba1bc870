"""The frozen-encoder interface: image -> pixels -> latents [C, H, W] (and back, where a decoder exists).

Every encoder owns a resolution, a crop policy and a compute dtype, and exposes:

- ``prepare(pil_image)``: float32 [3, R, R] in [-1, 1] (megafusion.encoders.transforms);
- ``encode(pixels [b, 3, R, R]) -> latents [b, C, H, W]`` float32, batched by ``batch_size`` under torch.no_grad;
- ``decode(latents [b, C, H, W]) -> pixels [b, 3, R, R]`` float32 (raises when the encoder has no decoder);
- ``latent_shape`` (C, H, W), known from the configuration without running the model;
- ``config``: the JSON-able settings that, with ``name``, rebuild the encoder (stored in the dataset manifest).

Subclasses implement ``_encode`` / ``_decode`` on one batch already on the device in the compute dtype.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from megafusion.encoders.transforms import CROP_POLICIES, image_to_pixels

DTYPES = ("float32", "float16", "bfloat16")


class Encoder:
    name = "base"

    def __init__(self, resolution: int = 256, crop: str = "center", dtype: str = "float32", device: str = "cpu",
                 batch_size: int = 16):
        if int(resolution) <= 0:
            raise ValueError(f"encoder {self.name}: resolution={resolution} must be positive")
        if crop not in CROP_POLICIES:
            raise ValueError(f"encoder {self.name}: crop={crop!r} is not one of {list(CROP_POLICIES)}")
        if dtype not in DTYPES:
            raise ValueError(f"encoder {self.name}: dtype={dtype!r} is not one of {list(DTYPES)}")
        if int(batch_size) <= 0:
            raise ValueError(f"encoder {self.name}: batch_size={batch_size} must be positive")
        self.resolution = int(resolution)
        self.crop = crop
        self.dtype = dtype
        self.device = device
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> Dict[str, Any]:
        return {"resolution": self.resolution, "crop": self.crop, "dtype": self.dtype}

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        raise NotImplementedError(f"{type(self).__name__} must define latent_shape")

    @property
    def has_decoder(self) -> bool:
        return True

    # ------------------------------------------------------------------ work
    def prepare(self, image) -> np.ndarray:
        """PIL image -> float32 [3, R, R] in [-1, 1]."""
        return image_to_pixels(image, self.resolution, self.crop)

    def _torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def encode(self, pixels):
        """pixels [b, 3, R, R] (torch or numpy, in [-1, 1]) -> latents [b, C, H, W] float32 on CPU."""
        import torch

        pixels = torch.as_tensor(pixels)
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encoder {self.name}: expected pixels [b, 3, H, W], got {tuple(pixels.shape)}")
        out = []
        with torch.no_grad():
            for chunk in pixels.split(self.batch_size):
                latents = self._encode(chunk.to(self.device, self._torch_dtype()))
                out.append(latents.float().cpu())
        if not out:
            return torch.zeros((0, *self.latent_shape))
        return torch.cat(out)

    def decode(self, latents):
        """latents [b, C, H, W] -> pixels [b, 3, R, R] float32 on CPU (nominally in [-1, 1])."""
        import torch

        if not self.has_decoder:
            raise RuntimeError(f"encoder {self.name} has no decoder; {self._no_decoder_hint()}")
        latents = torch.as_tensor(latents)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"encoder {self.name}: expected latents [b, {', '.join(map(str, self.latent_shape))}], "
                             f"got {tuple(latents.shape)}")
        out = []
        with torch.no_grad():
            for chunk in latents.split(self.batch_size):
                out.append(self._decode(chunk.to(self.device, self._torch_dtype())).float().cpu())
        if not out:
            return torch.zeros((0, 3, self.resolution, self.resolution))
        return torch.cat(out)

    def _encode(self, pixels):
        raise NotImplementedError

    def _decode(self, latents):
        raise NotImplementedError

    def _no_decoder_hint(self) -> str:
        return "use an encoder with a decoder"
