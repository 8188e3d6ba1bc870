"""Image <-> pixel-tensor transforms shared by every encoder: resize / crop to a square resolution, scale to [-1, 1].

`image_to_pixels` is the one place a PIL image becomes the float array an encoder sees, so the pixel encoder, the
VAE and representation encoders all crop identically. Crop policies:

- ``center``: resize the shorter side to the resolution (bicubic), then cut the centred square;
- ``resize``: resize both sides to the resolution, ignoring the aspect ratio.
"""

from __future__ import annotations

import numpy as np

CROP_POLICIES = ("center", "resize")


def image_to_pixels(image, resolution: int, crop: str) -> np.ndarray:
    """PIL image -> float32 [3, resolution, resolution] in [-1, 1]."""
    from PIL import Image

    if crop not in CROP_POLICIES:
        raise ValueError(f"crop={crop!r} is not one of {list(CROP_POLICIES)}")
    image = image.convert("RGB")
    w, h = image.size
    if crop == "resize":
        if (w, h) != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BICUBIC)
    else:
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8).astype(np.float32)  # [H, W, 3]
    return (array / 127.5 - 1.0).transpose(2, 0, 1).copy()


def pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float [3, H, W] in [-1, 1] -> uint8 [H, W, 3] (values outside [-1, 1] are clipped)."""
    array = np.clip(np.rint((np.asarray(pixels, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return array.transpose(1, 2, 0)


def pixels_to_image(pixels: np.ndarray):
    """float [3, H, W] in [-1, 1] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray(pixels_to_uint8(pixels), mode="RGB")
