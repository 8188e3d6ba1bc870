import numpy as np
import pytest
import torch
from fixtures import random_docs, write_dataset
from unpack import segments, stitch

from megafusion.data.batch import MODALITY_IMAGE, contiguous_runs
from megafusion.data.collate import collate
from megafusion.data.indexed import MultimodalDataset
from megafusion.data.packing import RowPlanner, layout_row, patchify, unpatchify
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST

SHAPE = (4, 8, 8)
P = 2
PPF = (8 // P) ** 2  # 16 patches per frame
PATCH_DIM = 4 * P * P


def _pack(ds, seq_length, order=None, copies=1):
    planner = RowPlanner(ds, seq_length, PPF, copies)
    for d in range(len(ds)) if order is None else order:
        planner.add(d)
    planner.flush()
    rows = [layout_row(ds, plan, P, copies) for plan in planner.rows]
    return planner.rows, collate(rows, seq_length, PATCH_DIM).validate()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    docs = random_docs(np.random.default_rng(3), 80, SHAPE)
    return MultimodalDataset(write_dataset(str(tmp_path_factory.mktemp("mixed")), docs, SHAPE)), docs


def test_patchify_layout_and_inverse():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 (raster order: row 0, column 1) of frame 0 is x[0, :, 0:2, 2:4] laid out (C, p, p)
    assert np.array_equal(p[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    assert np.array_equal(p[1, 2], x[1, :, 2:4, 0:2].reshape(-1))
    assert np.array_equal(unpatchify(p, 2, 3, 4, 4), x)


@pytest.mark.parametrize("seq_length,copies", [(17, 1), (24, 1), (48, 1), (100, 1), (33, 2), (40, 2), (100, 2)])
def test_round_trip_tokens_and_latents(mixed, seq_length, copies):
    """Unpacking gives the document stream back; with copies = 2 every frame is a noised block directly followed
    by its clean copy in the same row (unpack.segments checks the pair)."""
    ds, docs = mixed
    _, batch = _pack(ds, seq_length, copies=copies)
    tokens, frames = stitch(segments(batch, P, SHAPE, copies))
    assert tokens == [t for toks, _ in docs for t in toks]
    want = [f for _, lat in docs for f in lat]
    assert len(frames) == len(want) and all(np.array_equal(a, b) for a, b in zip(frames, want))


@pytest.mark.parametrize("seq_length,copies", [(17, 1), (24, 1), (48, 1), (33, 2), (48, 2)])
def test_packing_invariants(mixed, seq_length, copies):
    ds, docs = mixed
    plans, batch = _pack(ds, seq_length, copies=copies)
    rows = segments(batch, P, SHAPE, copies)
    frame = PPF * copies  # positions of a frame: its noised copy and (copies = 2) its clean copy
    stream = [t for toks, _ in docs for t in toks]
    offset = 0
    for r in range(batch.batch_size):
        # every visual block is a whole frame
        for start, end, block in contiguous_runs(batch.block_ids[r]):
            if block >= 0:
                assert end - start == PPF
        # a frame that starts a segment was not preceded by a BOI (the BOI travels with its frame)
        for toks, _ in rows[r]:
            if toks[0] == ST.frame and offset > 0:
                assert stream[offset - 1] != ST.boi
            offset += len(toks)
        # document ids count up from 0, context starts at the segment start, padding only at the tail
        doc = batch.document_ids[r]
        valid = doc >= 0
        used = int(valid.sum())
        assert valid[:used].all() and not valid[used:].any()
        for start, end, d in contiguous_runs(doc[:used]):
            assert (batch.context_start[r, start:end] == start).all()
        assert torch.equal(torch.unique_consecutive(doc[:used]), torch.arange(len(rows[r])))
        # greedy: a row ends early only when the next unit is a frame (with its BOI) that does not fit
        if r + 1 < batch.batch_size and used < seq_length:
            first = rows[r + 1][0][0]
            unit = frame + 1 if first[0] == ST.boi and len(first) > 1 and first[1] == ST.frame else frame
            assert first[0] == ST.frame or unit == frame + 1
            assert seq_length - used < unit
    assert offset == len(stream)
    # labels and the CE mask: next token, text to text inside one document segment
    text = (batch.modality != MODALITY_IMAGE) & (batch.document_ids >= 0)
    same = batch.document_ids[:, :-1] == batch.document_ids[:, 1:]
    want = text[:, :-1] & text[:, 1:] & same
    assert torch.equal(batch.loss_mask[:, :-1].bool(), want) and not batch.loss_mask[:, -1].any()
    m = batch.loss_mask[:, :-1].bool()
    assert torch.equal(batch.labels[:, :-1][m], batch.tokens[:, 1:][m])
    assert (batch.tokens[batch.modality == MODALITY_IMAGE] == ST.pad).all()


def test_deterministic(mixed):
    ds, _ = mixed
    a, _ = _pack(ds, 24, order=np.random.default_rng(0).permutation(len(ds)))
    b, _ = _pack(ds, 24, order=np.random.default_rng(0).permutation(len(ds)))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_long_text_continues_in_next_rows(tmp_path):
    long = [ST.bos] + list(range(20, 20 + 70)) + [ST.eos]  # 72 tokens
    ds = MultimodalDataset(write_dataset(str(tmp_path / "t"), [(long, np.zeros((0,) + SHAPE)),
                                                                 ([ST.bos, 30, ST.eos], np.zeros((0,) + SHAPE))],
                                         SHAPE))
    plans, batch = _pack(ds, 32)
    assert [p.tolist() for p in plans] == [[[0, 0, 32, 0]], [[0, 32, 64, 0]], [[0, 64, 72, 0], [1, 0, 3, 0]]]
    assert batch.tokens[1].tolist() == long[32:64]
    assert batch.tokens[2, :11].tolist() == long[64:] + [ST.bos, 30, ST.eos]
    assert batch.document_ids[2, :11].tolist() == [0] * 8 + [1] * 3
    # the continuation is a new segment: no CE target across the row boundary, context restarts
    assert batch.context_start[1].tolist() == [0] * 32


@pytest.mark.parametrize("text_len", [18, 10])
def test_boi_is_never_stranded(tmp_path, text_len):
    # seq 20: BOS + text + BOI reaches the row end (18) or leaves too little room for the 16-patch frame (10)
    toks = [ST.bos] + [40] * text_len + [ST.boi, ST.frame, ST.eoi, ST.eos]
    lat = np.random.default_rng(0).standard_normal((1,) + SHAPE).astype(np.float32)
    ds = MultimodalDataset(write_dataset(str(tmp_path / "b"), [(toks, lat)], SHAPE))
    plans, batch = _pack(ds, 20)
    assert plans[0].tolist() == [[0, 0, 1 + text_len, 0]]
    assert plans[1].tolist()[0][:2] == [0, 1 + text_len] and plans[1].tolist()[0][3] == 0
    assert batch.tokens[1, 0] == ST.boi and (batch.modality[1, 1:17] == MODALITY_IMAGE).all()
    assert (batch.document_ids[0, 1 + text_len:] == -1).all()  # the tail of row 0 is padding


def test_frame_larger_than_row_is_refused(mixed):
    ds, _ = mixed
    with pytest.raises(ValueError, match="data.seq_length=16"):
        RowPlanner(ds, 16, PPF)
    with pytest.raises(ValueError, match=r"one frame needs 32 positions \(2 copies of 16 patches\).*seq_length=32"):
        RowPlanner(ds, 32, PPF, copies=2)
    with pytest.raises(ValueError, match="copies=3"):
        RowPlanner(ds, 100, PPF, copies=3)


def test_frame_token_without_latent_is_named(tmp_path):
    from megafusion.data.indexed import DatasetFormatError

    docs = [([ST.bos, 30, 31, ST.eos], np.zeros((0,) + SHAPE)), ([ST.bos, ST.boi, ST.frame, ST.eoi, ST.eos],
                                                                 np.zeros((0,) + SHAPE))]
    ds = MultimodalDataset(write_dataset(str(tmp_path / "f"), docs, SHAPE))
    with pytest.raises(DatasetFormatError, match="document 1 has 1 FRAME tokens but 0 latent sequences"):
        _pack(ds, 24)


@pytest.mark.parametrize("seq_length,copies", [(17, 1), (24, 1), (48, 1), (100, 1), (33, 2), (48, 2)])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_compiled_planning_equals_add(mixed, seq_length, copies, chunk):
    """RowPlanner.add_from (compiled) gives add's rows and open row, however the rows are asked for, and a
    snapshot at the first document boundary after each change of the completed-row count."""
    ds, _ = mixed
    order = np.random.default_rng(seq_length).permutation(len(ds))
    ref = RowPlanner(ds, seq_length, PPF, copies)
    boundaries = []  # (rows completed, order index, fill, open row) before each document
    for i, d in enumerate(order):
        boundaries.append((len(ref.rows), i, ref.fill, [list(s) for s in ref._segments]))
        ref.add(int(d))
    want_snaps = [b for k, b in enumerate(boundaries) if k > 0 and b[0] != boundaries[k - 1][0]]
    got = RowPlanner(ds, seq_length, PPF, copies)
    start, snaps = 0, []
    while start < len(order):
        start, new = got.add_from(order, start, chunk, snaps[-1]["rows"] if snaps else 0)
        snaps += new
    assert len(got.rows) == len(ref.rows) > 5
    assert all(np.array_equal(a, b) for a, b in zip(got.rows, ref.rows))
    assert got._segments == ref._segments and got.fill == ref.fill
    assert [(s["rows"], s["next_doc"], s["fill"], s["open"]) for s in snaps] == want_snaps


def test_compiled_planning_names_a_bad_document(tmp_path):
    from megafusion.data.indexed import DatasetFormatError

    # document 1 holds two FRAME tokens but one latent, and does not fit whole in a row: the walk finds it
    docs = [([ST.bos, 30, ST.eos], np.zeros((0,) + SHAPE)),
            ([ST.bos] + [31] * 20 + [ST.boi, ST.frame, ST.frame, ST.eoi, ST.eos], np.zeros((1,) + SHAPE))]
    ds = MultimodalDataset(write_dataset(str(tmp_path / "f"), docs, SHAPE))
    with pytest.raises(DatasetFormatError, match="document 1 has 2 FRAME tokens but 1 latent sequences"):
        RowPlanner(ds, 24, PPF).add_from(np.arange(2), 0, 10, 0)
