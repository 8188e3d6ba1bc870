"""A frozen representation encoder from a local transformers folder (e.g. SiglipVisionModel, DINOv2, CLIP vision).

The latent of an image is the model's patch features reshaped to a grid: last_hidden_state [b, N, D] (or the
hidden state of ``feature_layer``) minus any leading prefix tokens (CLS / registers) -> [b, D, h, w] with
h = w = resolution / patch_size. Input normalisation uses image_mean / image_std from the folder's
preprocessor_config.json when present, else 0.5 / 0.5 (SigLIP's), i.e. pixels in [-1, 1] unchanged.

There is no decoder unless ``decoder`` names a factory "package.module:function" returning a torch module that maps
[b, D, h, w] latents to [b, 3, R, R] pixels in [-1, 1]; without it decode raises. Nothing is fetched from the
network (local_files_only). transformers is imported lazily.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Dict, Optional, Tuple

from megafusion.encoders.base import Encoder


def _import_auto_model():
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("encoder 'hf-vision' needs the transformers package: pip install transformers "
                          "safetensors") from exc
    return AutoConfig, AutoModel


class HFVisionEncoder(Encoder):
    name = "hf-vision"

    def __init__(self, path: str, resolution: Optional[int] = None, crop: str = "center", dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 16, feature_layer: int = -1,
                 decoder: Optional[str] = None):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"encoder hf-vision: path={path!r} is not a local transformers model folder "
                                    f"(config.json + weights saved with save_pretrained)")
        self.path = os.path.abspath(path)
        with open(os.path.join(self.path, "config.json")) as f:
            model_cfg = json.load(f)
        vision_cfg = model_cfg.get("vision_config", model_cfg)
        self._vision_cfg = vision_cfg
        self.patch = int(vision_cfg.get("patch_size", 16))
        self.hidden = int(vision_cfg.get("hidden_size", 768))
        native = int(vision_cfg.get("image_size", 224))
        super().__init__(resolution=resolution or native, crop=crop, dtype=dtype, device=device,
                         batch_size=batch_size)
        if self.resolution % self.patch:
            raise ValueError(f"encoder hf-vision: resolution={self.resolution} is not divisible by the model's "
                             f"patch_size {self.patch} ({self.path}/config.json)")
        self.feature_layer = int(feature_layer)
        self.decoder = decoder
        mean, std = [0.5] * 3, [0.5] * 3
        pre = os.path.join(self.path, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                pre_cfg = json.load(f)
            mean, std = pre_cfg.get("image_mean", mean), pre_cfg.get("image_std", std)
        self.image_mean, self.image_std = [float(x) for x in mean], [float(x) for x in std]
        self._model = None
        self._decoder_module = None

    @property
    def config(self) -> Dict[str, Any]:
        cfg = super().config
        cfg.update(path=self.path, feature_layer=self.feature_layer, decoder=self.decoder,
                   image_mean=self.image_mean, image_std=self.image_std)
        return cfg

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        side = self.resolution // self.patch
        return (self.hidden, side, side)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _no_decoder_hint(self) -> str:
        return ("representation encoders decode only when configured with decoder='package.module:factory' "
                "returning a module [b, D, h, w] -> [b, 3, R, R]")

    @property
    def model(self):
        if self._model is None:
            AutoConfig, AutoModel = _import_auto_model()
            import transformers

            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
            model = AutoModel.from_pretrained(self.path, local_files_only=True, **{dtype_key: self._torch_dtype()})
            if hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
                model = model.vision_model  # a dual encoder folder (SiglipModel, CLIPModel): keep the vision tower
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def _encode(self, pixels):  # [b, 3, R, R] -> [b, D, h, w]
        import torch

        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        x = ((pixels + 1) / 2 - mean) / std
        kwargs = {"pixel_values": x}
        if self.resolution != self._native_resolution():
            kwargs["interpolate_pos_encoding"] = True
        if self.feature_layer == -1:
            hidden = self.model(**kwargs).last_hidden_state  # [b, N, D]
        else:
            hidden = self.model(**kwargs, output_hidden_states=True).hidden_states[self.feature_layer]
        side = self.resolution // self.patch
        hidden = hidden[:, hidden.shape[1] - side * side:, :]  # drop CLS / register tokens
        b = hidden.shape[0]
        return hidden.reshape(b, side, side, self.hidden).permute(0, 3, 1, 2).contiguous()

    def _native_resolution(self) -> int:
        return int(self._vision_cfg.get("image_size", self.resolution))

    def _decode(self, latents):
        if self._decoder_module is None:
            module_name, _, attr = self.decoder.partition(":")
            if not attr:
                raise ValueError(f"encoder hf-vision: decoder={self.decoder!r} must be 'package.module:factory'")
            factory = getattr(importlib.import_module(module_name), attr)
            self._decoder_module = factory().to(self.device, self._torch_dtype()).eval()
        return self._decoder_module(latents)
