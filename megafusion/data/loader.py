"""The data loader: config -> resumable, DP-sharded iterators of Batch micro-batches.

    train_iter, valid_iter = build_data_iterators(cfg, dp_rank, dp_size, consumed_samples)
    batch = next(train_iter)                 # Batch of training.micro_batch_size packed rows
    train_iter.state_dict()                  # {"consumed_samples": ..., "streams": ...} -> store in checkpoints
    build_data_iterators(cfg, dp_rank, dp_size, state["consumed_samples"], data_state=state)   # resume

Sources: `data.paths` lists preprocessed dataset folders (indexed.py), split by document into train / valid,
ordered, packed and blended as described in sampler.py. With `data.paths` empty the rows are generated:
global sample i of split s is `SyntheticDocuments(seed=(data.seed, s, i)).row()`, so synthetic data is resumable
and DP-shardable by the same sample indices.

Work split: the main process plans (which documents and token ranges form each row: metadata only, cheap);
`data.num_workers` background processes (torch DataLoader over `MicroBatchDataset`, tasks of TASK_MICRO_BATCHES
micro-batch plans) read tokens and latents, patchify and collate (packing.read_row + collate.collate_packed), so
reading long inputs overlaps the training step; finished batches are written into a shared-memory ring
(`BatchRing`) whose slots are leased to the caller: a Batch from a worker is a set of views of its slot, which is
reused once the caller has dropped it. With num_workers = 0 the same code runs in-process and yields identical
batches. In every Batch the loader hands out, noisy_latents is the latents tensor itself (see collate.py): do not
write either in place; megafusion.objectives.flow_matching.noise_batch returns fresh tensors.

`consumed_samples` counts global samples (all DP ranks) handed to the caller, not those prefetched; it is what a
checkpoint stores. `state_dict()` also carries planner snapshots of each packed stream at that point; passing it
back as `data_state` resumes planning there (otherwise every row since the start is re-planned, which is exact
but grows with the run). Both paths yield the same batches. `valid_iter` is None when there is no validation
data; `valid_iter.reset()` restarts it so each evaluation can see the same batches.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import weakref
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megafusion.config.schema import Config
from megafusion.data.batch import Batch
from megafusion.data.blending import BlendIndex
from megafusion.data.collate import SequenceLayout, collate, collate_packed
from megafusion.data.indexed import MultimodalDataset
from megafusion.data.packing import read_row
from megafusion.data.sampler import MicroBatchSampler, PackedRowStream, split_documents
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec

TRAIN, VALID = 0, 1
TASK_MICRO_BATCHES = 2  # micro-batches per worker task: halves the DataLoader round trips per batch


# ---------------------------------------------------------------------- sources (main process: plans)
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


# ---------------------------------------------------------------------- worker side: plans -> Batch
class MicroBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are micro-batch plans (lists of row plans); returns a collated Batch."""

    def __init__(self, seq_length: int, patch_dim: int, patch_size: int,
                 datasets: Sequence[MultimodalDataset] = (), synthetic: Optional[SyntheticRows] = None):
        self.seq_length, self.patch_dim, self.patch_size = seq_length, patch_dim, patch_size
        self.datasets = list(datasets)
        self.synthetic = synthetic
        frame_tokens = {ds.frame_token for ds in self.datasets}
        if len(frame_tokens) > 1:
            raise ValueError(f"data.paths: the datasets use different FRAME token ids {sorted(frame_tokens)}")
        self.frame_token = frame_tokens.pop() if frame_tokens else None

    def synthetic_row(self, plan) -> SequenceLayout:
        s = self.synthetic
        seed = int(np.random.SeedSequence([s.seed, s.split, int(plan)]).generate_state(1)[0])
        return SyntheticDocuments(s.spec, seed=seed).row()

    def __getitem__(self, plans) -> Batch:
        return self.build(plans)

    def build(self, plans, latent_out=None) -> Batch:
        """The Batch of these row plans; `latent_out(rows, patch_dim)` gives the array latents are written into."""
        if self.synthetic is not None:
            return collate([self.synthetic_row(p) for p in plans], self.seq_length, self.patch_dim)
        rows = [read_row(self.datasets[k], segments) for k, segments in plans]
        return collate_packed(rows, self.seq_length, self.patch_size, self.patch_dim, self.frame_token,
                              latent_out=latent_out)

    def max_batch_bytes(self, micro_batch_size: int) -> int:
        """Bytes of the largest possible Batch (every position a latent one), fields 8-byte aligned; noisy_latents
        is latents until noised and is not stored again."""
        n = micro_batch_size * self.seq_length
        per_field = [8 * n] * 6 + [4 * n, n, 4 * n * self.patch_dim, 4 * n]
        return sum(-(-size // 8) * 8 for size in per_field)


class BatchRing:
    """Shared-memory slots that workers write finished batches into; the caller gets the batch's fields as views of
    its slot, and the slot is written again only after every one of those tensors is gone.

    Handing a worker's batch over as fresh shared tensors costs the main process a file descriptor per storage,
    a new mapping and a page fault per 4 KiB on first touch: more than building the batch; copying it out of a
    reused slot costs a pass over all its bytes. The ring is mapped once; the plan sampler leases a free slot when
    it dispatches a task (`acquire`), the worker writes the batch there and only a small field table travels back.
    `lease` wraps the slot as the Batch's tensors; a finalizer on their common base returns the slot to the free
    list when the caller drops the last of them. With no slot free (the caller holds many batches) a task gets slot
    -1 and its batch travels the ordinary DataLoader way. A tensor that stands for two fields (noisy_latents =
    latents, see collate.py) is written once and aliased again on read.
    """

    def __init__(self, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, slot_bytes
        self.buffer = torch.empty(slots * slot_bytes, dtype=torch.uint8).share_memory_()
        self._free = list(range(slots - 1, -1, -1))  # main process only

    def acquire(self) -> int:
        """A free slot for the next task, or -1 when every slot is leased or in flight."""
        return self._free.pop() if self._free else -1

    def _release(self, slot: int) -> None:
        self._free.append(slot)

    def array(self, slot: int, shape, dtype) -> np.ndarray:
        """A writable array at the start of `slot` (worker side), e.g. for latents to be patchified into; `write`
        then finds the field already in place and does not copy it."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes > self.slot_bytes:
            raise RuntimeError(f"{nbytes} bytes exceed the ring slot of {self.slot_bytes}")
        base = slot * self.slot_bytes
        return self.buffer.numpy()[base: base + nbytes].view(dt).reshape(shape)

    def write(self, slot: int, batch: Batch):
        flat = self.buffer.numpy()
        base = slot * self.slot_bytes
        start = flat.ctypes.data + base
        values = [(f.name, getattr(batch, f.name)) for f in dataclasses.fields(Batch)]
        in_place = {}  # fields built in the slot already (`array`): name -> offset
        offset = 0
        for name, value in values:
            if value is not None and value.numel():
                at = value.data_ptr() - start
                if 0 <= at and at + value.numel() * value.element_size() <= self.slot_bytes:
                    in_place[name] = at
                    offset = max(offset, -(-(at + value.numel() * value.element_size()) // 8) * 8)
        meta, shipped = [], {}
        for name, value in values:
            if value is None:
                continue
            if id(value) in shipped:  # the same tensor under two names (noisy_latents = latents): ship it once
                meta.append((name, shipped[id(value)], None, None))
                continue
            arr = value.numpy()
            if name in in_place:
                at = in_place[name]
            else:
                src = arr.reshape(-1).view(np.uint8)
                if offset + src.size > self.slot_bytes:
                    raise RuntimeError(f"batch of {offset + src.size}+ bytes exceeds the ring slot of "
                                       f"{self.slot_bytes}")
                flat[base + offset: base + offset + src.size] = src
                at = offset
                offset += -(-src.size // 8) * 8
            meta.append((name, arr.dtype.str, tuple(value.shape), at))
            shipped[id(value)] = name
        return _RingRef(slot, meta, offset)

    def lease(self, ref: "_RingRef") -> Batch:
        """The batch in slot ref.slot as views of the slot; the slot is freed once they are all dropped."""
        base = ref.slot * self.slot_bytes
        # frombuffer of a fresh memoryview: the fields' numpy base is this array, so its finalizer fires exactly
        # when the last field tensor (torch.from_numpy keeps its array alive) is gone
        data = np.frombuffer(memoryview(self.buffer.numpy())[base: base + max(ref.nbytes, 1)], dtype=np.uint8)
        fields = {}
        for name, dtype, shape, offset in ref.meta:
            if shape is None:  # an alias of an earlier field
                fields[name] = fields[dtype]
                continue
            dt = np.dtype(dtype)
            fields[name] = torch.from_numpy(data[offset: offset + math.prod(shape) * dt.itemsize].view(dt).reshape(shape))
        weakref.finalize(data, self._release, ref.slot)
        return Batch(**fields)


class _RingRef:
    def __init__(self, slot: int, meta, nbytes: int):
        self.slot, self.meta, self.nbytes = slot, meta, nbytes


class _RingDataset(torch.utils.data.Dataset):
    """Worker side of the ring: a task is a list of (slot, plans), one per micro-batch; each batch is written into
    its slot (slot -1: the batch itself travels back)."""

    def __init__(self, dataset: MicroBatchDataset, ring: BatchRing):
        self.dataset, self.ring = dataset, ring

    def one(self, slot: int, plans):
        if slot < 0:
            return self.dataset[plans]
        batch = self.dataset.build(plans, latent_out=lambda n, d: self.ring.array(slot, (n, d), np.float32))
        return self.ring.write(slot, batch)

    def __getitem__(self, task):
        return [self.one(slot, plans) for slot, plans in task]


class _PlanSampler(torch.utils.data.Sampler):
    """Endless micro-batch plans of one DP rank, starting after consumed_samples, in tasks of `group` consecutive
    micro-batches (fewer DataLoader round trips per batch); leases ring slots if given."""

    def __init__(self, source, sampler: MicroBatchSampler, ring: Optional[BatchRing] = None, group: int = 1):
        self.source, self.sampler, self.ring, self.group = source, sampler, ring, group

    def __iter__(self):
        task = []
        for indices in self.sampler:
            task.append(((self.ring.acquire() if self.ring is not None else -1),
                         [self.source.plan(i) for i in indices]))
            if len(task) == self.group:
                yield task
                task = []


def _identity(x):
    return x


class DataIterator:
    """Iterator of Batch micro-batches with `state_dict()`; background workers when num_workers > 0."""

    def __init__(self, source, dataset: MicroBatchDataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, num_workers: int):
        self.source, self.dataset = source, dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.num_workers = num_workers
        self._start(consumed_samples)

    def _start(self, consumed_samples: int) -> None:
        sampler = MicroBatchSampler(self.micro_batch_size, self.dp_rank, self.dp_size, consumed_samples)
        self.consumed_samples = consumed_samples
        self._step = sampler.samples_per_micro_step
        self._ring = None
        self._pending: collections.deque = collections.deque()
        if self.num_workers > 0:
            prefetch, group = 2, TASK_MICRO_BATCHES
            # slots for the batches in flight plus those the caller still holds (more fall back to plain transfer)
            self._ring = BatchRing(prefetch * self.num_workers * group + 12,
                                   self.dataset.max_batch_bytes(self.micro_batch_size))
            tasks = _PlanSampler(self.source, sampler, self._ring, group)
            loader = torch.utils.data.DataLoader(_RingDataset(self.dataset, self._ring), batch_size=None,
                                                 sampler=tasks, num_workers=self.num_workers, collate_fn=_identity,
                                                 prefetch_factor=prefetch, persistent_workers=False)
            self._it: Iterator = iter(loader)
        else:
            self._it = (self.dataset[p] for (_, p), in _PlanSampler(self.source, sampler))

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        if self.num_workers > 0:
            if not self._pending:
                self._pending.extend(next(self._it))
            batch = self._pending.popleft()
            if isinstance(batch, _RingRef):
                batch = self._ring.lease(batch)
        else:
            batch = next(self._it)
        self.consumed_samples += self._step
        return batch

    def reset(self, consumed_samples: int = 0) -> None:
        """Restart at `consumed_samples` (0: the beginning, e.g. before each evaluation)."""
        self.close()
        self._start(consumed_samples)

    def close(self) -> None:
        self._pending = collections.deque()
        it = getattr(self, "_it", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._it = None
        self._ring = None

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
        datasets.append(ds)
    return datasets


def _packed_sources(cfg: Config, datasets: Sequence[MultimodalDataset]) -> Tuple[PackedRows, Optional[PackedRows]]:
    d, ppf = cfg.data, cfg.model.patches_per_frame
    splits = [split_documents(len(ds), d.valid_fraction, d.seed, k) for k, ds in enumerate(datasets)]
    sources = []
    for split in (TRAIN, VALID):
        keep = [k for k in range(len(datasets)) if len(splits[k][split])]
        if not keep:
            if split == TRAIN:
                raise ValueError(f"data.paths: no training documents in {list(d.paths)}")
            sources.append(None)
            continue
        streams = [PackedRowStream(datasets[k], splits[k][split], d.seq_length, ppf, d.seed, k, split) for k in keep]
        if d.weights:
            weights = [d.weights[k] for k in keep]
        else:
            weights = [s.positions for s in streams]
        fingerprint = {"paths": [datasets[k].folder for k in keep], "documents": [len(datasets[k]) for k in keep],
                       "split": split, "seed": d.seed, "valid_fraction": d.valid_fraction,
                       "seq_length": d.seq_length, "patches_per_frame": ppf, "weights": [float(w) for w in weights]}
        sources.append(PackedRows([datasets[k] for k in keep], streams, weights, fingerprint))
    return sources[0], sources[1]


def build_data_iterators(cfg: Config, dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                         data_state: Optional[dict] = None) -> Tuple[DataIterator, Optional[DataIterator]]:
    """(train_iter, valid_iter) of Batch micro-batches of training.micro_batch_size for this DP rank.

    `data_state`: a train_iter.state_dict() saved at `consumed_samples`; its planner snapshots let packing
    continue where it stood instead of re-planning from the start (ignored when it does not match the config).
    """
    t, d, m = cfg.training, cfg.data, cfg.model
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size * dp_size = "
            f"{t.micro_batch_size} * {dp_size}"
        )
    common = dict(seq_length=d.seq_length, patch_dim=m.patch_dim, patch_size=m.patch_size)
    if not d.paths:
        spec = SyntheticSpec(vocab_size=m.vocab_size, seq_length=d.seq_length, patch_dim=m.patch_dim,
                             patches_per_frame=m.patches_per_frame)
        train_src, valid_src = SyntheticRows(spec, d.seed, TRAIN), SyntheticRows(spec, d.seed, VALID)
        train_ds = MicroBatchDataset(synthetic=train_src, **common)
        valid_ds = MicroBatchDataset(synthetic=valid_src, **common)
    else:
        datasets = open_datasets(cfg)
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
