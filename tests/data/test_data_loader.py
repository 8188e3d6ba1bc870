import dataclasses

import numpy as np
import pytest
import torch
from fixtures import random_docs, write_dataset
from unpack import segments, stitch

from megafusion.config.schema import Config, DataConfig, ModelConfig, ObjectiveConfig, TrainingConfig
from megafusion.data.batch import Batch
from megafusion.data.loader import DataIterator, MicroBatchDataset, build_data_iterators
from megafusion.data.sampler import epoch_order, split_documents

SHAPE = (4, 8, 8)


def _cfg(paths=(), seq_length=48, mbs=2, gbs=4, workers=0, valid=0.1, weights=(), captioning="transfusion"):
    bagel = captioning == "bagel"
    return Config(
        model=ModelConfig(latent_channels=SHAPE[0], latent_size=SHAPE[1], patch_size=2, vocab_size=256,
                          hide_noised_latents=bagel),
        data=DataConfig(seq_length=seq_length, paths=list(paths), weights=list(weights), valid_fraction=valid,
                        num_workers=workers, seed=11),
        training=TrainingConfig(micro_batch_size=mbs, global_batch_size=gbs),
        objective=ObjectiveConfig(captioning=captioning),
    )


def _equal(a: Batch, b: Batch) -> bool:
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    a = random_docs(np.random.default_rng(10), 60, SHAPE)
    b = random_docs(np.random.default_rng(11), 40, SHAPE, max_text=10)
    return (write_dataset(str(root / "a"), a, SHAPE, storage="bfloat16-as-uint16"), a,
            write_dataset(str(root / "b"), b, SHAPE))


def test_round_trip_latents_equal_stored(folders):
    path, docs, _ = folders
    train, valid = build_data_iterators(_cfg([path], valid=0.0), 0, 1, 0)
    assert valid is None
    rows = []
    for batch in _take(train, 40):
        batch.validate()
        rows += segments(batch, 2, SHAPE)
    tokens, frames = stitch(rows)
    tr, _ = split_documents(len(docs), 0.0, 11, 0)
    order = epoch_order(tr, 11, 0, 0, 0)
    want_tokens = [t for d in order for t in docs[d][0]]
    want_frames = [torch.from_numpy(f).to(torch.bfloat16).float().numpy() for d in order for f in docs[d][1]]
    assert len(tokens) >= len(want_tokens)
    assert tokens[: len(want_tokens)] == want_tokens
    assert all(np.array_equal(a, b) for a, b in zip(frames, want_frames))
    assert train.state_dict()["consumed_samples"] == 80


def test_worker_loader_equals_in_process(folders):
    path_a, _, path_b = folders
    cfg0 = _cfg([path_a, path_b], workers=0)
    cfg2 = _cfg([path_a, path_b], workers=2)
    a = _take(build_data_iterators(cfg0, 0, 1, 0)[0], 30)
    it = build_data_iterators(cfg2, 0, 1, 0)[0]
    b = _take(it, 30)  # more batches than ring slots: the last ones travel by value while the others are held
    assert it._workers.ring.slots < 30
    it.close()
    assert all(_equal(x, y) for x, y in zip(a, b))
    one = build_data_iterators(_cfg([path_a, path_b], workers=1), 0, 1, 0)[0]
    for x in a:  # one at a time: every batch from a slot (the same slot again and again)
        assert _equal(x, next(one))
    one.close()
    # synthetic data through workers too
    c = _take(build_data_iterators(_cfg([], workers=2), 0, 1, 0)[0], 5)
    assert all(_equal(x, y) for x, y in zip(c, _take(build_data_iterators(_cfg([]), 0, 1, 0)[0], 5)))


@pytest.mark.parametrize("synthetic", [False, True])
def test_resume_mid_epoch_matches_uninterrupted(folders, synthetic):
    paths = [] if synthetic else [folders[0], folders[2]]
    cfg = _cfg(paths)
    full = _take(build_data_iterators(cfg, 0, 1, 0)[0], 20)
    it = build_data_iterators(cfg, 0, 1, 0)[0]
    _take(it, 7)
    state = it.state_dict()
    assert state["consumed_samples"] == 14
    resumed = _take(build_data_iterators(cfg, 0, 1, state["consumed_samples"])[0], 13)
    assert all(_equal(x, y) for x, y in zip(full[7:], resumed))
    assert not _equal(full[0], full[7])


@pytest.mark.parametrize("synthetic", [False, True])
def test_dp_shards_disjoint_and_complete(folders, synthetic):
    paths = [] if synthetic else [folders[0], folders[2]]
    single = _take(build_data_iterators(_cfg(paths, mbs=4, gbs=8), 0, 1, 0)[0], 6)
    ranks = [_take(build_data_iterators(_cfg(paths, mbs=2, gbs=8), r, 2, 0)[0], 6) for r in range(2)]
    for t in range(6):
        r0, r1 = ranks[0][t], ranks[1][t]
        merged = {f.name: torch.cat([getattr(r0, f.name), getattr(r1, f.name)]) for f in dataclasses.fields(Batch)
                  if getattr(r0, f.name) is not None}
        assert _equal(Batch(**merged), single[t])
        assert not torch.equal(r0.tokens, r1.tokens)


def test_blend_weights_shape_the_stream(folders):
    path_a, _, path_b = folders
    train, _ = build_data_iterators(_cfg([path_a, path_b], weights=[1.0, 3.0]), 0, 1, 0)
    src = train.source
    picks = [src.plan(i)[0] for i in range(400)]
    assert abs(np.mean(picks) - 0.75) < 0.01


def test_valid_split_is_separate_and_resettable(folders):
    path_a, docs, _ = folders
    train, valid = build_data_iterators(_cfg([path_a], valid=0.2), 0, 1, 0)
    tr, va = split_documents(len(docs), 0.2, 11, 0)
    used = {int(d) for i in range(10) for d in valid.source.plan(i)[1][:, 0]}
    assert used <= set(va.tolist())
    first = _take(valid, 3)
    valid.reset()
    again = _take(valid, 3)
    assert all(_equal(x, y) for x, y in zip(first, again))


def test_synthetic_batches_validate():
    train, valid = build_data_iterators(_cfg([]), 0, 1, 0)
    batch = next(train).validate()
    assert batch.tokens.shape == (2, 48) and batch.patch_dim == 16
    assert not _equal(batch, next(valid))


def test_config_mismatch_is_named(folders):
    cfg = _cfg([folders[0]])
    cfg.model.latent_channels = 8
    with pytest.raises(ValueError, match="latent_shape .4, 8, 8. does not match model.latent_channels=8"):
        build_data_iterators(cfg, 0, 1, 0)
    with pytest.raises(ValueError, match="global_batch_size=4 is not a multiple"):
        build_data_iterators(_cfg([folders[0]]), 0, 3, 0)


def test_resume_from_data_state_skips_replanning(folders):
    cfg = _cfg([folders[0], folders[2]])
    full = _take(build_data_iterators(cfg, 0, 1, 0)[0], 20)
    it = build_data_iterators(cfg, 0, 1, 0)[0]
    _take(it, 9)
    state = it.state_dict()
    assert state["consumed_samples"] == 18 and len(state["streams"]["snapshots"]) == 2
    resumed = build_data_iterators(cfg, 0, 1, 18, data_state=state)[0]
    assert [s._base for s in resumed.source.streams] == [s["rows"] for s in state["streams"]["snapshots"]]
    assert any(s._base > 0 for s in resumed.source.streams)
    assert all(_equal(x, y) for x, y in zip(full[9:], _take(resumed, 11)))
    # a state from another configuration is not used (planning restarts from the beginning, still exact)
    other = _cfg([folders[0], folders[2]], seq_length=64)
    fresh = build_data_iterators(other, 0, 1, 18, data_state=state)[0]
    assert all(s._base == 0 for s in fresh.source.streams)


class _FailingRows:
    def plan(self, index):
        raise ValueError(f"no plan for sample {index}")


def test_worker_error_is_raised_in_the_caller():
    it = DataIterator(_FailingRows(), MicroBatchDataset(48, 16, 2), 2, 0, 1, 0, num_workers=1)
    with pytest.raises(ValueError, match="no plan for sample 0"):
        next(it)
    it.close()


# ---------------------------------------------------------------------- objective.captioning = bagel
def test_bagel_rows_hold_stored_frames_with_clean_copies(folders):
    path, docs, _ = folders
    train, _ = build_data_iterators(_cfg([path], seq_length=64, valid=0.0, captioning="bagel"), 0, 1, 0)
    rows, clean = [], 0
    for batch in _take(train, 30):
        batch.validate()
        rows += segments(batch, 2, SHAPE, copies=2)  # checks each frame is a noised block + its clean copy
        clean += int((batch.block_ids >= 0).logical_and(~batch.noised).sum())
    tokens, frames = stitch(rows)
    tr, _ = split_documents(len(docs), 0.0, 11, 0)
    order = epoch_order(tr, 11, 0, 0, 0)
    want_tokens = [t for d in order for t in docs[d][0]]
    want_frames = [torch.from_numpy(f).to(torch.bfloat16).float().numpy() for d in order for f in docs[d][1]]
    n = min(len(tokens), len(want_tokens))
    assert n > 500 and tokens[:n] == want_tokens[:n]
    assert len(frames) > 10 and all(np.array_equal(a, b) for a, b in zip(frames, want_frames))
    assert clean == 16 * len(frames)  # one clean copy of 16 patches per frame


def test_bagel_worker_loader_equals_in_process(folders):
    path_a, _, path_b = folders
    for paths in ([path_a, path_b], []):  # dataset rows (compiled path) and synthetic rows
        a = _take(build_data_iterators(_cfg(paths, seq_length=64, captioning="bagel"), 0, 1, 0)[0], 12)
        it = build_data_iterators(_cfg(paths, seq_length=64, workers=2, captioning="bagel"), 0, 1, 0)[0]
        b = _take(it, 12)
        it.close()
        assert all(_equal(x, y) for x, y in zip(a, b))
        clean = [(x.block_ids >= 0) & ~x.noised for x in a]
        assert sum(int(c.sum()) for c in clean) > 0  # the batches hold clean copies
        plain = _take(build_data_iterators(_cfg(paths, seq_length=64), 0, 1, 0)[0], 1)[0]
        assert not ((plain.block_ids >= 0) & ~plain.noised).any()  # the default lays every frame out once


def test_bagel_plan_state_is_not_reused_for_one_copy(folders):
    cfg = _cfg([folders[0]], seq_length=64, captioning="bagel")
    it = build_data_iterators(cfg, 0, 1, 0)[0]
    _take(it, 9)
    state = it.state_dict()
    assert "streams" in state and state["streams"]["fingerprint"]["copies"] == 2
    again = build_data_iterators(cfg, 0, 1, 18, data_state=state)[0]
    assert any(s._base > 0 for s in again.source.streams)  # the same setting continues from the snapshot
    other = build_data_iterators(_cfg([folders[0]], seq_length=64), 0, 1, 18, data_state=state)[0]
    assert all(s._base == 0 for s in other.source.streams)  # one copy per frame: planned from the start


def test_loader_refuses_mismatched_synthetic_copies():
    from megafusion.data.loader import SyntheticRows
    from megafusion.data.synthetic import SyntheticSpec

    spec = SyntheticSpec(vocab_size=256, seq_length=64, patch_dim=16, patches_per_frame=16, copies=2)
    with pytest.raises(ValueError, match="SyntheticSpec.copies=2 but the loader lays frames out copies=1"):
        MicroBatchDataset(64, 16, 2, synthetic=SyntheticRows(spec, 0, 0))
