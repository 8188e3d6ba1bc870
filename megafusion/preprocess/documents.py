"""Records -> documents: token stream + latents, a chunk at a time so the encoder sees full batches.

For each raw row of a chunk: parse it (records), check that one image fits in seq_length, load and crop its images
(images), build the token stream (tokenization); then all prepared images of the chunk are encoded together
(batched by the encoder's batch_size), cast to the storage dtype, and checked for NaN / Inf per document. The
chunk boundaries depend only on the record order, never on the worker count, so batching is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from megafusion.preprocess.images import load_image
from megafusion.preprocess.records import Columns, ImagePart, RawRow, Record, VideoPart, parse_record
from megafusion.preprocess.rejects import Rejected
from megafusion.preprocess.tokenization import TextTokenizer, token_stream

LATENT_DTYPES = ("float32", "float16", "bfloat16")


def latent_storage(latent_dtype: str) -> Tuple[str, type]:
    """Manifest latent_storage name and numpy dtype of the IndexedDataset for a latent dtype (megatron's index
    has no 16-bit float code, so 16-bit latents are stored as their uint16 bit pattern)."""
    if latent_dtype == "float32":
        return "float32", np.float32
    if latent_dtype in ("float16", "bfloat16"):
        return f"{latent_dtype}-as-uint16", np.uint16
    raise ValueError(f"--latent-dtype {latent_dtype!r} is not one of {list(LATENT_DTYPES)}")


def to_storage(latents, latent_dtype: str) -> np.ndarray:
    """float32 torch [n, C, H, W] -> numpy in the stored representation (float32, or uint16 bit patterns)."""
    import torch

    if latent_dtype == "float32":
        return latents.to(torch.float32).numpy()
    return latents.to(getattr(torch, latent_dtype)).view(torch.int16).numpy().view(np.uint16)


def from_storage(stored: np.ndarray, latent_dtype: str) -> np.ndarray:
    """Stored values -> float32 numpy (the inverse view of to_storage)."""
    import torch

    if latent_dtype == "float32":
        return np.asarray(stored, dtype=np.float32)
    bits = torch.from_numpy(np.ascontiguousarray(stored).view(np.int16))
    return bits.view(getattr(torch, latent_dtype)).float().numpy()


@dataclass
class Document:
    source: str
    row: int
    tokens: np.ndarray  # [n] int32
    latents: np.ndarray  # [k, C*H*W] in the storage dtype (k = images + frames)
    images: int  # still images
    frames: int  # video frames


@dataclass
class Reject:
    source: str
    row: int
    error: Rejected


Result = Union[Document, Reject]


class DocumentBuilder:
    def __init__(self, tokenizer: TextTokenizer, encoder, columns: Columns, kind_mode: str, seq_length: int,
                 patch_size: int, min_image_size: int, latent_dtype: str):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.columns, self.kind_mode = columns, kind_mode
        self.min_image_size, self.latent_dtype = min_image_size, latent_dtype
        c, h, w = encoder.latent_shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"--patch-size {patch_size} does not divide the encoder's latent grid {h}x{w}; "
                             f"choose a patch size dividing {h} and {w}")
        self.positions_per_image = (h // patch_size) * (w // patch_size) + 2  # BOI + patches + EOI
        self.seq_length = seq_length
        self.latent_numel = c * h * w
        latent_storage(latent_dtype)

    def _prepare(self, raw: RawRow) -> Tuple[Record, np.ndarray, List[np.ndarray], int, int]:
        record = parse_record(raw, self.columns, self.kind_mode)
        refs, images, frames = [], 0, 0
        for part in record.parts:
            if isinstance(part, ImagePart):
                refs.append(part.image)
                images += 1
            elif isinstance(part, VideoPart):
                refs.extend(part.frames)
                frames += len(part.frames)
        if refs and self.positions_per_image > self.seq_length:
            raise Rejected("image_exceeds_seq_length",
                           f"one image needs {self.positions_per_image} positions (BOI + patches + EOI) but "
                           f"--seq-length is {self.seq_length}")
        pixels = [self.encoder.prepare(load_image(ref, self.min_image_size)) for ref in refs]
        tokens = token_stream(record, self.tokenizer)
        return record, tokens, pixels, images, frames

    def build(self, rows: Sequence[RawRow]) -> List[Result]:
        import torch

        staged: List[Optional[tuple]] = []
        results: List[Optional[Result]] = []
        all_pixels: List[np.ndarray] = []
        for raw in rows:
            try:
                record, tokens, pixels, images, frames = self._prepare(raw)
            except Rejected as exc:
                results.append(Reject(raw.source, raw.row, exc))
                staged.append(None)
                continue
            staged.append((record, tokens, len(all_pixels), len(pixels), images, frames))
            all_pixels.extend(pixels)
            results.append(None)
        if all_pixels:
            latents = self.encoder.encode(torch.from_numpy(np.stack(all_pixels)))  # [n, C, H, W] float32
            stored = to_storage(latents, self.latent_dtype).reshape(len(all_pixels), -1)
            finite = torch.isfinite(torch.from_numpy(from_storage(stored, self.latent_dtype))).all(dim=1).numpy()
        else:
            stored = np.zeros((0, self.latent_numel), dtype=latent_storage(self.latent_dtype)[1])
            finite = np.zeros((0,), dtype=bool)
        for i, item in enumerate(staged):
            if item is None:
                continue
            record, tokens, start, count, images, frames = item
            bad = np.flatnonzero(~finite[start:start + count])
            if bad.size:
                results[i] = Reject(record.source, record.row, Rejected(
                    "nan_latent", f"latent {int(bad[0])} of {count} holds NaN or Inf after encoding to "
                                  f"{self.latent_dtype}"))
                continue
            results[i] = Document(record.source, record.row, tokens, stored[start:start + count], images, frames)
        return results
