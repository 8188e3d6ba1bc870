"""The loader's hot path (read_row + collate_packed) against the reference path (layout_row + collate), the
latents/noisy_latents aliasing, and BatchRing slot leasing."""

import dataclasses
import gc

import numpy as np
import pytest
import torch
from fixtures import random_docs, write_dataset

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.batch import Batch
from megafusion.data.collate import collate, collate_packed
from megafusion.data.indexed import MultimodalDataset
from megafusion.data.loader import BatchRing, MicroBatchDataset
from megafusion.data.packing import RowPlanner, layout_row, read_row
from megafusion.objectives.flow_matching import noise_batch

SHAPE = (4, 8, 8)
P = 2
PPF = 16
PATCH_DIM = 16


def _plans(ds, seq_length):
    planner = RowPlanner(ds, seq_length, PPF)
    for d in range(len(ds)):
        planner.add(d)
    planner.flush()
    return planner.rows


@pytest.fixture(scope="module", params=["float32", "bfloat16-as-uint16", "float16-as-uint16"])
def dataset(request, tmp_path_factory):
    docs = random_docs(np.random.default_rng(5), 60, SHAPE)
    folder = write_dataset(str(tmp_path_factory.mktemp(request.param)), docs, SHAPE, storage=request.param)
    return MultimodalDataset(folder)


@pytest.mark.parametrize("seq_length", [40, 64, 300])
def test_collate_packed_equals_collate_of_layouts(dataset, seq_length):
    plans = _plans(dataset, seq_length)
    checked = 0
    for b in (1, 2, 3):
        for i in range(0, len(plans) - b + 1, b):
            ref = collate([layout_row(dataset, p, P) for p in plans[i: i + b]], seq_length, PATCH_DIM).validate()
            got = collate_packed([read_row(dataset, p) for p in plans[i: i + b]], seq_length, P, PATCH_DIM,
                                 dataset.frame_token).validate()
            for f in dataclasses.fields(Batch):
                x, y = getattr(ref, f.name), getattr(got, f.name)
                assert (x is None) == (y is None), f.name
                if x is not None:
                    assert x.dtype == y.dtype and torch.equal(x, y), (f.name, b, i)
            checked += 1
    assert checked > 10


def test_collate_packed_writes_latents_into_given_array(dataset):
    plans = _plans(dataset, 64)[:2]
    rows = [read_row(dataset, p) for p in plans]
    given = {}

    def latent_out(n, d):
        given["array"] = np.full((n, d), np.nan, dtype=np.float32)
        return given["array"]

    batch = collate_packed(rows, 64, P, PATCH_DIM, dataset.frame_token, latent_out=latent_out)
    assert np.shares_memory(batch.latents.numpy(), given["array"])
    assert torch.equal(batch.latents, collate_packed(rows, 64, P, PATCH_DIM, dataset.frame_token).latents)


def test_collate_packed_rejects_overfull_row(dataset):
    plan = _plans(dataset, 64)[0]
    with pytest.raises(ValueError, match="more than seq_length"):
        collate_packed([read_row(dataset, plan)], 8, P, PATCH_DIM, dataset.frame_token)


def test_noisy_latents_alias_latents_until_noised(dataset):
    plans = _plans(dataset, 64)
    batch = collate_packed([read_row(dataset, p) for p in plans[:2]], 64, P, PATCH_DIM, dataset.frame_token)
    assert batch.noisy_latents is batch.latents
    before = batch.latents.clone()
    out = noise_batch(batch, ObjectiveConfig(), torch.Generator().manual_seed(0))
    # the objective returns fresh tensors and leaves the loader's (shared) latents untouched
    assert out.noisy_latents.data_ptr() != batch.latents.data_ptr()
    assert torch.equal(batch.latents, before) and torch.equal(out.latents, before)
    layout_batch = collate([layout_row(dataset, p, P) for p in plans[:2]], 64, PATCH_DIM)
    assert layout_batch.noisy_latents is layout_batch.latents


def _small_batch(ds, plans):
    return MicroBatchDataset(64, PATCH_DIM, P, datasets=[ds])[[(0, p) for p in plans]]


def test_ring_lease_views_slot_and_frees_it_when_dropped(dataset):
    plans = _plans(dataset, 64)[:2]
    ref_batch = _small_batch(dataset, plans)
    ring = BatchRing(2, MicroBatchDataset(64, PATCH_DIM, P).max_batch_bytes(2))
    s0, s1 = ring.acquire(), ring.acquire()
    assert ring.acquire() == -1  # both slots in flight
    batch = ring.lease(ring.write(s0, ref_batch))
    assert batch.noisy_latents is batch.latents  # shipped once, aliased again
    for f in dataclasses.fields(Batch):
        x, y = getattr(ref_batch, f.name), getattr(batch, f.name)
        assert (x is None and y is None) or torch.equal(x, y), f.name
    slot_start = ring.buffer.data_ptr() + s0 * ring.slot_bytes
    assert slot_start <= batch.tokens.data_ptr() < slot_start + ring.slot_bytes  # a view, no copy
    assert ring.acquire() == -1  # still leased while the caller holds the batch
    kept = batch.latent_t
    del batch
    gc.collect()
    assert ring.acquire() == -1  # one field still alive keeps the slot
    del kept
    gc.collect()
    assert ring.acquire() == s0
    ring._release(s0)
    ring._release(s1)


def test_ring_write_keeps_latents_built_in_the_slot(dataset):
    plans = _plans(dataset, 64)[:2]
    ds = MicroBatchDataset(64, PATCH_DIM, P, datasets=[dataset])
    ring = BatchRing(1, ds.max_batch_bytes(2))
    slot = ring.acquire()
    built = ds.build([(0, p) for p in plans], latent_out=lambda n, d: ring.array(slot, (n, d), np.float32))
    ref = ring.write(slot, built)
    offsets = {name: offset for name, _, shape, offset in ref.meta if shape is not None}
    assert offsets["latents"] == 0
    batch = ring.lease(ref)
    assert torch.equal(batch.latents, ds[[(0, p) for p in plans]].latents)
    assert torch.equal(batch.tokens, ds[[(0, p) for p in plans]].tokens)
