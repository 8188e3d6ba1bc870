"""UnifiedVocab: the one discrete vocabulary of the masked-diffusion family (text ⊔ image codes ⊔ audio codes ⊔
specials), and the document layout every tool agrees on.

Id layout (contiguous ranges, in this order):

    [0, T)                      text ids (the SentencePiece model's own ids, its specials included)
    [T, T + I)                  image codebook entries 0..I-1
    [T + I, T + I + A)          audio codebook entries 0..A-1
    then per modality m in (text, image, audio):  BOS_m, EOS_m, MASK_m, PAD_m
    then the task tokens, in the order of `tasks` (default: text, image_text, audio_text)

A document is one token stream: a task token, then one span per part, each `BOS_m  ...  EOS_m`:

    text-only     <task:text>        BOS_t text EOS_t
    image-text    <task:image_text>  BOS_t caption EOS_t  BOS_i codes EOS_i
    audio-text    <task:audio_text>  BOS_t transcript EOS_t  BOS_a codes EOS_a

The modality of a position is that of the range its id falls in (BOS/EOS/MASK/PAD of m count as m; task tokens
count as text). `modality_of` is vectorised over tensors and arrays; `to_dict` / `from_dict` store the vocabulary
in dataset manifests and checkpoints so every consumer checks it is reading the ids it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITY_NAMES = ("text", "image", "audio")
SPECIAL_KINDS = ("bos", "eos", "mask", "pad")
DEFAULT_TASKS = ("text", "image_text", "audio_text")


@dataclass(frozen=True)
class UnifiedVocab:
    text_size: int
    image_codes: int = 0
    audio_codes: int = 0
    tasks: Tuple[str, ...] = field(default=DEFAULT_TASKS)

    def __post_init__(self):
        if self.text_size <= 0:
            raise ValueError(f"UnifiedVocab.text_size={self.text_size} must be positive (the text tokenizer's size)")
        if self.image_codes < 0 or self.audio_codes < 0:
            raise ValueError("UnifiedVocab: codebook sizes must be >= 0")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"UnifiedVocab.tasks={self.tasks} must be distinct names, at least one")

    # ------------------------------------------------------------------ ranges
    @property
    def code_offsets(self) -> Tuple[int, int, int]:
        """First id of each modality's content range (text, image codes, audio codes)."""
        return 0, self.text_size, self.text_size + self.image_codes

    @property
    def content_sizes(self) -> Tuple[int, int, int]:
        return self.text_size, self.image_codes, self.audio_codes

    @property
    def first_special(self) -> int:
        return self.text_size + self.image_codes + self.audio_codes

    @property
    def size(self) -> int:
        """Number of ids (the model's unpadded vocabulary)."""
        return self.first_special + len(MODALITY_NAMES) * len(SPECIAL_KINDS) + len(self.tasks)

    def special(self, modality: int, kind: str) -> int:
        """Id of BOS / EOS / MASK / PAD of `modality` (TEXT, IMAGE or AUDIO)."""
        if kind not in SPECIAL_KINDS:
            raise KeyError(f"unknown special token kind {kind!r}; one of {SPECIAL_KINDS}")
        return self.first_special + modality * len(SPECIAL_KINDS) + SPECIAL_KINDS.index(kind)

    def bos(self, m: int) -> int:
        return self.special(m, "bos")

    def eos(self, m: int) -> int:
        return self.special(m, "eos")

    def mask(self, m: int) -> int:
        return self.special(m, "mask")

    def pad(self, m: int = TEXT) -> int:
        return self.special(m, "pad")

    def task(self, name: str) -> int:
        if name not in self.tasks:
            raise KeyError(f"task token {name!r} is not in this vocabulary (tasks: {list(self.tasks)})")
        return self.first_special + len(MODALITY_NAMES) * len(SPECIAL_KINDS) + self.tasks.index(name)

    def content_range(self, modality: int) -> Tuple[int, int]:
        """[start, end) of the content ids of `modality` (text ids, or its codebook)."""
        start = self.code_offsets[modality]
        return start, start + self.content_sizes[modality]

    def allowed_ids(self, modality: int, with_eos: bool = False) -> torch.Tensor:
        """Ids a generated position of `modality` may take: its content range (and its EOS when asked)."""
        start, end = self.content_range(modality)
        ids = torch.arange(start, end)
        if with_eos:
            ids = torch.cat([ids, torch.tensor([self.eos(modality)])])
        return ids

    # ------------------------------------------------------------------ codes <-> ids
    def codes_to_ids(self, modality: int, codes) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        start, end = self.content_range(modality)
        if codes.size and (codes.min() < 0 or codes.max() >= end - start):
            raise ValueError(f"{MODALITY_NAMES[modality]} codes must lie in [0, {end - start}), got "
                             f"[{codes.min()}, {codes.max()}]")
        return codes + start

    def ids_to_codes(self, modality: int, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        start, end = self.content_range(modality)
        bad = (ids < start) | (ids >= end)
        if bad.any():
            raise ValueError(f"ids {ids[bad][:5].tolist()} are not {MODALITY_NAMES[modality]} content ids "
                             f"[{start}, {end})")
        return ids - start

    # ------------------------------------------------------------------ modality of ids
    def modality_of(self, ids):
        """Modality (TEXT / IMAGE / AUDIO) of every id; tensors give tensors, arrays give arrays."""
        is_tensor = torch.is_tensor(ids)
        x = ids if is_tensor else np.asarray(ids, dtype=np.int64)
        lib = torch if is_tensor else np
        out = lib.zeros_like(x)
        _, img0, aud0 = self.code_offsets
        out = lib.where((x >= img0) & (x < aud0), IMAGE, out)
        out = lib.where((x >= aud0) & (x < self.first_special), AUDIO, out)
        rel = x - self.first_special
        per = len(SPECIAL_KINDS)
        in_specials = (rel >= 0) & (rel < len(MODALITY_NAMES) * per)
        special_modality = rel // per if not is_tensor else torch.div(rel, per, rounding_mode="floor")
        return lib.where(in_specials, special_modality, out)

    def is_mask(self, ids):
        m = [self.mask(k) for k in range(len(MODALITY_NAMES))]
        return (ids == m[0]) | (ids == m[1]) | (ids == m[2])

    # ------------------------------------------------------------------ documents
    def document(self, task: str, parts: Sequence[Tuple[int, Sequence[int]]]) -> np.ndarray:
        """The token stream of one document: task token, then `BOS_m ids EOS_m` per (modality, unified ids)."""
        pieces: List[np.ndarray] = [np.array([self.task(task)], dtype=np.int64)]
        for modality, ids in parts:
            pieces.append(np.array([self.bos(modality)], dtype=np.int64))
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(np.array([self.eos(modality)], dtype=np.int64))
        return np.concatenate(pieces)

    def is_text_only(self, ids) -> bool:
        return bool((self.modality_of(np.asarray(ids)) == TEXT).all())

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> Dict:
        return {"text_size": self.text_size, "image_codes": self.image_codes, "audio_codes": self.audio_codes,
                "tasks": list(self.tasks), "size": self.size}

    @classmethod
    def from_dict(cls, d: Dict, where: str = "vocabulary") -> "UnifiedVocab":
        try:
            vocab = cls(int(d["text_size"]), int(d.get("image_codes", 0)), int(d.get("audio_codes", 0)),
                        tuple(d.get("tasks", DEFAULT_TASKS)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a unified vocabulary ({e}); expected text_size, image_codes, "
                             f"audio_codes, tasks") from e
        if "size" in d and int(d["size"]) != vocab.size:
            raise ValueError(f"{where}: size {d['size']} does not match the layout's {vocab.size}")
        return vocab
