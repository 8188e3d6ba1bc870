import numpy as np
import pytest
from fixtures import random_docs, write_dataset

from megafusion.data.blending import BlendIndex
from megafusion.data.indexed import MultimodalDataset
from megafusion.data.sampler import MicroBatchSampler, PackedRowStream, epoch_order, split_documents

SHAPE = (4, 8, 8)
PPF = 16


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [1.0, 3.0], [5, 0, 5]])
def test_blend_proportions(weights):
    blend = BlendIndex(weights, initial_size=64)  # grows by doubling as indices go past it
    n = 10_000
    counts = blend.counts(n)
    share = np.asarray(weights, dtype=float) / sum(weights)
    assert np.all(np.abs(np.asarray(counts) - share * n) <= 1.0)
    # the j-th sample drawn from dataset k is row j of dataset k: per-dataset indices count up without gaps
    seen = {k: [] for k in range(len(weights))}
    for i in range(2000):
        k, row = blend.lookup(i)
        seen[k].append(row)
    for rows in seen.values():
        assert rows == list(range(len(rows)))
    # prefix-stable: a fresh index built big at once agrees with the grown one
    big = BlendIndex(weights, initial_size=n)
    assert [big.lookup(i) for i in range(3000)] == [blend.lookup(i) for i in range(3000)]


def test_single_dataset_blend_is_identity():
    blend = BlendIndex([2.0], initial_size=16)
    assert blend.lookup(100_000) == (0, 100_000) and blend.counts(100_000) == [100_000]


def test_blend_rejects_bad_weights():
    with pytest.raises(ValueError, match="data.weights"):
        BlendIndex([0.0, 0.0])


def test_split_is_disjoint_complete_and_seeded():
    train, valid = split_documents(1000, 0.05, seed=7, dataset_index=0)
    assert len(valid) == 50 and len(np.intersect1d(train, valid)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(1000))
    again = split_documents(1000, 0.05, seed=7, dataset_index=0)
    assert np.array_equal(again[1], valid)
    assert not np.array_equal(split_documents(1000, 0.05, seed=8, dataset_index=0)[1], valid)
    assert len(split_documents(10, 0.01, 0, 0)[1]) == 1  # a positive fraction keeps at least one document
    assert len(split_documents(10, 0.0, 0, 0)[1]) == 0


def test_epoch_orders_are_permutations_that_differ():
    docs = np.arange(3, 103)
    e0, e1 = epoch_order(docs, 1, 0, 0, 0), epoch_order(docs, 1, 0, 0, 1)
    assert sorted(e0.tolist()) == docs.tolist() and sorted(e1.tolist()) == docs.tolist()
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, epoch_order(docs, 1, 0, 0, 0))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    docs = random_docs(np.random.default_rng(5), 60, SHAPE)
    return MultimodalDataset(write_dataset(str(tmp_path_factory.mktemp("s")), docs, SHAPE))


def test_row_stream_random_access_matches_sequential(dataset):
    docs = np.arange(len(dataset))
    seq = PackedRowStream(dataset, docs, 40, PPF, seed=3, dataset_index=0, split=0, window=8)
    sequential = [seq.row(r) for r in range(200)]  # spans several epochs, with window trimming
    assert seq.epoch >= 2
    fresh = PackedRowStream(dataset, docs, 40, PPF, seed=3, dataset_index=0, split=0, window=8)
    for r in (197, 5, 160, 199):  # jumps forward and back (back re-plans from the start)
        assert np.array_equal(fresh.row(r), sequential[r])
    # the first epoch visits every document exactly once, in epoch_order
    order = epoch_order(docs, 3, 0, 0, 0)
    visited = []
    for plan in sequential:
        for d, start, *_ in plan.tolist():
            if start == 0:
                visited.append(d)
    assert visited[: len(docs)] == order.tolist()


def test_micro_batches_disjoint_and_complete_across_dp():
    m, dp = 3, 4
    per_rank = [MicroBatchSampler(m, r, dp) for r in range(dp)]
    for t in range(5):
        got = sorted(i for s in per_rank for i in s.indices(t))
        assert got == list(range(t * m * dp, (t + 1) * m * dp))
    with pytest.raises(ValueError, match="consumed_samples=5"):
        MicroBatchSampler(m, 0, dp, consumed_samples=5)
    it = iter(MicroBatchSampler(m, 1, dp, consumed_samples=24))
    assert next(it) == [27, 28, 29] and next(it) == [39, 40, 41]


def test_snapshot_restore_continues_exactly(dataset):
    docs = np.arange(len(dataset))
    make = lambda: PackedRowStream(dataset, docs, 40, PPF, seed=3, dataset_index=0, split=0, window=8)  # noqa: E731
    ref = make()
    rows = [ref.row(r) for r in range(200)]
    for r in (0, 1, 57, 150):
        live = make()
        for i in range(r + 5):  # the live stream has planned ahead of r, as a prefetching loader would
            live.row(i)
        snap = live.snapshot(r)
        assert snap is not None and snap["rows"] <= r
        resumed = make()
        resumed.restore(snap)
        assert all(np.array_equal(resumed.row(i), rows[i]) for i in range(r, 200))
    assert live.snapshot(0) is None  # trimmed away with its rows
