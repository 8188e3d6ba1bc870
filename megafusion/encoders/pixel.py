"""The weight-free pixel encoder: the latent of an image is its own pixel grid [3, R, R] scaled to [-1, 1].

Encode is the identity on prepared pixels and decode is exact, so it is the reference encoder for tests, tiny
runs and benchmarks (no model to load, no network).
"""

from __future__ import annotations

from typing import Tuple

from megafusion.encoders.base import Encoder


class PixelEncoder(Encoder):
    name = "pixel"

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def _encode(self, pixels):  # [b, 3, R, R] -> [b, 3, R, R]
        return pixels

    def _decode(self, latents):
        return latents
