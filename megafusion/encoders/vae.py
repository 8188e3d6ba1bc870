"""Diffusers AutoencoderKL from a local folder: latents = (mean of q(z|x) - shift_factor) * scaling_factor.

Encode uses the mean of the latent distribution (deterministic: the same image always gives the same latent);
decode inverts the normalisation, z / scaling_factor + shift_factor, and runs the VAE decoder, which is also what
inference uses to turn sampled latents back into images. scaling_factor and shift_factor come from the folder's
config.json (shift_factor absent or null = 0, as for SD-style VAEs; set for Flux-style ones) unless given
explicitly. Nothing is fetched from the network (local_files_only). diffusers is imported lazily.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from megafusion.encoders.base import Encoder


def _import_autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("encoder 'vae' needs the diffusers package: pip install diffusers safetensors") from exc
    return AutoencoderKL


class VAEEncoder(Encoder):
    name = "vae"

    def __init__(self, path: str, resolution: int = 256, crop: str = "center", dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 16, subfolder: Optional[str] = None,
                 scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None):
        super().__init__(resolution=resolution, crop=crop, dtype=dtype, device=device, batch_size=batch_size)
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"encoder vae: path={path!r} is not a local folder holding an AutoencoderKL "
                                    f"(config.json + weights saved with save_pretrained)")
        self.path = os.path.abspath(path)
        self.subfolder = subfolder
        cfg_path = os.path.join(self.path, subfolder or "", "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"encoder vae: {cfg_path} is missing; the folder must come from "
                                    f"AutoencoderKL.save_pretrained")
        with open(cfg_path) as f:
            model_cfg = json.load(f)
        self.latent_channels = int(model_cfg.get("latent_channels", 4))
        self.downsample = 2 ** (len(model_cfg.get("block_out_channels", [64])) - 1)
        if self.resolution % self.downsample:
            raise ValueError(f"encoder vae: resolution={self.resolution} is not divisible by the VAE's downsampling "
                             f"factor {self.downsample} ({cfg_path})")
        cfg_scale = model_cfg.get("scaling_factor")
        cfg_shift = model_cfg.get("shift_factor")
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else
                                    (cfg_scale if cfg_scale is not None else 1.0))
        self.shift_factor = float(shift_factor if shift_factor is not None else
                                  (cfg_shift if cfg_shift is not None else 0.0))
        self._model = None

    @property
    def config(self) -> Dict[str, Any]:
        cfg = super().config
        cfg.update(path=self.path, subfolder=self.subfolder, scaling_factor=self.scaling_factor,
                   shift_factor=self.shift_factor)
        return cfg

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        side = self.resolution // self.downsample
        return (self.latent_channels, side, side)

    @property
    def model(self):
        if self._model is None:
            AutoencoderKL = _import_autoencoder_kl()
            kwargs = {"local_files_only": True, "torch_dtype": self._torch_dtype()}
            if self.subfolder:
                kwargs["subfolder"] = self.subfolder
            model = AutoencoderKL.from_pretrained(self.path, **kwargs)
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def _encode(self, pixels):  # [b, 3, R, R] -> [b, C, R/f, R/f]
        mean = self.model.encode(pixels).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def _decode(self, latents):  # [b, C, R/f, R/f] -> [b, 3, R, R]
        return self.model.decode(latents / self.scaling_factor + self.shift_factor).sample
