"""Generated discrete rows for the masked-diffusion family: the data of tests and parallel-parity runs when
data.paths is empty (the counterpart of megafusion/data/synthetic.py).

Rows follow the family's layout rules: a row is either several text-only documents packed end to end, or one
image-text / audio-text document right-padded. Documents are learnable: text is an arithmetic progression of text
ids (start and stride per document), and a document's image or audio codes are a progression whose start is a
function of its first text token, so a model that reads the text can predict the codes. Row i of split s is a pure
function of (seed, s, i), so synthetic data is resumable and DP-shardable by sample index.
"""

from __future__ import annotations

from typing import List

import numpy as np

from megafusion.discrete.vocab import AUDIO, IMAGE, TEXT, UnifiedVocab


class SyntheticDiscreteRows:
    """Sample index -> one row (a list of documents' unified ids) of at most seq_length positions."""

    def __init__(self, vocab: UnifiedVocab, seq_length: int, seed: int, split: int):
        if seq_length < 8:
            raise ValueError(f"data.seq_length={seq_length}: generated discrete rows need at least 8 positions")
        self.vocab, self.seq_length, self.seed, self.split = vocab, seq_length, seed, split

    def plan(self, index: int) -> int:
        return index

    def row(self, index: int) -> List[np.ndarray]:
        seed = int(np.random.SeedSequence([self.seed, self.split, int(index)]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        kinds = ["text"] + [k for k, n in (("image_text", self.vocab.image_codes),
                                          ("audio_text", self.vocab.audio_codes)) if n > 0]
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "text":
            return self._packed_text(rng)
        return [self._media_document(rng, IMAGE if kind == "image_text" else AUDIO, kind)]

    def _progression(self, rng, modality: int, length: int, start=None) -> np.ndarray:
        lo, hi = self.vocab.content_range(modality)
        span = hi - lo
        first = int(rng.integers(span)) if start is None else start % span
        stride = int(rng.integers(1, 4))
        return lo + (first + stride * np.arange(length)) % span

    def _packed_text(self, rng) -> List[np.ndarray]:
        docs, free = [], self.seq_length
        while free >= 4:
            n = int(rng.integers(1, max(2, min(free - 3, self.seq_length // 2)) + 1))
            n = min(n, free - 3)
            docs.append(self.vocab.document("text", [(TEXT, self._progression(rng, TEXT, n))]))
            free -= len(docs[-1])
            if rng.random() < 0.3:  # leave a padded tail now and then
                break
        return docs

    def _media_document(self, rng, modality: int, task: str) -> np.ndarray:
        budget = self.seq_length - 5  # task + BOS/EOS of two spans
        n_text = int(rng.integers(1, max(2, budget // 3) + 1))
        n_codes = int(rng.integers(1, budget - n_text + 1))
        text = self._progression(rng, TEXT, n_text)
        codes = self._progression(rng, modality, n_codes, start=int(text[0]) * 7)
        return self.vocab.document(task, [(TEXT, text), (modality, codes)])
