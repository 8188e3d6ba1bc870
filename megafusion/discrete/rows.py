"""Dataset-backed rows of the masked-diffusion family: data.paths folders (megafusion.discrete.dataset) -> global
sample index -> row plan -> the row's documents (docs/masked_diffusion_data.md).

Everything is a pure function of (config, sample index), so every DP rank, every resumed run and every fresh
loader plans the same rows:

1. Split. Dataset k's documents are split into train / valid with megafusion.data.sampler.split_documents
   (data.valid_fraction, data.seed): the same rule as the flow-matching family.
2. Epochs. Epoch e of (dataset k, split s) visits its documents in epoch_order(documents, data.seed, k, s, e).
3. Rows of an epoch (`plan_epoch`, metadata only: document lengths and mixed flags). Walking the epoch's order:
   - a text-only document is packed greedily end to end (next fit): it joins the open text row when it fits,
     else that row is closed (its tail is padding) and a new one opened. A text document longer than
     data.seq_length is first cut into seq_length-sized pieces (the last one shorter); each piece is then packed
     as its own document (it sees only itself: block-diagonal attention per document);
   - a mixed document (image or audio codes) gets a row of its own, right-padded; the open text row stays open.
   Rows are numbered in the order they are opened. The open text row is closed at the end of the epoch, so every
   document (every piece) appears exactly once per epoch and an epoch's plan depends only on e. The plan is
   built with numpy plus one small compiled loop (the next-fit assignment), and the last few epochs are cached.
   The rows of (k, s) are the rows of epoch 0, then of epoch 1, ... without a break.
4. Blending. Global sample i -> (dataset, row of its stream) by megafusion.data.blending.BlendIndex with
   data.weights, or each dataset's token count in the split when data.weights is empty.

A row plan is (dataset position, int64 [n_segments, 3] of (document, token_start, token_end)); `row(plan)` reads
the segments' ids from the dataset's memory map. A mixed document longer than data.seq_length cannot be laid out:
opening the datasets fails, naming the folder, the document and the fix.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np
from numba import njit

from megafusion.data.blending import BlendIndex
from megafusion.data.sampler import SPLITS, epoch_order, split_documents
from megafusion.discrete.dataset import MANIFEST, DiscreteDataset
from megafusion.discrete.vocab import UnifiedVocab

TRAIN, VALID = 0, 1
Plan = Tuple[int, np.ndarray]


# ---------------------------------------------------------------------------------------------------- checks
def check_vocab(ds: DiscreteDataset, vocab: UnifiedVocab) -> None:
    """The dataset's unified vocabulary must be the config's (same ids for the same tokens)."""
    if ds.vocab == vocab:
        return
    v = ds.vocab
    raise ValueError(
        f"{ds.folder}: the dataset's unified vocabulary {v.to_dict()} ({os.path.join(ds.folder, MANIFEST)} "
        f"vocabulary) differs from the config's {vocab.to_dict()} (objective.masked_diffusion); set "
        f"objective.masked_diffusion.text_vocab_size={v.text_size} objective.masked_diffusion.image_codebook_size="
        f"{v.image_codes} objective.masked_diffusion.audio_codebook_size={v.audio_codes} "
        f"objective.masked_diffusion.tasks=[{','.join(v.tasks)}] and model.vocab_size={v.size}, or use a dataset "
        f"preprocessed with the same tokenizers")


def check_mixed_fit(ds: DiscreteDataset, seq_length: int) -> None:
    """Every mixed document must fit one row of seq_length positions."""
    too_long = np.flatnonzero(ds.mixed & (ds.lengths > seq_length))
    if too_long.size:
        d = int(too_long[0])
        longest = int(ds.lengths[ds.mixed].max())
        raise ValueError(
            f"{ds.folder}: mixed document {d} ({ds.task_name(d)}) has {int(ds.lengths[d])} positions, more than "
            f"data.seq_length={seq_length} ({too_long.size} such documents); each image / audio document takes one "
            f"row of its own: raise data.seq_length to at least {longest}, or re-run tools/preprocess_data.py "
            f"--family masked_diffusion with --max-mixed-length {seq_length}")


def open_discrete_datasets(paths: Sequence[str], vocab: UnifiedVocab, seq_length: int) -> List[DiscreteDataset]:
    """Open and validate every folder of data.paths against the config's vocabulary and seq_length."""
    datasets = []
    for path in paths:
        ds = DiscreteDataset(path)
        check_vocab(ds, vocab)
        check_mixed_fit(ds, seq_length)
        datasets.append(ds)
    return datasets


# ---------------------------------------------------------------------------------------------------- one epoch
@njit(cache=True)
def _next_fit(lengths, mixed, seq_length):
    """Row of every piece (in visiting order): mixed pieces alone, text pieces next fit; returns (rows, count)."""
    n = lengths.shape[0]
    rows = np.empty(n, dtype=np.int64)
    count, open_row, fill = 0, -1, 0
    for i in range(n):
        if mixed[i]:
            rows[i] = count
            count += 1
        else:
            if open_row < 0 or fill + lengths[i] > seq_length:
                open_row = count
                count += 1
                fill = 0
            rows[i] = open_row
            fill += lengths[i]
    return rows, count


def plan_epoch(order: np.ndarray, lengths: np.ndarray, mixed: np.ndarray, seq_length: int
               ) -> Tuple[np.ndarray, np.ndarray]:
    """The rows of one epoch: (segments int64 [n, 3] of (document, start, end), row_ptr int64 [rows + 1]); row r
    is segments[row_ptr[r]:row_ptr[r + 1]]."""
    order = np.asarray(order, dtype=np.int64)
    doc_len = lengths[order].astype(np.int64)
    doc_mixed = mixed[order].astype(bool)
    if (doc_mixed & (doc_len > seq_length)).any():
        raise ValueError(f"a mixed document is longer than seq_length={seq_length} (check_mixed_fit first)")
    pieces = np.where(doc_mixed, 1, -(-doc_len // seq_length))
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(first.size, dtype=np.int64) - first  # piece index within its document
    start = k * seq_length
    end = np.minimum(start + seq_length, np.repeat(doc_len, pieces))
    rows, count = _next_fit(end - start, np.repeat(doc_mixed, pieces), seq_length)
    perm = np.argsort(rows, kind="stable")
    segments = np.stack([np.repeat(order, pieces)[perm], start[perm], end[perm]], axis=1)
    row_ptr = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=count), out=row_ptr[1:])
    return segments, row_ptr


# ---------------------------------------------------------------------------------------------------- streams
class DiscreteRowStream:
    """Rows of one (dataset, split): row r -> int64 [n_segments, 3], epochs planned on demand and cached."""

    def __init__(self, dataset: DiscreteDataset, documents: np.ndarray, seq_length: int, seed: int,
                 dataset_index: int, split: int, cache_epochs: int = 2):
        if len(documents) == 0:
            raise ValueError(f"{dataset.folder}: no {SPLITS[split]} documents to draw from")
        self.dataset, self.documents, self.seq_length = dataset, np.asarray(documents, dtype=np.int64), seq_length
        self.key = (seed, dataset_index, split)
        self.tokens = int(dataset.lengths[self.documents].sum())  # per epoch
        self._cache: "OrderedDict[int, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._cache_epochs = max(1, cache_epochs)
        self._starts = [0]  # first row of epoch e; one more entry than epochs counted

    def epoch(self, e: int) -> Tuple[np.ndarray, np.ndarray]:
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        order = epoch_order(self.documents, *self.key, e)
        plan = plan_epoch(order, self.dataset.lengths, self.dataset.mixed, self.seq_length)
        self._cache[e] = plan
        while len(self._cache) > self._cache_epochs:
            self._cache.popitem(last=False)
        return plan

    def locate(self, r: int) -> Tuple[int, int]:
        """(epoch, row within it) of stream row r."""
        if r < 0:
            raise IndexError(f"row {r} is negative")
        while self._starts[-1] <= r:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.epoch(e)[1]) - 1)
        e = bisect.bisect_right(self._starts, r) - 1
        return e, r - self._starts[e]

    def row(self, r: int) -> np.ndarray:
        e, j = self.locate(r)
        segments, row_ptr = self.epoch(e)
        return segments[row_ptr[j]:row_ptr[j + 1]].copy()


class DiscreteRows:
    """Blended rows of one split over several datasets: sample index -> plan, plan -> the row's documents."""

    def __init__(self, datasets: Sequence[DiscreteDataset], streams: Sequence[DiscreteRowStream],
                 weights: Sequence[float]):
        self.datasets, self.streams = list(datasets), list(streams)
        self.blend = BlendIndex(list(weights))

    def plan(self, index: int) -> Plan:
        k, r = self.blend.lookup(index)
        return k, self.streams[k].row(r)

    def row(self, plan: Plan) -> List[np.ndarray]:
        k, segments = plan
        ds = self.datasets[k]
        return [np.asarray(ds.tokens(int(d), int(s), int(e)), dtype=np.int64) for d, s, e in segments]


def discrete_sources(datasets: Sequence[DiscreteDataset], seq_length: int, valid_fraction: float, seed: int,
                     weights: Sequence[float] = ()) -> Tuple[DiscreteRows, Optional[DiscreteRows]]:
    """(train rows, valid rows or None) over the datasets (data.weights, else token counts, per split)."""
    splits = [split_documents(len(ds), valid_fraction, seed, k) for k, ds in enumerate(datasets)]
    sources: List[Optional[DiscreteRows]] = []
    for split in (TRAIN, VALID):
        keep = [k for k in range(len(datasets)) if len(splits[k][split])]
        if not keep:
            if split == TRAIN:
                raise ValueError(f"data.paths: no training documents in {[ds.folder for ds in datasets]}")
            sources.append(None)
            continue
        streams = [DiscreteRowStream(datasets[k], splits[k][split], seq_length, seed, k, split) for k in keep]
        w = [weights[k] for k in keep] if weights else [s.tokens for s in streams]
        sources.append(DiscreteRows([datasets[k] for k in keep], streams, w))
    return sources[0], sources[1]


__all__ = ["DiscreteRows", "DiscreteRowStream", "plan_epoch", "discrete_sources", "open_discrete_datasets",
           "check_vocab", "check_mixed_fit"]
