"""Prompt files for `megafusion generate`: JSONL, one prompt per line, read and encoded before any generation.

    {"id": "red-circle", "text": "a red circle on the left", "image": true, "seed": 3}
    {"id": "caption", "parts": [{"image": "imgs/cat.png"}, {"text": "This picture shows"}]}
    {"parts": [{"text": "a square moving right"}], "image": true, "frames": 4}
    {"parts": [{"video": ["f0.png", "f1.png"]}, {"text": "It moves"}]}

A prompt is an ordered list of parts: text (tokenized without BOS/EOS; the engine adds BOS) and media (an image
file, or a list of frame files), encoded with the checkpoint's frozen encoder into clean latent patches. `text`
is shorthand for one text part. Optional per prompt: `id` (default "prompt-<line>"), `seed` (default the
`--seed` option plus the line index), `image` (start an image right after the prompt), `frames` (frames of
generated images). Relative image paths are resolved against the prompt file's folder. Any problem (bad JSON,
an unknown key, a missing or undecodable image, text without a tokenizer, an image without an encoder) raises
PromptError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from megafusion.inference.engine import Prompt
from megafusion.model.heads import patchify

PROMPT_KEYS = {"id", "text", "parts", "seed", "image", "frames"}


class PromptError(ValueError):
    """A prompt file or one of its lines cannot be used."""


@dataclass
class PromptSpec:
    """A prompt as written in the file, with its parts resolved (text strings and absolute image paths)."""

    id: str
    parts: List[dict]
    seed: int
    image: Optional[bool]
    frames: Optional[int]
    line: int


def read_prompt_file(path: str, base_seed: int = 0) -> List[PromptSpec]:
    if not os.path.isfile(path):
        raise PromptError(f"--prompts {path}: no such file")
    folder = os.path.dirname(os.path.abspath(path))
    specs, ids = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(f"{where}: not valid JSON ({exc.msg})") from None
            spec = _parse(raw, where, folder, number, base_seed + len(specs))
            if spec.id in ids:
                raise PromptError(f"{where}: id {spec.id!r} is used twice; ids name output files, so give each "
                                  f"prompt its own")
            ids.add(spec.id)
            specs.append(spec)
    if not specs:
        raise PromptError(f"--prompts {path}: the file holds no prompt")
    return specs


def _parse(raw, where: str, folder: str, number: int, default_seed: int) -> PromptSpec:
    if not isinstance(raw, dict):
        raise PromptError(f"{where}: a prompt is a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - PROMPT_KEYS)
    if unknown:
        raise PromptError(f"{where}: unknown keys {unknown}; a prompt may hold {sorted(PROMPT_KEYS)}")
    if ("text" in raw) == ("parts" in raw):
        raise PromptError(f"{where}: give either `text` or `parts`")
    parts = [{"text": raw["text"]}] if "text" in raw else raw["parts"]
    if not isinstance(parts, list):
        raise PromptError(f"{where}: `parts` must be a list of {{\"text\": ...}} / {{\"image\": ...}} / "
                          f"{{\"video\": [...]}} objects")
    resolved = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in ("text", "image", "video"):
            raise PromptError(f"{where}: part {i} must be one of {{\"text\": str}}, {{\"image\": path}}, "
                              f"{{\"video\": [paths]}}; got {part!r}")
        kind, value = next(iter(part.items()))
        if kind == "text":
            if not isinstance(value, str):
                raise PromptError(f"{where}: part {i} text must be a string")
            resolved.append({"text": value})
            continue
        paths = value if kind == "video" else [value]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            expected = "a non-empty list of paths" if kind == "video" else "a path"
            raise PromptError(f"{where}: part {i} {kind} must be {expected}")
        resolved.append({kind: [os.path.join(folder, p) for p in paths]})
    seed = raw.get("seed", default_seed)
    frames = raw.get("frames")
    image = raw.get("image")
    if not isinstance(seed, int) or seed < 0:
        raise PromptError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    if frames is not None and (not isinstance(frames, int) or frames < 1):
        raise PromptError(f"{where}: frames must be a positive integer, got {frames!r}")
    if image is not None and not isinstance(image, bool):
        raise PromptError(f"{where}: image must be true or false, got {image!r}")
    pid = str(raw.get("id", f"prompt-{number}"))
    if not pid or any(c in pid for c in "/\\") or pid.startswith("."):
        raise PromptError(f"{where}: id {pid!r} cannot name output files (no slashes, no leading dot)")
    return PromptSpec(id=pid, parts=resolved, seed=seed, image=image, frames=frames, line=number)


def encode_prompts(specs: List[PromptSpec], tokenizer, encoder, patch_size: int, prompt_file: str = "prompts"
                   ) -> List[Prompt]:
    """Tokenize the text parts and encode the media parts -> engine Prompts (raises PromptError)."""
    from megafusion.preprocess.images import load_image
    from megafusion.preprocess.records import ImageRef
    from megafusion.preprocess.rejects import Rejected

    prompts = []
    for spec in specs:
        where = f"{prompt_file} line {spec.line} (prompt {spec.id!r})"
        parts = []
        for part in spec.parts:
            if "text" in part:
                if tokenizer is None:
                    raise PromptError(f"{where}: a text part needs a tokenizer; the checkpoint names none, pass "
                                      f"--tokenizer")
                parts.append(tokenizer.encode(part["text"]))
                continue
            if encoder is None:
                raise PromptError(f"{where}: an image part needs the frozen encoder; the checkpoint names none, "
                                  f"pass --encoder")
            pixels = []
            for path in next(iter(part.values())):
                try:
                    pixels.append(encoder.prepare(load_image(ImageRef(path=path))))
                except Rejected as exc:
                    raise PromptError(f"{where}: image {path} cannot be read ({exc.reason}: {exc.detail})") from None
            latents = encoder.encode(torch.from_numpy(np.stack(pixels)))  # [frames, C, H, W]
            parts.append(patchify(latents.float(), patch_size))
        prompts.append(Prompt(parts=parts, seed=spec.seed, id=spec.id, force_image=spec.image, frames=spec.frames))
    return prompts
