"""The masked-diffusion family's data path: records -> `tools/preprocess_data.py --family masked_diffusion` ->
dataset folder (megafusion.discrete.dataset) -> rows (megafusion.discrete.rows) -> DataIterator batches."""

import io
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "preprocess"))

from preprocess_corpus import load_tool, train_tiny_tokenizer  # noqa: E402
from preprocess_corpus import sentence as _sentence  # noqa: E402

from megafusion.config.schema import (Config, DataConfig, MaskedDiffusionConfig, ModelConfig,  # noqa: E402
                                      ObjectiveConfig, TrainingConfig)
from megafusion.data.indexed import DatasetFormatError  # noqa: E402
from megafusion.data.sampler import epoch_order, split_documents  # noqa: E402
from megafusion.discrete.dataset import DiscreteDataset  # noqa: E402
from megafusion.discrete.loader import build_discrete_iterators  # noqa: E402
from megafusion.discrete.vocab import AUDIO, IMAGE, TEXT, UnifiedVocab  # noqa: E402
from megafusion.encoders.discrete import build_discrete_tokenizer  # noqa: E402
from megafusion.encoders.discrete.audio_io import read_wav, resample, write_wav  # noqa: E402

IMAGE_SPEC = {"name": "palette", "config": {"resolution": 16, "patch": 4, "levels": 4}}  # 16 codes, codebook 64
AUDIO_SPEC = {"name": "mulaw", "config": {"sample_rate": 4000, "levels": 32, "hop": 40}}  # 100 codes per second
MAX_MIXED = 96
SEQ = 96


def sentence(rng, n=8):
    """Lower case: every character is in the tiny tokenizer's vocabulary, so text decodes back exactly."""
    return _sentence(rng, n).lower()


def _png(path, seed, size=24):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)
    return path


def _wav(path, seconds, freq, rate=8000):
    t = np.arange(int(seconds * rate)) / rate
    return write_wav(path, 0.6 * np.sin(2 * np.pi * freq * t), rate)


def _write_corpus(root):
    """A JSONL (paths) and a parquet (bytes) file; returns them and {(file, row): expected reason or None}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3)
    media = os.path.join(root, "media")
    os.makedirs(media)
    rows, expect = [], []
    for i in range(6):  # short texts: several share a row
        rows.append({"text": " ".join(sentence(rng, 3) for _ in range(1 + i % 2))})
        expect.append(None)
    rows.append({"text": " ".join(sentence(rng, 12) for _ in range(8))})  # a text longer than SEQ: cut in pieces
    expect.append(None)
    for i in range(4):
        rows.append({"text": sentence(rng, 4), "image": os.path.relpath(_png(f"{media}/img{i}.png", i), root)})
        expect.append(None)
    for i in range(3):
        rows.append({"text": sentence(rng, 5), "audio": os.path.relpath(_wav(f"{media}/a{i}.wav", 0.2 + 0.1 * i,
                                                                               220 * (i + 1)), root)})
        expect.append(None)
    with open(f"{media}/broken.png", "wb") as f:
        f.write(b"\x89PNG not really")
    rows.append({"text": "a caption", "image": "media/broken.png"})
    expect.append("undecodable_image")
    with open(f"{media}/notwav.wav", "wb") as f:
        f.write(b"RIFX this is no wav at all")
    rows.append({"text": "a transcript", "audio": "media/notwav.wav"})
    expect.append("undecodable_audio")
    rows.append({"text": "   "})
    expect.append("empty_text")
    rows.append({"text": "long audio", "audio": os.path.relpath(_wav(f"{media}/long.wav", 2.0, 330), root)})
    expect.append("mixed_exceeds_max_length")  # 200 codes > MAX_MIXED
    rows.append({"text": "gone", "audio": "media/missing.wav"})
    expect.append("missing_audio_file")
    rows.append({"kind": "video", "text": "a clip", "frames": ["media/img0.png"]})
    expect.append("unsupported_kind")
    rows.append({"texts": ["an interleaved", None], "images": [None, "media/img1.png"]})
    expect.append("unsupported_kind")
    jsonl = os.path.join(root, "records.jsonl")
    with open(jsonl, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    def wav_bytes(seconds, freq):
        path = _wav(os.path.join(media, "tmp.wav"), seconds, freq)
        return open(path, "rb").read()

    def png_bytes(seed):
        buf = io.BytesIO()
        from PIL import Image

        Image.open(_png(os.path.join(media, "tmp.png"), seed)).save(buf, format="PNG")
        return buf.getvalue()

    prow = [{"kind": "image_text", "text": sentence(rng, 4), "image": png_bytes(10), "audio": None},
            {"kind": None, "text": sentence(rng, 6), "image": None, "audio": wav_bytes(0.3, 500)},
            {"kind": None, "text": " ".join(sentence(rng) for _ in range(2)), "image": None, "audio": None},
            {"kind": "image_text", "text": "a caption", "image": b"not an image", "audio": None},
            {"kind": None, "text": "", "image": None, "audio": None}]
    pexpect = [None, None, None, "undecodable_image", "empty_text"]
    parquet = os.path.join(root, "records.parquet")
    schema = pa.schema([("kind", pa.string()), ("text", pa.string()), ("image", pa.binary()),
                        ("audio", pa.binary())])
    pq.write_table(pa.Table.from_pylist(prow, schema=schema), parquet)
    expected = {(jsonl, i): r for i, r in enumerate(expect)}
    expected.update({(parquet, i): r for i, r in enumerate(pexpect)})
    return [jsonl, parquet], rows, prow, expected


def _argv(inputs, out, tokenizer, *extra):
    return ["--family", "masked_diffusion", "--input", *inputs, "--output", out, "--tokenizer", tokenizer,
            "--image-tokenizer", json.dumps(IMAGE_SPEC), "--audio-tokenizer", json.dumps(AUDIO_SPEC),
            "--max-mixed-length", str(MAX_MIXED), "--min-image-size", "16", "--no-progress", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("discrete_data"))
    tokenizer = train_tiny_tokenizer(os.path.join(root))
    inputs, rows, prow, expected = _write_corpus(root)
    out = os.path.join(root, "ds")
    load_tool("preprocess_data").main(_argv(inputs, out, tokenizer, "--max-reject-fraction", "0.5"))
    return {"root": root, "tokenizer": tokenizer, "inputs": inputs, "rows": rows, "prow": prow,
            "expected": expected, "out": out}


def _vocab_of(out):
    return DiscreteDataset(out).vocab


def _cfg(paths, vocab, seq=SEQ, mbs=2, gbs=4, valid=0.0, weights=(), seed=5, **md):
    v = dict(text_vocab_size=vocab.text_size, image_codebook_size=vocab.image_codes,
             audio_codebook_size=vocab.audio_codes, **md)
    size = UnifiedVocab(v["text_vocab_size"], v["image_codebook_size"], v["audio_codebook_size"]).size
    return Config(
        model=ModelConfig(vocab_size=size, modality_ffn=False),
        data=DataConfig(seq_length=seq, paths=list(paths), weights=list(weights), valid_fraction=valid, seed=seed,
                        num_workers=0),
        training=TrainingConfig(micro_batch_size=mbs, global_batch_size=gbs),
        objective=ObjectiveConfig(kind="masked_diffusion", masked_diffusion=MaskedDiffusionConfig(**v)),
    )


# ---------------------------------------------------------------------------------------------------- preprocessing
def test_manifest_counts_rejects_and_specs(corpus):
    m = json.load(open(os.path.join(corpus["out"], "manifest.json")))
    img, aud = build_discrete_tokenizer(IMAGE_SPEC), build_discrete_tokenizer(AUDIO_SPEC)
    assert m["family"] == "masked_diffusion" and m["format_version"] == 1
    vocab = UnifiedVocab.from_dict(m["vocabulary"])
    assert (vocab.text_size, vocab.image_codes, vocab.audio_codes) == (96, 64, 32)
    assert m["codebook_sizes"] == {"image": 64, "audio": 32}
    assert m["image_tokenizer"]["name"] == "palette" and m["image_tokenizer"]["config"] == img.spec()["config"]
    assert m["audio_tokenizer"]["config"] == aud.spec()["config"] and m["audio_tokenizer"]["sample_rate"] == 4000
    assert m["tokenizer"]["path"] == os.path.abspath(corpus["tokenizer"]) and len(m["tokenizer"]["sha256"]) == 64
    bad = {k: r for k, r in corpus["expected"].items() if r}
    c = m["counts"]
    assert c["records_read"] == len(corpus["expected"]) and c["rejected"] == len(bad)
    assert c["documents_per_task"] == {"text": 8, "image_text": 5, "audio_text": 4}
    assert c["documents"] == 17 and c["mixed_documents"] == 9 and c["text_documents"] == 8
    assert c["images"] == 5 and c["audio"] == 4 and c["image_codes"] == 5 * 16
    assert c["max_mixed_length"] <= MAX_MIXED
    by_reason = {r: list(bad.values()).count(r) for r in set(bad.values())}
    assert {k: v for k, v in m["rejected_by_reason"].items() if v} == by_reason
    assert all(v == 0 for k, v in m["rejected_by_reason"].items() if k not in by_reason)
    rejects = [json.loads(line) for line in open(os.path.join(corpus["out"], "rejects.jsonl"))]
    assert {(r["source"], r["row"]): r["reason"] for r in rejects} == bad
    assert all(r["detail"] for r in rejects)
    assert m["command"].startswith("tools/preprocess_data.py --family masked_diffusion")
    assert not [n for n in os.listdir(corpus["out"]) if n.endswith(".partial")]


def test_documents_decode_back(corpus):
    from PIL import Image

    from megafusion.preprocess.tokenization import TextTokenizer

    ds = DiscreteDataset(corpus["out"])
    v, tok = ds.vocab, TextTokenizer(corpus["tokenizer"])
    img, aud = build_discrete_tokenizer(IMAGE_SPEC), build_discrete_tokenizer(AUDIO_SPEC)
    jsonl, parquet = corpus["inputs"]
    good = [(jsonl, row) for i, row in enumerate(corpus["rows"]) if corpus["expected"][(jsonl, i)] is None]
    good += [(parquet, row) for i, row in enumerate(corpus["prow"]) if corpus["expected"][(parquet, i)] is None]
    assert len(ds) == len(good)
    base = os.path.dirname(jsonl)
    for d, (source, row) in enumerate(good):
        ids = ds.document(d)
        text = v.ids_to_codes(TEXT, ids[2:2 + len(tok.encode(row["text"]))])
        assert tok.decode(text) == row["text"]
        if row.get("image") is not None:
            image = Image.open(io.BytesIO(row["image"]) if isinstance(row["image"], bytes) else
                               os.path.join(base, row["image"]))
            parts = [(TEXT, text), (IMAGE, v.codes_to_ids(IMAGE, img.encode(image.convert("RGB"))))]
            task = "image_text"
        elif row.get("audio") is not None:
            wav = row["audio"] if isinstance(row["audio"], bytes) else os.path.join(base, row["audio"])
            samples, rate = read_wav(wav)
            parts = [(TEXT, text), (AUDIO, v.codes_to_ids(AUDIO, aud.encode(resample(samples, rate, 4000))))]
            task = "audio_text"
        else:
            parts, task = [(TEXT, text)], "text"
        assert np.array_equal(ids, v.document(task, parts)), (source, d)
        assert ds.task_name(d) == task and bool(ds.mixed[d]) == (task != "text")


def test_rerun_is_a_no_op_and_other_commands_need_overwrite(corpus, capsys):
    main = load_tool("preprocess_data").main
    before = os.stat(os.path.join(corpus["out"], "tokens.bin")).st_mtime_ns
    main(_argv(corpus["inputs"], corpus["out"], corpus["tokenizer"], "--max-reject-fraction", "0.5"))
    assert "already complete" in capsys.readouterr().err
    assert os.stat(os.path.join(corpus["out"], "tokens.bin")).st_mtime_ns == before
    with pytest.raises(SystemExit):
        main(_argv(corpus["inputs"], corpus["out"], corpus["tokenizer"], "--max-reject-fraction", "0.5",
                   "--max-mixed-length", "200"))
    assert "--overwrite" in capsys.readouterr().err


def test_threshold_failure_publishes_only_the_rejects(corpus, tmp_path, capsys):
    out = str(tmp_path / "refused")
    with pytest.raises(SystemExit) as info:
        load_tool("preprocess_data").main(_argv(corpus["inputs"], out, corpus["tokenizer"]))  # default 0.05
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "--max-reject-fraction 0.05" in err and "rejects.jsonl" in err
    assert sorted(os.listdir(out)) == ["rejects.jsonl"]
    with pytest.raises(DatasetFormatError, match="manifest.json: missing"):
        DiscreteDataset(out)


def _damaged(src, dst, name, mutate):
    shutil.copytree(src, dst)
    mutate(os.path.join(dst, name))
    return dst


def test_damaged_folders_are_refused_with_the_file_named(corpus, tmp_path):
    src = corpus["out"]

    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4)

    def out_of_vocab(path):
        ids = np.fromfile(path, dtype=np.int32)
        ids[3] = 10_000
        ids.tofile(path)

    def garbage(path):
        with open(path, "w") as f:
            f.write("{not json")

    def shuffle_index(path):
        index = np.load(path)
        index[1], index[2] = index[2], index[1]
        with open(path, "wb") as f:
            np.save(f, index)

    def flow_family(path):
        m = json.load(open(path))
        del m["family"]
        json.dump(m, open(path, "w"))

    def index_disagrees(path):  # an index without a recorded sha256 that ends past tokens.bin
        m = json.load(open(path))
        del m["files"]["index.npy"]["sha256"]
        json.dump(m, open(path, "w"))
        index_path = os.path.join(os.path.dirname(path), "index.npy")
        index = np.load(index_path)
        index[-1] += 5
        with open(index_path, "wb") as f:
            np.save(f, index)

    cases = [("tokens.bin", truncate, r"tokens.bin: \d+ bytes but the manifest records \d+ \(truncated\)"),
             ("manifest.json", index_disagrees, r"tokens.bin: \d+ bytes but .*index.npy ends at token"),
             ("tokens.bin", out_of_vocab, "tokens.bin: id 10000 at token 3 .* outside the unified vocabulary"),
             ("manifest.json", garbage, "manifest.json: not valid JSON"),
             ("manifest.json", os.remove, "manifest.json: missing"),
             ("index.npy", shuffle_index, "index.npy: sha256 differs"),
             ("documents.npy", os.remove, "documents.npy: file missing"),
             ("manifest.json", flow_family, "a dataset of the flow_matching family, not masked_diffusion")]
    for i, (name, mutate, message) in enumerate(cases):
        folder = _damaged(src, str(tmp_path / f"d{i}"), name, mutate)
        with pytest.raises(DatasetFormatError, match=message):
            DiscreteDataset(folder)
    vocab = _vocab_of(src)
    with pytest.raises(DatasetFormatError, match="manifest.json: missing"):  # the loader opens through the reader
        build_discrete_iterators(_cfg([str(tmp_path / "d4")], vocab))


# ---------------------------------------------------------------------------------------------------- rows
def _source(cfg):
    train, _ = build_discrete_iterators(cfg)
    return train.source


def test_epoch_rows_pack_text_pad_mixed_and_cut_long_text(corpus):
    ds = DiscreteDataset(corpus["out"])
    cfg = _cfg([corpus["out"]], ds.vocab)
    src = _source(cfg)
    stream = src.streams[0]
    train_docs, _ = split_documents(len(ds), 0.0, 5, 0)
    for e in range(2):
        segments, row_ptr = stream.epoch(e)
        covered = {}
        visit = []
        for r in range(len(row_ptr) - 1):
            segs = segments[row_ptr[r]:row_ptr[r + 1]]
            assert (segs[:, 2] - segs[:, 1]).sum() <= SEQ and len(segs) >= 1
            if ds.mixed[segs[0, 0]]:
                assert len(segs) == 1 and tuple(segs[0, 1:]) == (0, ds.lengths[segs[0, 0]])  # alone, whole
            else:
                assert not ds.mixed[segs[:, 0]].any()
            for d, s, t in segs:
                covered.setdefault(int(d), []).append((int(s), int(t)))
                if not visit or visit[-1] != d:
                    visit.append(int(d))
        # every document once per epoch, long ones as seq-sized pieces
        assert sorted(covered) == sorted(train_docs.tolist())
        for d, pieces in covered.items():
            n = int(ds.lengths[d])
            assert pieces == [(k, min(k + SEQ, n)) for k in range(0, n, SEQ)], d
        long_docs = [d for d in covered if ds.lengths[d] > SEQ]
        assert long_docs and not ds.mixed[long_docs].any()
        # mixed rows follow the epoch's order, and so do the text documents over the text rows
        order = epoch_order(train_docs, 5, 0, 0, e).tolist()
        for mixed in (True, False):
            assert [d for d in visit if ds.mixed[d] == mixed] == [d for d in order if ds.mixed[d] == mixed]
    # text rows hold several documents: packing happened
    segments, row_ptr = stream.epoch(0)
    assert max(np.diff(row_ptr)) >= 2


def test_batches_lay_out_the_rows(corpus):
    ds = DiscreteDataset(corpus["out"])
    cfg = _cfg([corpus["out"]], ds.vocab)
    train, valid = build_discrete_iterators(cfg)
    assert valid is None
    pad = ds.vocab.pad(TEXT)
    for step in range(6):
        indices = list(range(step * 2, step * 2 + 2))
        batch = next(train)
        for r, i in enumerate(indices):
            k, segs = train.source.plan(i)
            docs = [ds.tokens(d, s, t) for d, s, t in segs]
            flat = np.concatenate(docs)
            assert np.array_equal(batch.tokens[r, :len(flat)].numpy(), flat)
            assert (batch.tokens[r, len(flat):] == pad).all() and (batch.document_ids[r, len(flat):] == -1).all()
            assert batch.document_ids[r, :len(flat)].tolist() == np.repeat(np.arange(len(docs)),
                                                                           [len(x) for x in docs]).tolist()


def test_plan_of_a_sample_is_a_function_of_the_config_and_index(corpus):
    vocab = _vocab_of(corpus["out"])
    cfg = _cfg([corpus["out"]], vocab, valid=0.2)
    a, b = _source(cfg), _source(cfg)
    n = 80  # several epochs
    forward = [a.plan(i) for i in range(n)]
    backward = [b.plan(i) for i in reversed(range(n))][::-1]  # a fresh loader, asked in another order
    for (ka, pa), (kb, pb) in zip(forward, backward):
        assert ka == kb and np.array_equal(pa, pb)
    assert a.streams[0].locate(n - 1)[0] >= 2


def test_dp2_ranks_together_are_dp1_and_resume_is_exact(corpus):
    vocab = _vocab_of(corpus["out"])
    cfg = _cfg([corpus["out"]], vocab, mbs=2, gbs=8)
    one, _ = build_discrete_iterators(cfg, 0, 1, 0)
    single = [next(one) for _ in range(8)]
    ranks = [build_discrete_iterators(cfg, r, 2, 0)[0] for r in range(2)]
    for step in range(4):
        b0, b1 = next(ranks[0]), next(ranks[1])
        for name in ("tokens", "document_ids", "context_start", "token_modality"):
            pair = [getattr(b, name) for b in (b0, b1)]
            want = [getattr(b, name) for b in single[2 * step:2 * step + 2]]
            assert torch.equal(torch.cat(pair), torch.cat(want)), name
    state = one.state_dict()
    assert state == {"consumed_samples": 16}
    later = [next(one) for _ in range(4)]
    resumed, _ = build_discrete_iterators(cfg, 0, 1, state["consumed_samples"], data_state=state)
    for want in later:
        got = next(resumed)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.document_ids, want.document_ids)


def test_blend_and_valid_split(corpus, tmp_path):
    vocab = _vocab_of(corpus["out"])
    other = str(tmp_path / "copy")
    shutil.copytree(corpus["out"], other)
    cfg = _cfg([corpus["out"], other], vocab, valid=0.2)
    train, valid = build_discrete_iterators(cfg)
    src = train.source
    tokens = [s.tokens for s in src.streams]  # data.weights empty: each dataset's training tokens
    assert src.blend.weights.tolist() == pytest.approx([t / sum(tokens) for t in tokens])
    picks = [src.plan(i)[0] for i in range(40)]
    assert abs(picks.count(0) - 40 * tokens[0] / sum(tokens)) <= 1
    assert valid is not None
    for k in range(2):
        tr, va = split_documents(len(DiscreteDataset(other)), 0.2, 5, k)
        assert set(src.streams[k].documents.tolist()) == set(tr.tolist())
        assert set(valid.source.streams[k].documents.tolist()) == set(va.tolist())
    weighted = _source(_cfg([corpus["out"], other], vocab, weights=(3, 1)))
    picks = [weighted.plan(i)[0] for i in range(40)]
    assert picks.count(0) == 30


def test_vocabulary_mismatch_and_long_mixed_documents_are_refused(corpus):
    vocab = _vocab_of(corpus["out"])
    wrong = UnifiedVocab(vocab.text_size, vocab.image_codes, vocab.audio_codes + 1)
    with pytest.raises(ValueError) as info:
        build_discrete_iterators(_cfg([corpus["out"]], wrong))
    msg = str(info.value)
    assert corpus["out"] in msg and "objective.masked_diffusion.audio_codebook_size=32" in msg
    assert str(vocab.to_dict()) in msg and str(wrong.to_dict()) in msg
    longest = DiscreteDataset(corpus["out"]).manifest["counts"]["max_mixed_length"]
    with pytest.raises(ValueError, match=f"more than data.seq_length=40 .* at least {longest}.*--max-mixed-length 40"):
        build_discrete_iterators(_cfg([corpus["out"]], vocab, seq=40))
