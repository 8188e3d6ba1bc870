"""Generated multimodal documents: the embedded default data, and random layouts for tests and benchmarks.

Documents are learnable rather than noise: text is an arithmetic token progression (each document picks a start
and a stride), and each image's latent is a smooth pattern whose colour is a function of the document's first
text token, so a model that reads the caption can predict the image. Every random choice comes from one
numpy Generator, so a seed fixes the whole stream. With `copies` = 2 (objective.captioning = bagel) every frame is
laid out as a noised copy followed by a clean copy (frame_copies.py); the random stream is the same as with one copy
(the clean copy reuses the noised copy's patches), only the rows hold fewer documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from megafusion.data.batch import Batch
from megafusion.data.collate import FramePart, Part, SequenceLayout, TextPart, collate
from megafusion.data.frame_copies import check_copies, with_clean_copies
from megafusion.data.special_tokens import SPECIAL_TOKENS

LAYOUT_KINDS = ("text", "image", "interleaved", "multi_image", "video", "mixed")


@dataclass
class SyntheticSpec:
    vocab_size: int
    seq_length: int
    patch_dim: int
    patches_per_frame: int
    kind: str = "mixed"  # one of LAYOUT_KINDS; "mixed" draws a kind per document
    fill: float = 1.0  # fraction of seq_length to fill before padding (< 1 leaves a padded tail)
    copies: int = 1  # times each frame is laid out: 1, or 2 = noised + clean copy (objective.captioning=bagel)


class SyntheticDocuments:
    def __init__(self, spec: SyntheticSpec, seed: int = 0):
        if spec.kind not in LAYOUT_KINDS:
            raise ValueError(f"SyntheticSpec.kind={spec.kind!r}; choose one of {LAYOUT_KINDS}")
        if spec.vocab_size <= SPECIAL_TOKENS.num_reserved + 8:
            raise ValueError(f"vocab_size={spec.vocab_size} leaves no room for text after the reserved ids")
        check_copies(spec.copies)
        self.spec = spec
        self.rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ parts
    def _text(self, n: int, start: int, stride: int) -> TextPart:
        lo = SPECIAL_TOKENS.num_reserved
        span = self.spec.vocab_size - lo
        return TextPart(ids=(lo + (start + stride * np.arange(n)) % span).astype(np.int64))

    def _frame(self, colour: float, phase: float) -> FramePart:
        n, d = self.spec.patches_per_frame, self.spec.patch_dim
        grid = np.linspace(0, np.pi, n * d).reshape(n, d)
        patches = colour + 0.5 * np.sin(grid + phase) + 0.05 * self.rng.standard_normal((n, d))
        return FramePart(patches=patches.astype(np.float32))

    def _image(self, colour: float, frames: int = 1) -> List[Part]:
        parts: List[Part] = [TextPart(np.array([SPECIAL_TOKENS.boi]))]
        parts += [self._frame(colour, 0.3 * i) for i in range(frames)]
        parts.append(TextPart(np.array([SPECIAL_TOKENS.eoi])))
        return parts

    def document(self, kind: str) -> List[Part]:
        rng = self.rng
        if kind == "mixed":
            kind = LAYOUT_KINDS[rng.integers(0, len(LAYOUT_KINDS) - 1)]
        start, stride = int(rng.integers(0, 1000)), int(rng.integers(1, 5))
        colour = ((start % 7) - 3) / 3.0
        caption = lambda n: self._text(n, start, stride)  # noqa: E731
        doc: List[Part] = [TextPart(np.array([SPECIAL_TOKENS.bos]))]
        if kind == "text":
            doc.append(caption(int(rng.integers(8, 48))))
        elif kind == "image":
            doc += self._image(colour)
        elif kind == "interleaved":
            doc += [caption(int(rng.integers(4, 16)))] + self._image(colour) + [caption(int(rng.integers(4, 16)))]
        elif kind == "multi_image":
            doc.append(caption(int(rng.integers(4, 12))))
            for _ in range(2):
                doc += self._image(colour) + [caption(int(rng.integers(2, 8)))]
        elif kind == "video":
            doc += [caption(int(rng.integers(4, 12)))] + self._image(colour, frames=int(rng.integers(2, 4)))
        doc.append(TextPart(np.array([SPECIAL_TOKENS.eos])))
        return doc

    # ------------------------------------------------------------------ rows
    def row(self) -> SequenceLayout:
        """Documents packed whole until the next one would not fit; the tail is left as padding."""
        budget = int(self.spec.seq_length * self.spec.fill)
        layout = SequenceLayout()
        used = 0
        for _ in range(64):
            doc = self.document(self.spec.kind)
            n = sum(self._cost(part) for part in doc)
            if used + n > budget:
                if used == 0:
                    doc, n = self._truncate(doc, budget), budget
                else:
                    break
            layout.documents.append(with_clean_copies(doc) if self.spec.copies == 2 else doc)
            used += n
            if used >= budget:
                break
        return layout

    def _cost(self, part: Part) -> int:
        """Positions a part takes in a row: a frame's patches once per copy."""
        return len(part.ids) if isinstance(part, TextPart) else part.patches.shape[0] * self.spec.copies

    def _truncate(self, doc: List[Part], budget: int) -> List[Part]:
        out: List[Part] = []
        used = 0
        for part in doc:
            n = self._cost(part)
            if used + n > budget:
                if isinstance(part, TextPart):
                    out.append(TextPart(part.ids[: budget - used]))
                    used = budget
                break
            out.append(part)
            used += n
        if used < budget:  # a frame did not fit: top up with text so the row is exactly `budget` long
            out.append(self._text(budget - used, 0, 1))
        return out

    def batch(self, batch_size: int) -> Batch:
        return collate([self.row() for _ in range(batch_size)], self.spec.seq_length, self.spec.patch_dim)
