"""Text -> token ids with a SentencePiece model whose special ids are megafusion.data.special_tokens, and the
document token stream with images spliced in:

    BOS  text ...  BOI FRAME EOI  text ...  BOI FRAME FRAME FRAME EOI  ...  EOS

(one FRAME per image or video frame; docs/DATA_FORMAT.md). The model is checked at load: pad/bos/eos/unk and the
<boi>/<eoi>/<frame> control pieces must sit at the reserved ids, else the error names the model file and the fix.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import List

import numpy as np

from megafusion.data.special_tokens import SPECIAL_TOKENS, SpecialTokens
from megafusion.preprocess.records import ImagePart, Record, TextPart, VideoPart
from megafusion.utils.files import file_sha256

# Control pieces placed at the reserved ids by tools/train_tokenizer.py (ids 4..num_reserved-1).
PIECES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "boi": "<boi>", "eoi": "<eoi>",
          "frame": "<frame>"}


def control_symbols(special: SpecialTokens = SPECIAL_TOKENS) -> List[str]:
    """The control pieces for ids 4..num_reserved-1, in id order (boi, eoi, frame, then spare slots)."""
    by_id = {special.boi: PIECES["boi"], special.eoi: PIECES["eoi"], special.frame: PIECES["frame"]}
    first = max(special.pad, special.bos, special.eos, special.unk) + 1
    return [by_id.get(i, f"<reserved_{i}>") for i in range(first, special.num_reserved)]




class TextTokenizer:
    def __init__(self, model_path: str, special: SpecialTokens = SPECIAL_TOKENS):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"--tokenizer {model_path}: no such file; train one with tools/train_tokenizer.py")
        self.path = os.path.abspath(model_path)
        self.sha256 = file_sha256(self.path)
        self.special = special
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self._check_special_ids()

    def _check_special_ids(self) -> None:
        s, sp = self.special, self.sp
        found = {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
                 "boi": sp.piece_to_id(PIECES["boi"]), "eoi": sp.piece_to_id(PIECES["eoi"]),
                 "frame": sp.piece_to_id(PIECES["frame"])}
        wrong = {k: (v, getattr(s, k)) for k, v in found.items() if v != getattr(s, k)}
        if wrong:
            details = ", ".join(f"{k} at id {got} (expected {want})" for k, (got, want) in wrong.items())
            raise ValueError(f"tokenizer {self.path}: special tokens at the wrong ids: {details}; retrain it with "
                             f"tools/train_tokenizer.py so ids match megafusion/data/special_tokens.py")
        if sp.get_piece_size() <= s.num_reserved:
            raise ValueError(f"tokenizer {self.path}: vocabulary {sp.get_piece_size()} leaves no ids for text")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) >= self.special.num_reserved or
                               int(i) == self.special.unk])

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size,
                "special_tokens": asdict(self.special)}


def token_stream(record: Record, tokenizer: TextTokenizer) -> np.ndarray:
    """The document's token stream [n] int32 (BOS ... EOS with BOI FRAME.. EOI per image / video)."""
    s = tokenizer.special
    ids: List[int] = [s.bos]
    for part in record.parts:
        if isinstance(part, TextPart):
            ids.extend(tokenizer.encode(part.text))
        elif isinstance(part, ImagePart):
            ids.extend((s.boi, s.frame, s.eoi))
        elif isinstance(part, VideoPart):
            ids.append(s.boi)
            ids.extend([s.frame] * len(part.frames))
            ids.append(s.eoi)
        else:  # pragma: no cover - Part is a closed union
            raise TypeError(f"unknown part {type(part).__name__}")
    ids.append(s.eos)
    return np.asarray(ids, dtype=np.int32)
