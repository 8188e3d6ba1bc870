"""Blending: global sample index -> (dataset, row of that dataset's packed stream), by weight.

Uses megatron-core's `build_blending_indices` (megatron/core/datasets/helpers.cpp, the index behind its
BlendedDataset): sample i goes to the dataset whose achieved share lags its weight the most, so after n samples
dataset k has received weights[k] * n samples up to rounding, and its j-th sample is row j of its own stream.
The greedy choice for sample i depends only on the samples before it, so the index for n samples is a prefix of
the index for any larger n; `BlendIndex` grows it by doubling as the run moves on, and a resumed run rebuilds
the same prefix. Weights default to each dataset's size in packed positions (data.weights empty).
BlendedDataset itself is not used because it needs MegatronDataset instances of a fixed size and a cache
folder, whereas packed streams here are endless and planned lazily.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from megatron.core.datasets.utils import normalize


class BlendIndex:
    """Deterministic weighted interleaving of datasets: `lookup(i)` -> (dataset id, sample id within it)."""

    def __init__(self, weights: Sequence[float], initial_size: int = 1 << 14):
        if not weights:
            raise ValueError("data.weights: need at least one dataset to blend")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data.weights={list(weights)} must be non-negative with a positive sum")
        self.weights = np.asarray(normalize([float(w) for w in weights]), dtype=np.float64)
        self._size = 0
        self._dataset = np.zeros(0, dtype=np.int16)
        self._sample = np.zeros(0, dtype=np.int64)
        self._grow(initial_size)

    def _grow(self, size: int) -> None:
        if len(self.weights) == 1:
            self._dataset = np.zeros(size, dtype=np.int16)
            self._sample = np.arange(size, dtype=np.int64)
        else:
            from megatron.core.datasets import helpers_cpp

            self._dataset = np.zeros(size, dtype=np.int16)
            self._sample = np.zeros(size, dtype=np.int64)
            helpers_cpp.build_blending_indices(self._dataset, self._sample, self.weights, len(self.weights), size,
                                               False)
        self._size = size

    def lookup(self, index: int) -> Tuple[int, int]:
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        if len(self.weights) == 1:
            return 0, index
        if index >= self._size:
            size = self._size
            while size <= index:
                size *= 2
            self._grow(size)
        return int(self._dataset[index]), int(self._sample[index])

    def counts(self, n: int) -> List[int]:
        """Samples each dataset receives among the first n."""
        if len(self.weights) == 1:
            return [n]
        self.lookup(max(n - 1, 0))
        return np.bincount(self._dataset[:n], minlength=len(self.weights)).tolist()
