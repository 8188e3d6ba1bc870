"""What `megafusion generate` writes into --out:

    results.json                 per prompt: the prompt, generated text, token ids, image / video paths, seed,
                                 stop reason, prompt length; plus the checkpoint, its step and every setting
    <id>_image<k>.png            each generated still image, decoded by the checkpoint's encoder
    <id>_video<k>/frame<j>.png   the frames of a generated video, and <id>_video<k>.gif (animated)
    grid_<n>.png                 the images of prompt batch n side by side (first frame for videos)
    <id>_media<k>.safetensors    the latent patches instead, when no encoder with a decoder is known

Text is decoded with the tokenizer (token ids when there is none); in the text, each generated image or video
stands as "<image k>". Every file is written under a temporary name and renamed, so an interrupted run never
leaves a truncated PNG or results.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from megafusion.model.heads import unpatchify
from megafusion.utils.files import write_atomic


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8 (clipped)."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def decode_media(patches: torch.Tensor, encoder, latent_shape: Sequence[int]) -> Optional[List[np.ndarray]]:
    """[frames, patches, patch_dim] -> one uint8 RGB image per frame, or None without a decoder."""
    if encoder is None or not encoder.has_decoder:
        return None
    latents = unpatchify(patches.float(), latent_shape)  # [frames, C, H, W]
    return [to_uint8(p) for p in encoder.decode(latents)]


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _gif_bytes(frames: List[np.ndarray], ms_per_frame: int = 250) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return buf.getvalue()


def grid_image(images: List[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile equally sized [H, W, 3] images into one image (white padding)."""
    if not images:
        raise ValueError("grid_image needs at least one image")
    h, w, _ = images[0].shape
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return out


def render_text(result, tokenizer) -> str:
    pieces = []
    for kind, value in result.pieces:
        if kind == "media":
            pieces.append(f"<image {value}>")
        elif tokenizer is not None:
            pieces.append(tokenizer.decode(value))
        else:
            pieces.append(" ".join(str(t) for t in value))
    return " ".join(p for p in pieces if p)


class OutputWriter:
    def __init__(self, out_dir, encoder, tokenizer, latent_shape: Sequence[int]):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.encoder, self.tokenizer, self.latent_shape = encoder, tokenizer, tuple(latent_shape)
        self.records: List[dict] = []
        self._grids = 0

    def add_batch(self, specs, results) -> List[dict]:
        """Write the files of one prompt batch; returns its records (also kept for results.json)."""
        thumbnails, records = [], []
        for spec, result in zip(specs, results):
            record = {"id": result.id, "seed": result.seed, "prompt": spec.parts, "text": render_text(result,
                      self.tokenizer), "tokens": result.tokens, "stop_reason": result.stop_reason,
                      "prompt_length": result.prompt_length, "images": [], "videos": [], "latents": []}
            for k, patches in enumerate(result.media):
                frames = decode_media(patches, self.encoder, self.latent_shape)
                if frames is None:
                    from safetensors.torch import save

                    name = f"{result.id}_media{k}.safetensors"
                    write_atomic(self.out / name, save({"patches": patches.contiguous()}))
                    record["latents"].append(name)
                    continue
                thumbnails.append(frames[0])
                if len(frames) == 1:
                    name = f"{result.id}_image{k}.png"
                    write_atomic(self.out / name, _png_bytes(frames[0]))
                    record["images"].append(name)
                    continue
                folder = self.out / f"{result.id}_video{k}"
                folder.mkdir(exist_ok=True)
                paths = []
                for j, frame in enumerate(frames):
                    write_atomic(folder / f"frame{j}.png", _png_bytes(frame))
                    paths.append(f"{folder.name}/frame{j}.png")
                write_atomic(self.out / f"{folder.name}.gif", _gif_bytes(frames))
                record["videos"].append({"gif": f"{folder.name}.gif", "frames": paths})
            records.append(record)
        if thumbnails:
            name = f"grid_{self._grids}.png"
            write_atomic(self.out / name, _png_bytes(grid_image(thumbnails)))
            for record in records:
                record["grid"] = name
            self._grids += 1
        self.records += records
        return records

    def finish(self, header: dict) -> Path:
        path = self.out / "results.json"
        write_atomic(path, json.dumps({**header, "prompts": self.records}, indent=2) + "\n")
        return path
