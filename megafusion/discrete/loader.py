"""Data iterators of the masked-diffusion family: config -> resumable, DP-sharded iterators of clean discrete
Batch micro-batches (megafusion.discrete.batch), with the loader's DataIterator and MicroBatchSampler.

    train_iter, valid_iter = build_discrete_iterators(cfg, dp_rank, dp_size, consumed_samples)

Sources map a global sample index to a row plan; `DiscreteMicroBatches` turns a micro-batch's plans into a Batch.
With data.paths empty the rows are generated (megafusion.discrete.synthetic); otherwise data.paths are dataset
folders written by `tools/preprocess_data.py --family masked_diffusion` (megafusion.discrete.dataset), whose
vocabulary must equal the config's, split, ordered, packed and blended by megafusion.discrete.rows. Either way the
row of global sample i is a pure function of (config, i), so `state_dict()` = {"consumed_samples"} resumes
exactly and DP ranks shard by sample index (MicroBatchSampler). Batches are built in the calling process
(data.num_workers does not apply to this family).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from megafusion.config.schema import Config
from megafusion.data.batch import Batch
from megafusion.data.loader import TRAIN, VALID, DataIterator
from megafusion.discrete.batch import discrete_batch
from megafusion.discrete.rows import check_mixed_fit, check_vocab, discrete_sources, open_discrete_datasets
from megafusion.discrete.synthetic import SyntheticDiscreteRows
from megafusion.discrete.vocab import UnifiedVocab
from megafusion.objectives.masked_diffusion import vocab_from_config


class DiscreteMicroBatches:
    """Row plans -> clean discrete Batch; `source.row(plan)` gives a row's documents."""

    def __init__(self, source, seq_length: int, vocab: UnifiedVocab, patch_dim: int):
        self.source, self.seq_length, self.vocab, self.patch_dim = source, seq_length, vocab, patch_dim

    def __getitem__(self, plans) -> Batch:
        return discrete_batch([self.source.row(p) for p in plans], self.seq_length, self.vocab, self.patch_dim)


def build_discrete_iterators(cfg: Config, dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                             data_state: Optional[dict] = None, datasets: Optional[Sequence] = None
                             ) -> Tuple[DataIterator, Optional[DataIterator]]:
    t, d = cfg.training, cfg.data
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ValueError(f"training.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
                         f"* dp_size = {t.micro_batch_size} * {dp_size}")
    vocab = vocab_from_config(cfg.objective.masked_diffusion)
    if d.paths:
        if datasets is None:
            datasets = open_discrete_datasets(d.paths, vocab, d.seq_length)
        for ds in datasets:  # opened elsewhere: the same checks
            check_vocab(ds, vocab)
            check_mixed_fit(ds, d.seq_length)
        sources = list(discrete_sources(datasets, d.seq_length, d.valid_fraction, d.seed, d.weights))
    else:
        sources = [SyntheticDiscreteRows(vocab, d.seq_length, d.seed, split) for split in (TRAIN, VALID)]
    iters = [None if src is None else
             DataIterator(src, DiscreteMicroBatches(src, d.seq_length, vocab, cfg.model.patch_dim),
                          t.micro_batch_size, dp_rank, dp_size, consumed if split == TRAIN else 0, 0)
             for split, (src, consumed) in enumerate(zip(sources, (consumed_samples, 0)))]
    return iters[0], (iters[1] if d.valid_fraction > 0 else None)
