"""The ``palette`` image tokenizer: a weight-free quantiser for tests and demos (no model, no download).

The image is resized / center-cropped to R x R RGB (megafusion.encoders.transforms), cut into p x p patches in
row-major order, and each patch becomes one code: its mean colour quantised to ``levels`` per channel,

    level(v) = floor(v * levels / 256)           v in [0, 255] (the channel mean, a float)
    code     = r * levels^2 + g * levels + b     codebook_size = levels^3

Decode paints each patch with its palette colour, the level centres round((l + 0.5) * 256 / levels - 0.5) (l for
levels = 256), which fall inside their own level's bin, so encode(decode(codes)) == codes for every code.
Config: resolution (default 32), patch (default 4), levels (default 4, at most 256), crop ("center" | "resize").
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from megafusion.encoders.discrete import ImageTokenizer
from megafusion.encoders.transforms import CROP_POLICIES


class PaletteTokenizer(ImageTokenizer):
    name = "palette"

    def __init__(self, resolution: int = 32, patch: int = 4, levels: int = 4, crop: str = "center"):
        for field, value, low in (("resolution", resolution, 1), ("patch", patch, 1), ("levels", levels, 2)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
                raise ValueError(f"discrete tokenizer palette: config.{field}={value!r} must be an integer >= {low}")
        resolution, patch, levels = int(resolution), int(patch), int(levels)
        if resolution % patch:
            raise ValueError(f"discrete tokenizer palette: config.resolution={resolution} is not divisible by "
                             f"config.patch={patch}; choose a resolution that is a multiple of the patch size")
        if levels > 256:
            raise ValueError(f"discrete tokenizer palette: config.levels={levels} must be at most 256 (8-bit "
                             f"channels)")
        if crop not in CROP_POLICIES:
            raise ValueError(f"discrete tokenizer palette: config.crop={crop!r} is not one of {list(CROP_POLICIES)}")
        self.resolution, self.patch, self.levels, self.crop = resolution, patch, levels, crop
        # the colour of each level: the bin centre, rounded to uint8 (inside the bin because bins are >= 1 wide)
        centres = np.rint((np.arange(levels) + 0.5) * 256.0 / levels - 0.5)
        self.level_values = np.clip(centres, 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ description
    @property
    def config(self) -> Dict[str, Any]:
        return {"resolution": self.resolution, "patch": self.patch, "levels": self.levels, "crop": self.crop}

    @property
    def codebook_size(self) -> int:
        return self.levels ** 3

    @property
    def grid(self) -> Tuple[int, int]:
        side = self.resolution // self.patch
        return (side, side)

    def colours(self, codes) -> np.ndarray:
        """int codes [n] -> uint8 [n, 3]: the RGB colour decode paints for each code."""
        codes = np.asarray(codes, dtype=np.int64)
        levels = np.stack([codes // self.levels ** 2, (codes // self.levels) % self.levels, codes % self.levels], -1)
        return self.level_values[levels]

    def palette(self) -> np.ndarray:
        """uint8 [codebook_size, 3]: every code's colour (levels^3 rows: 16.7M for levels=256)."""
        return self.colours(np.arange(self.codebook_size))

    # ------------------------------------------------------------------ work
    def encode(self, image) -> np.ndarray:
        """PIL image or uint8 [H, W, 3] -> int64 [tokens_per_item] (row-major over the patch grid)."""
        pixels = self.prepare(image).astype(np.float64)  # [R, R, 3] in [0, 255]
        h, w = self.grid
        p = self.patch
        means = pixels.reshape(h, p, w, p, 3).mean(axis=(1, 3))  # [h, w, 3]
        levels = np.clip(np.floor(means * self.levels / 256.0), 0, self.levels - 1).astype(np.int64)
        codes = levels[..., 0] * self.levels ** 2 + levels[..., 1] * self.levels + levels[..., 2]
        return codes.reshape(-1)

    def decode(self, codes) -> np.ndarray:
        """int codes [tokens_per_item] -> uint8 [R, R, 3], each patch painted its palette colour."""
        codes = self.check_codes(codes, length=self.tokens_per_item)
        h, w = self.grid
        colours = self.colours(codes).reshape(h, 1, w, 1, 3)
        image = np.broadcast_to(colours, (h, self.patch, w, self.patch, 3))
        return np.ascontiguousarray(image.reshape(self.resolution, self.resolution, 3))
