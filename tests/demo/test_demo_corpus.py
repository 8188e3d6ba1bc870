"""The demo corpus: parquet rows the real record parser reads, held-out pairs absent from training, determinism,
and the evaluation set."""

import hashlib
import json
import os

import pytest

from megafusion.demo import captions as cap
from megafusion.demo.checker import detect_objects
from megafusion.demo.corpus import CorpusConfig, check_held_out, choose_held_out, decode_png, load_eval, read_png, \
    write_corpus
from megafusion.preprocess.records import Columns, ImagePart, TextPart, VideoPart, count_rows, iter_rows, \
    parse_record

SMALL = dict(n_text=12, n_caption_image=30, n_image_caption=15, n_interleaved=12, n_video=10, eval_single=8,
             eval_pair=6, eval_video=4, eval_captions=6, eval_seen=3, rows_per_file=50, row_group_size=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_corpus"))
    return root, write_corpus(root, CorpusConfig(seed=11, **SMALL))


def _records(root, info):
    """(Record, meta) per train row: the record through the preprocessing reader (which skips `meta`)."""
    import pyarrow.parquet as pq

    out = []
    for name in info["train"]["files"]:
        path = os.path.join(root, name)
        n, _ = count_rows(path)
        metas = pq.read_table(path, columns=["meta"]).column("meta").to_pylist()
        raws = list(iter_rows(path, 0, n, Columns()))
        assert len(raws) == len(metas) == n and all("meta" not in raw.values for raw in raws)
        out += [(parse_record(raw, Columns()), json.loads(meta)) for raw, meta in zip(raws, metas)]
    return out


def test_train_rows_parse_with_the_record_parser(corpus):
    root, info = corpus
    assert info["train"]["files"] == ["train/part-00000.parquet", "train/part-00001.parquet"]
    records = _records(root, info)
    assert len(records) == info["train"]["rows"] == 79
    seen = {}
    for record, meta in records:
        seen[meta["doc"]] = seen.get(meta["doc"], 0) + 1
        shapes = [type(p) for p in record.parts]
        if meta["doc"] == "text":
            assert record.kind == "text" and shapes == [TextPart]
        elif meta["doc"] == "caption_image":
            assert record.kind == "image_text" and shapes == [TextPart, ImagePart]
        elif meta["doc"] == "image_caption":
            assert record.kind == "interleaved" and shapes == [ImagePart, TextPart]
        elif meta["doc"] == "interleaved":
            assert record.kind == "interleaved" and shapes[:4] == [TextPart, ImagePart, TextPart, ImagePart]
        else:
            assert record.kind == "video" and shapes == [TextPart, VideoPart] and len(record.parts[1].frames) == 4
        for part in record.parts:
            refs = [part.image] if isinstance(part, ImagePart) else part.frames if isinstance(part, VideoPart) else []
            for ref in refs:
                assert decode_png(ref.data).shape == (32, 32, 3)
    assert seen == {"text": 12, "caption_image": 30, "image_caption": 15, "interleaved": 12, "video": 10}
    assert seen == info["train"]["documents"]
    # the caption of an image document names the objects of its image
    for record, meta in records:
        if meta["doc"] in ("caption_image", "image_caption"):
            text = [p.text for p in record.parts if isinstance(p, TextPart)][0]
            truth = {(o["shape"], o["color"]) for o in meta["scenes"][0]["objects"]}
            assert set(cap.parse_caption(text).objects) == truth


def test_held_out_pairs_never_appear_in_training(corpus):
    root, info = corpus
    held = {tuple(p) for p in info["held_out_pairs"]}
    assert len(held) == 3 and held.isdisjoint({tuple(p) for p in info["train_pairs"]})
    for record, meta in _records(root, info):
        scenes = meta.get("scenes", []) + ([{"objects": [meta["video"]]}] if "video" in meta else [])
        for s in scenes:
            assert held.isdisjoint((o["shape"], o["color"]) for o in s["objects"])
        for part in record.parts:
            if isinstance(part, TextPart):
                assert held.isdisjoint(cap.parse_caption(part.text).objects), part.text
            refs = [part.image] if isinstance(part, ImagePart) else part.frames if isinstance(part, VideoPart) else []
            for ref in refs:
                assert held.isdisjoint((o.shape, o.color) for o in detect_objects(decode_png(ref.data)))


def test_eval_set_asks_for_held_out_combinations(corpus):
    root, info = corpus
    held = {tuple(p) for p in info["held_out_pairs"]}
    ev = load_eval(root)
    assert [len(ev[t]) for t in ("text_to_image", "text_to_video", "image_to_text")] == [20, 7, 9]
    for entry in ev["text_to_image"]:
        objects = {(o.shape, o.color) for o in entry["scene"].objects}
        assert bool(objects & held) == (entry["split"] == "held_out")
        assert entry["prompt"] == cap.canonical_caption(entry["scene"])
        assert set(cap.parse_caption(entry["prompt"]).objects) == objects
    assert {e["kind"] for e in ev["text_to_image"]} == {"single", "pair"}
    for entry in ev["text_to_video"]:
        assert ((entry["video"].shape, entry["video"].color) in held) == (entry["split"] == "held_out")
    for entry in ev["image_to_text"]:
        image = read_png(entry["image"])
        found = {(o.shape, o.color) for o in detect_objects(image)}
        assert found == {(o.shape, o.color) for o in entry["scene"].objects}
        assert bool(found & held) == (entry["split"] == "held_out")
    with open(os.path.join(root, "split.json")) as f:
        assert json.load(f)["held_out_pairs"] == info["held_out_pairs"]


def _digest(root):
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    small = dict(SMALL, n_caption_image=10, n_image_caption=5, rows_per_file=100)
    write_corpus(str(tmp_path / "a"), CorpusConfig(seed=4, **small))
    write_corpus(str(tmp_path / "b"), CorpusConfig(seed=4, **small))
    write_corpus(str(tmp_path / "c"), CorpusConfig(seed=5, **small))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_held_out_choice_and_validation():
    for seed in range(5):
        held = choose_held_out(seed, 6)
        assert len({c for _, c in held}) == 6
        assert len(check_held_out(held)) == 18 - 6
    with pytest.raises(ValueError, match="every shape of color 'red'"):
        check_held_out([("circle", "red"), ("square", "red"), ("triangle", "red")])
    with pytest.raises(ValueError, match="not a"):
        check_held_out([("hexagon", "red")])
    with pytest.raises(ValueError, match="n_held_out"):
        choose_held_out(0, 7)
    with pytest.raises(ValueError, match="n_text"):
        CorpusConfig(n_text=-1)
    with pytest.raises(ValueError, match="two_object_fraction"):
        CorpusConfig(two_object_fraction=1.5)


def test_explicit_held_out_and_only_text(tmp_path):
    write_corpus(str(tmp_path), CorpusConfig(seed=0, **dict(SMALL, rows_per_file=20)))  # 4 parts, then rewritten
    info = write_corpus(str(tmp_path), CorpusConfig(seed=0, n_text=5, n_caption_image=0, n_image_caption=0,
                                                    n_interleaved=0, n_video=0, held_out=[["circle", "red"]],
                                                    eval_single=2, eval_pair=0, eval_video=0, eval_captions=0,
                                                    eval_seen=0))
    assert info["held_out_pairs"] == [["circle", "red"]] and info["train"]["rows"] == 5
    assert sorted(os.listdir(tmp_path / "train")) == ["part-00000.parquet"]
    ev = load_eval(str(tmp_path))
    assert [e["prompt"] for e in ev["text_to_image"]] and ev["text_to_video"] == []
    assert all(e["scene"].objects[0].color == "red" for e in ev["text_to_image"])
