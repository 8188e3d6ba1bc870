"""Sample order: train/valid split, seeded per-epoch document order, packed row streams, DP micro-batches.

The scheme (everything is a pure function of data.seed, the dataset list and the config, so every rank, every
worker and every resumed run computes the same thing):

1. Split by document. Dataset k's documents are permuted with seed (data.seed, k, "split"); the first
   round(valid_fraction * D) of that permutation are validation documents, the rest training documents.
2. Document order. Epoch e of split s of dataset k visits its documents in a permutation drawn from
   (data.seed, k, s, e); epochs follow each other without a break, giving one endless document stream.
3. Rows. `RowPlanner` (packing.py) packs that stream greedily into rows of seq_length positions. Row r of
   (dataset k, split s) is therefore fixed; `PackedRowStream` plans rows lazily, keeps only a window of recent
   rows, and re-plans from the start of the stream if an older row is asked for. It also keeps planner
   snapshots at document boundaries, so a checkpoint can store where planning stands and a resumed run
   continues from there instead of re-planning every row since the start (loader.py `data_state`).
4. Samples. The global sample index i of a split is mapped to (dataset, row) by blending.py (megatron's
   blending index: dataset k receives a fraction weights[k] of the samples, deterministically interleaved).
5. Micro-batches. Micro-step t covers global samples [t*m*d, (t+1)*m*d) for micro-batch size m and DP size d;
   rank r takes samples t*m*d + r*m + [0, m). A global batch of G samples is G/(m*d) consecutive micro-steps,
   so the samples of optimizer step g are [g*G, (g+1)*G) for every DP size, the ranks' micro-batches of one
   step are disjoint, and together they are complete.
6. Resume. consumed_samples (a multiple of m*d) is the number of global samples consumed before this run;
   it restarts at micro-step consumed_samples / (m*d), which yields exactly the samples an uninterrupted run
   would have seen next. Rows are re-planned from the start of each stream (exact, cost grows with the run)
   unless the checkpoint's planner snapshots are given back, which continue the plan where it stood.
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

import numpy as np

from megafusion.data.indexed import MultimodalDataset
from megafusion.data.packing import RowPlanner

SPLITS = ("train", "valid")
PLAN_AHEAD = 32  # rows planned per compiled call at least
_SPLIT_SALT = 7919  # a fixed tag so the split permutation's stream differs from any epoch's


def split_documents(num_documents: int, valid_fraction: float, seed: int, dataset_index: int) -> Tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """(train document ids, valid document ids), each sorted; disjoint and together all documents."""
    perm = np.random.default_rng([seed, dataset_index, _SPLIT_SALT]).permutation(num_documents)
    n_valid = int(round(valid_fraction * num_documents))
    if valid_fraction > 0 and n_valid == 0 and num_documents >= 2:
        n_valid = 1
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def epoch_order(documents: np.ndarray, seed: int, dataset_index: int, split: int, epoch: int) -> np.ndarray:
    """The documents of one epoch in their visiting order."""
    return documents[np.random.default_rng([seed, dataset_index, split, epoch]).permutation(len(documents))]


class PackedRowStream:
    """Row plans of one (dataset, split): row r is a fixed [n_segments, 4] int64 plan (packing.py); each frame
    laid out `copies` times (2: objective.captioning = bagel, frame_copies.py)."""

    def __init__(self, dataset: MultimodalDataset, documents: np.ndarray, seq_length: int, patches_per_frame: int,
                 seed: int, dataset_index: int, split: int, window: int = 4096, copies: int = 1):
        if len(documents) == 0:
            raise ValueError(f"{dataset.folder}: no {SPLITS[split]} documents to draw from")
        self.dataset = dataset
        self.documents = documents
        self.seq_length = seq_length
        self.ppf = patches_per_frame
        self.copies = copies
        self.key = (seed, dataset_index, split)
        self.window = window
        self.positions = int(dataset.positions(patches_per_frame * copies)[documents].sum())  # per epoch
        self._restart()

    def _restart(self) -> None:
        self._planner = RowPlanner(self.dataset, self.seq_length, self.ppf, self.copies)
        self._base = 0  # row index of self._planner.rows[0]
        self._epoch = 0
        self._order = epoch_order(self.documents, *self.key, 0)
        self._next_doc = 0
        self._snapshots: List[dict] = []
        self._snap()

    def _snap(self) -> None:
        """Record the planner state at this document boundary (at most one per completed-row count)."""
        rows = self._base + len(self._planner.rows)
        if self._snapshots and self._snapshots[-1]["rows"] == rows:
            return
        self._snapshots.append({"rows": rows, "epoch": self._epoch, "next_doc": self._next_doc,
                                "fill": self._planner.fill, "open": [list(s) for s in self._planner._segments]})

    def _advance(self, need: int) -> None:
        """Feed documents (compiled, RowPlanner.add_from) until at least `need` more rows are complete."""
        planner = self._planner
        target = len(planner.rows) + need
        while len(planner.rows) < target:
            if self._next_doc == len(self._order):
                self._epoch += 1
                self._order = epoch_order(self.documents, *self.key, self._epoch)
                self._next_doc = 0
            last = self._snapshots[-1]["rows"] - self._base if self._snapshots else -1
            self._next_doc, snaps = planner.add_from(self._order, self._next_doc, target - len(planner.rows), last)
            for snap in snaps:
                self._snapshots.append(dict(snap, rows=self._base + snap["rows"], epoch=self._epoch))

    def row(self, r: int) -> np.ndarray:
        if r < self._base:
            self._restart()
        rows = self._planner.rows
        while r >= self._base + len(rows):
            # plan ahead in chunks: one compiled call then covers many rows (rows are asked for in order)
            self._advance(max(r - self._base - len(rows) + 1, PLAN_AHEAD))
            drop = min(len(rows) - self.window, r - self._base)  # rows before r beyond the window
            if len(rows) > 2 * self.window and drop > 0:  # keep memory flat: rows are requested in increasing order
                del rows[:drop]
                self._base += drop
                while len(self._snapshots) > 1 and self._snapshots[1]["rows"] <= self._base:
                    self._snapshots.pop(0)
        return rows[r - self._base]

    def snapshot(self, r: int):
        """A planner state from which rows r, r+1, ... are re-planned exactly (None if r is no longer covered).
        Plans up to row r - 1 first: with loader workers this copy of the stream plans only when asked."""
        if 0 < r and r > self._base + len(self._planner.rows):
            self.row(r - 1)
        best = None
        for snap in self._snapshots:
            if snap["rows"] > r:
                break
            best = snap
        return dict(best) if best is not None else None

    def restore(self, snap: dict) -> None:
        """Continue from a `snapshot`: the rows from snap["rows"] on come out as an uninterrupted run's."""
        self._planner = RowPlanner(self.dataset, self.seq_length, self.ppf, self.copies)
        self._planner.fill = int(snap["fill"])
        self._planner._segments = [tuple(int(v) for v in seg) for seg in snap["open"]]
        self._base = int(snap["rows"])
        self._epoch = int(snap["epoch"])
        self._order = epoch_order(self.documents, *self.key, self._epoch)
        self._next_doc = int(snap["next_doc"])
        self._snapshots = []
        self._snap()

    @property
    def epoch(self) -> int:
        return self._epoch


class MicroBatchSampler:
    """Global sample indices of this DP rank's micro-batches, starting after `consumed_samples`."""

    def __init__(self, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        step = micro_batch_size * dp_size
        if consumed_samples % step:
            raise ValueError(
                f"consumed_samples={consumed_samples} is not a multiple of micro_batch_size * dp_size = {step}; "
                f"resume from a checkpoint taken at a micro-batch boundary with the same micro-batch and DP sizes"
            )
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def samples_per_micro_step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def indices(self, micro_step: int) -> List[int]:
        start = micro_step * self.samples_per_micro_step + self.dp_rank * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))

    def __iter__(self) -> Iterator[List[int]]:
        t = self.consumed_samples // self.samples_per_micro_step
        while True:
            yield self.indices(t)
            t += 1
