"""The loader's hot path (read_rows + collate_packed) against the reference path (layout_row + collate), with one
copy of each frame and with BAGEL's noised + clean copies, the latents/noisy_latents aliasing, and BatchRing slot
writing and leasing."""

import dataclasses
import gc

import numpy as np
import pytest
import torch
from fixtures import random_docs, write_dataset

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.batch import Batch
from megafusion.data.batch_ring import BatchRing
from megafusion.data.collate import collate
from megafusion.data.collate_packed import collate_packed, collate_packed_fields
from megafusion.data.indexed import MultimodalDataset
from megafusion.data.loader import MicroBatchDataset
from megafusion.data.packing import RowPlanner, layout_row, read_rows
from megafusion.objectives.flow_matching import noise_batch

SHAPE = (4, 8, 8)
P = 2
PPF = 16
PATCH_DIM = 16


def _plans(ds, seq_length, copies=1):
    planner = RowPlanner(ds, seq_length, PPF, copies)
    for d in range(len(ds)):
        planner.add(d)
    planner.flush()
    return planner.rows


@pytest.fixture(scope="module", params=["float32", "bfloat16-as-uint16", "float16-as-uint16"])
def dataset(request, tmp_path_factory):
    docs = random_docs(np.random.default_rng(5), 60, SHAPE)
    folder = write_dataset(str(tmp_path_factory.mktemp(request.param)), docs, SHAPE, storage=request.param)
    return MultimodalDataset(folder)


@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("seq_length", [40, 64, 300])
def test_collate_packed_equals_collate_of_layouts(dataset, seq_length, copies):
    plans = _plans(dataset, seq_length, copies)
    checked = 0
    for b in (1, 2, 3):
        for i in range(0, len(plans) - b + 1, b):
            ref = collate([layout_row(dataset, p, P, copies) for p in plans[i: i + b]], seq_length,
                          PATCH_DIM).validate()
            # the rows as one table, and as one table per row (as rows of different datasets would be)
            for tables in ([read_rows(dataset, plans[i: i + b])], [read_rows(dataset, [p]) for p in plans[i: i + b]]):
                got = collate_packed(tables, seq_length, P, PATCH_DIM, dataset.frame_token, copies=copies).validate()
                for f in dataclasses.fields(Batch):
                    x, y = getattr(ref, f.name), getattr(got, f.name)
                    assert (x is None) == (y is None), f.name
                    if x is not None:
                        assert x.dtype == y.dtype and torch.equal(x, y), (f.name, b, i, len(tables))
            checked += 1
    assert checked > 10


def test_collate_packed_writes_every_field_into_given_arrays(dataset):
    plans = _plans(dataset, 64)[:2]
    rows = [read_rows(dataset, plans)]
    given = {}

    def alloc(name, shape, dtype):
        given[name] = np.full(shape, 7, dtype=dtype)
        return given[name]

    fields = collate_packed_fields(rows, 64, P, PATCH_DIM, dataset.frame_token, alloc=alloc)
    ref = collate_packed(rows, 64, P, PATCH_DIM, dataset.frame_token)
    assert set(given) == set(fields) == {f.name for f in dataclasses.fields(Batch)} - {"noisy_latents",
                                                                                        "velocity_target",
                                                                                        "fm_loss_mask",
                                                                                        "token_modality"}
    for name, value in fields.items():
        assert value is given[name]
        assert torch.equal(torch.from_numpy(value), getattr(ref, name)), name


def test_collate_packed_rejects_overfull_row(dataset):
    plan = _plans(dataset, 64)[0]
    with pytest.raises(ValueError, match="more than seq_length"):
        collate_packed([read_rows(dataset, [plan])], 8, P, PATCH_DIM, dataset.frame_token)


def test_noisy_latents_alias_latents_until_noised(dataset):
    plans = _plans(dataset, 64)
    batch = collate_packed([read_rows(dataset, plans[:2])], 64, P, PATCH_DIM, dataset.frame_token)
    assert batch.noisy_latents is batch.latents
    before = batch.latents.clone()
    out = noise_batch(batch, ObjectiveConfig(), torch.Generator().manual_seed(0))
    # the objective returns fresh tensors and leaves the loader's (shared) latents untouched
    assert out.noisy_latents.data_ptr() != batch.latents.data_ptr()
    assert torch.equal(batch.latents, before) and torch.equal(out.latents, before)
    layout_batch = collate([layout_row(dataset, p, P) for p in plans[:2]], 64, PATCH_DIM)
    assert layout_batch.noisy_latents is layout_batch.latents


def test_ring_lease_views_slot_and_frees_it_when_dropped(dataset):
    plans = [(0, p) for p in _plans(dataset, 64)[:2]]
    ds = MicroBatchDataset(64, PATCH_DIM, P, datasets=[dataset])
    ring = BatchRing(2, ds.field_bytes(2))
    s0, s1 = ring.take(0, 2), ring.take(0, 2)
    assert ring.take(0, 2) == -1  # both slots in use
    writer = ring.writer(s0)
    ds.fields(plans, writer)
    batch = ring.lease(s0, writer.table)
    assert batch.noisy_latents is batch.latents
    ref_batch = ds[plans]
    for f in dataclasses.fields(Batch):
        x, y = getattr(ref_batch, f.name), getattr(batch, f.name)
        assert (x is None and y is None) or torch.equal(x, y), f.name
    slot_start = ring.buffer.data_ptr() + s0 * ring.slot_bytes
    for name in ("tokens", "latents", "latent_t"):  # views, no copy
        assert slot_start <= getattr(batch, name).data_ptr() < slot_start + ring.slot_bytes
    assert ring.take(0, 2) == -1  # still leased while the caller holds the batch
    kept = batch.latent_t
    del batch
    gc.collect()
    assert ring.take(0, 2) == -1  # one field still alive keeps the slot
    del kept
    gc.collect()
    assert ring.take(0, 2) == s0 and ring.take(1, 1) == -1 and s1 == 1


def test_ring_writes_the_most_recently_released_slot_next():
    ring = BatchRing(4, [64])
    slots = [ring.take() for _ in range(4)]
    assert slots == [0, 1, 2, 3] and ring.take() == -1
    for slot in (2, 0, 3):  # released in this order: 3 is the most recent, then 0, then 2
        ring.release(slot)
    assert [ring.take(), ring.take(), ring.take(), ring.take()] == [3, 0, 2, -1]
    ring.release(1)
    ring.release(2)
    assert ring.take(0, 2) == 1  # the newest free one within the range asked for
