"""The data loader: config -> resumable, DP-sharded iterators of Batch micro-batches.

    train_iter, valid_iter = build_data_iterators(cfg, dp_rank, dp_size, consumed_samples)
    batch = next(train_iter)                 # Batch of training.micro_batch_size packed rows
    train_iter.state_dict()                  # {"consumed_samples": ..., "streams": ...} -> store in checkpoints
    build_data_iterators(cfg, dp_rank, dp_size, state["consumed_samples"], data_state=state)   # resume

Sources: `data.paths` lists preprocessed dataset folders (indexed.py), split by document into train / valid,
ordered, packed and blended as described in sampler.py. With `data.paths` empty the rows are generated:
global sample i of split s is `SyntheticDocuments(seed=(data.seed, s, i)).row()`, so synthetic data is resumable
and DP-shardable by the same sample indices.

Work split: planning (which documents and token ranges form each row: metadata only, cheap), reading tokens and
latents, patchify and collation (packing.read_rows + collate_packed.collate_packed_fields). With num_workers = 0
all of it runs in the calling process; with `data.num_workers` > 0 each background process (workers.py) plans and builds
every num_workers-th micro-batch into a shared-memory ring whose slots are leased to the caller, so reading long
inputs overlaps the training step and the caller only wraps finished batches. Both yield identical batches.

With objective.captioning = bagel every frame is laid out twice, a noised and a clean copy (frame_copies.py):
`copies` = 2 reaches the planner (a frame costs twice the positions), the collation of dataset rows and the
synthetic generator. A ring slot needs no more room: a Batch has at most one latent row per position. In
every Batch the loader hands out, noisy_latents is the latents tensor itself (see collate.py): do not write either
in place; megafusion.objectives.flow_matching.noise_batch returns fresh tensors.

`consumed_samples` counts global samples (all DP ranks) handed to the caller, not those prefetched; it is what a
checkpoint stores. `state_dict()` also carries planner snapshots of each packed stream at that point; passing it
back as `data_state` resumes planning there (otherwise every row since the start is re-planned, which is exact
but grows with the run). Both paths yield the same batches. `valid_iter` is None when there is no validation
data; `valid_iter.reset()` restarts it so each evaluation can see the same batches.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megafusion.config.schema import Config
from megafusion.data.batch import Batch
from megafusion.data.blending import BlendIndex
from megafusion.data.collate import Alloc, SequenceLayout, batch_from_fields, collate_fields, new_field
from megafusion.data.collate_packed import collate_packed_fields
from megafusion.data.frame_copies import check_copies, frame_copies
from megafusion.data.indexed import MultimodalDataset
from megafusion.data.packing import read_rows
from megafusion.data.sampler import MicroBatchSampler, PackedRowStream, split_documents
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.data.workers import WorkerPool

logger = logging.getLogger(__name__)

TRAIN, VALID = 0, 1


# ---------------------------------------------------------------------- sources: sample index -> plan
class PackedRows:
    """Blended packed rows of one split over several datasets: sample index -> (dataset id, row plan)."""

    def __init__(self, datasets: Sequence[MultimodalDataset], streams: Sequence[PackedRowStream],
                 weights: Sequence[float], fingerprint: dict):
        self.datasets = list(datasets)
        self.streams = list(streams)
        self.blend = BlendIndex(weights)
        self.fingerprint = fingerprint  # what the plan depends on; a snapshot is only reused when it matches

    def plan(self, index: int):
        k, row = self.blend.lookup(index)
        return k, self.streams[k].row(row)

    def state(self, consumed_samples: int) -> Optional[dict]:
        """Planner snapshots from which samples consumed_samples, ... are planned exactly."""
        rows = self.blend.counts(consumed_samples) if consumed_samples else [0] * len(self.streams)
        snaps = [s.snapshot(r) for s, r in zip(self.streams, rows)]
        if any(snap is None for snap in snaps):
            return None
        return {"fingerprint": self.fingerprint, "snapshots": snaps}

    def restore(self, state: dict) -> bool:
        if state.get("fingerprint") != self.fingerprint or len(state.get("snapshots", ())) != len(self.streams):
            return False
        for stream, snap in zip(self.streams, state["snapshots"]):
            stream.restore(snap)
        return True


class SyntheticRows:
    """Generated rows: the plan of sample i is i itself; the worker generates the row from (seed, split, i)."""

    def __init__(self, spec: SyntheticSpec, seed: int, split: int):
        self.spec, self.seed, self.split = spec, seed, split

    def plan(self, index: int):
        return index


# ---------------------------------------------------------------------- plans -> Batch
class MicroBatchDataset:
    """Builds micro-batches from their plans (lists of row plans), each frame laid out `copies` times."""

    def __init__(self, seq_length: int, patch_dim: int, patch_size: int,
                 datasets: Sequence[MultimodalDataset] = (), synthetic: Optional[SyntheticRows] = None,
                 copies: int = 1):
        self.seq_length, self.patch_dim, self.patch_size = seq_length, patch_dim, patch_size
        self.datasets = list(datasets)
        self.synthetic = synthetic
        self.copies = check_copies(copies)
        if synthetic is not None and synthetic.spec.copies != copies:
            raise ValueError(f"SyntheticSpec.copies={synthetic.spec.copies} but the loader lays frames out "
                             f"copies={copies} times; build both from objective.captioning")
        frame_tokens = {ds.frame_token for ds in self.datasets}
        if len(frame_tokens) > 1:
            raise ValueError(f"data.paths: the datasets use different FRAME token ids {sorted(frame_tokens)}")
        self.frame_token = frame_tokens.pop() if frame_tokens else None

    def synthetic_row(self, plan) -> SequenceLayout:
        s = self.synthetic
        seed = int(np.random.SeedSequence([s.seed, s.split, int(plan)]).generate_state(1)[0])
        return SyntheticDocuments(s.spec, seed=seed).row()

    def __getitem__(self, plans) -> Batch:
        return batch_from_fields(self.fields(plans))

    def fields(self, plans, alloc: Alloc = new_field) -> Dict[str, np.ndarray]:
        """The Batch fields of these row plans (noisy_latents is latents), written into `alloc`'s arrays."""
        if self.synthetic is not None:
            return collate_fields([self.synthetic_row(p) for p in plans], self.seq_length, self.patch_dim,
                                  alloc=alloc)
        tables = [read_rows(self.datasets[k], [segments for _, segments in run])
                  for k, run in itertools.groupby(plans, key=lambda plan: plan[0])]  # rows of one dataset together
        return collate_packed_fields(tables, self.seq_length, self.patch_size, self.patch_dim, self.frame_token,
                                     alloc=alloc, copies=self.copies)

    def field_bytes(self, micro_batch_size: int) -> List[int]:
        """Bytes of each field of the largest possible Batch (every position a latent one; clean copies are
        positions too, so they need no extra room)."""
        n = micro_batch_size * self.seq_length
        return [8 * n] * 6 + [4 * n, n, 4 * n * self.patch_dim, 4 * n]


class DataIterator:
    """Iterator of Batch micro-batches with `state_dict()`; background workers when num_workers > 0."""

    def __init__(self, source, dataset: MicroBatchDataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, num_workers: int):
        self.source, self.dataset = source, dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_workers = num_workers
        self._workers: Optional[WorkerPool] = None
        self._start(consumed_samples)

    def _start(self, consumed_samples: int) -> None:
        self._sampler = MicroBatchSampler(self.micro_batch_size, self.dp_rank, self.dp_size, consumed_samples)
        self.consumed_samples = consumed_samples
        self._step = self._sampler.samples_per_micro_step
        if self.num_workers > 0:
            self._workers = WorkerPool(self.dataset, self.source, self._sampler, self.num_workers,
                                       self.micro_batch_size)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        if self._workers is not None:
            batch = next(self._workers)
        else:
            indices = self._sampler.indices(self.consumed_samples // self._step)
            batch = self.dataset[[self.source.plan(i) for i in indices]]
        self.consumed_samples += self._step
        return batch

    def reset(self, consumed_samples: int = 0) -> None:
        """Restart at `consumed_samples` (0: the beginning, e.g. before each evaluation)."""
        self.close()
        self._start(consumed_samples)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
        self._workers = None

    def state_dict(self) -> dict:
        state = {"consumed_samples": self.consumed_samples}
        if isinstance(self.source, PackedRows):
            streams = self.source.state(self.consumed_samples)
            if streams is not None:
                state["streams"] = streams
        return state


# ---------------------------------------------------------------------- building
def open_datasets(cfg: Config) -> List[MultimodalDataset]:
    """Open and validate every folder of data.paths; their latent shape must match the model section."""
    m = cfg.model
    datasets = []
    for path in cfg.data.paths:
        ds = MultimodalDataset(path)
        c, h, w = ds.latent_shape
        if (c, h, w) != (m.latent_channels, m.latent_size, m.latent_size):
            raise ValueError(
                f"{path}: latent_shape [{c}, {h}, {w}] does not match model.latent_channels={m.latent_channels} "
                f"and model.latent_size={m.latent_size}; set them to the dataset's encoder output"
            )
        check_vocab(m.vocab_size, ds)
        datasets.append(ds)
    return datasets


def check_vocab(vocab_size: int, ds: MultimodalDataset) -> None:
    """model.vocab_size against a dataset's tokenizer and its largest token id: smaller is an error (ids past the
    embedding table), larger a warning (rows that are never trained)."""
    manifest = os.path.join(ds.folder, "manifest.json")
    tok = ds.tokenizer_vocab_size
    if tok is not None and vocab_size < tok:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer vocabulary {tok} of "
                         f"{ds.folder} ({manifest} tokenizer.vocab_size); set model.vocab_size={tok}")
    if ds.max_token_id >= vocab_size:
        raise ValueError(f"{ds.folder}: tokens.bin holds token id {ds.max_token_id} but model.vocab_size="
                         f"{vocab_size}; set model.vocab_size to at least {ds.max_token_id + 1}")
    if tok is not None and vocab_size > tok:
        logger.warning("model.vocab_size=%d is larger than the tokenizer vocabulary %d of %s: %d embedding rows "
                       "are never trained", vocab_size, tok, ds.folder, vocab_size - tok)


def _packed_sources(cfg: Config, datasets: Sequence[MultimodalDataset]) -> Tuple[PackedRows, Optional[PackedRows]]:
    d, ppf, copies = cfg.data, cfg.model.patches_per_frame, frame_copies(cfg.objective.captioning)
    splits = [split_documents(len(ds), d.valid_fraction, d.seed, k) for k, ds in enumerate(datasets)]
    sources = []
    for split in (TRAIN, VALID):
        keep = [k for k in range(len(datasets)) if len(splits[k][split])]
        if not keep:
            if split == TRAIN:
                raise ValueError(f"data.paths: no training documents in {list(d.paths)}")
            sources.append(None)
            continue
        streams = [PackedRowStream(datasets[k], splits[k][split], d.seq_length, ppf, d.seed, k, split, copies=copies)
                   for k in keep]
        if d.weights:
            weights = [d.weights[k] for k in keep]
        else:
            weights = [s.positions for s in streams]
        fingerprint = {"paths": [datasets[k].folder for k in keep], "documents": [len(datasets[k]) for k in keep],
                       "split": split, "seed": d.seed, "valid_fraction": d.valid_fraction,
                       "seq_length": d.seq_length, "patches_per_frame": ppf, "copies": copies,
                       "weights": [float(w) for w in weights]}
        sources.append(PackedRows([datasets[k] for k in keep], streams, weights, fingerprint))
    return sources[0], sources[1]


def build_data_iterators(cfg: Config, dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                         data_state: Optional[dict] = None, datasets: Optional[Sequence[MultimodalDataset]] = None
                         ) -> Tuple[DataIterator, Optional[DataIterator]]:
    """(train_iter, valid_iter) of Batch micro-batches of training.micro_batch_size for this DP rank.

    `datasets`: data.paths already opened by open_datasets(cfg) (the training loop validates them before it
    builds the model); None opens them here.
    `data_state`: a train_iter.state_dict() saved at `consumed_samples`; its planner snapshots let packing
    continue where it stood instead of re-planning from the start (ignored when it does not match the config).
    """
    t, d, m = cfg.training, cfg.data, cfg.model
    copies = frame_copies(cfg.objective.captioning)
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size * dp_size = "
            f"{t.micro_batch_size} * {dp_size}"
        )
    common = dict(seq_length=d.seq_length, patch_dim=m.patch_dim, patch_size=m.patch_size, copies=copies)
    if not d.paths:
        spec = SyntheticSpec(vocab_size=m.vocab_size, seq_length=d.seq_length, patch_dim=m.patch_dim,
                             patches_per_frame=m.patches_per_frame, copies=copies)
        train_src, valid_src = SyntheticRows(spec, d.seed, TRAIN), SyntheticRows(spec, d.seed, VALID)
        train_ds = MicroBatchDataset(synthetic=train_src, **common)
        valid_ds = MicroBatchDataset(synthetic=valid_src, **common)
    else:
        datasets = open_datasets(cfg) if datasets is None else datasets
        train_src, valid_src = _packed_sources(cfg, datasets)
        if data_state and data_state.get("consumed_samples") == consumed_samples and "streams" in data_state:
            train_src.restore(data_state["streams"])
        train_ds = MicroBatchDataset(datasets=train_src.datasets, **common)
        valid_ds = MicroBatchDataset(datasets=valid_src.datasets, **common) if valid_src else None
    train = DataIterator(train_src, train_ds, t.micro_batch_size, dp_rank, dp_size, consumed_samples, d.num_workers)
    valid = None
    if valid_src is not None and d.valid_fraction > 0:
        valid = DataIterator(valid_src, valid_ds, t.micro_batch_size, dp_rank, dp_size, 0, d.num_workers)
    return train, valid
