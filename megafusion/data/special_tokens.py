"""Reserved token ids shared by the tokenizer, the packer, the model and the sampler.

The SentencePiece trainer (tools/train_tokenizer.py) places these pieces at exactly these ids, so the ids are the
same with a trained tokenizer and with the tokenizer-free synthetic data used by tests and the tiny run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SpecialTokens:
    pad: int = 0
    bos: int = 1
    eos: int = 2
    unk: int = 3
    boi: int = 4  # begin of image (or of a video's frames)
    eoi: int = 5  # end of image
    frame: int = 6  # placeholder in stored token streams: one per image / video frame, expanded to its patches
    num_reserved: int = 16  # ids [0, num_reserved) are special; spare slots 7..15 are kept free

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "SpecialTokens":
        with open(path) as f:
            data = json.load(f)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown special-token names {sorted(unknown)}")
        return cls(**data)


SPECIAL_TOKENS = SpecialTokens()
