"""Record reading: streamed parquet ranges across row groups, JSONL seeking, kinds, configurable columns, image
value layouts."""

import base64
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megafusion.preprocess.records import (Columns, ImagePart, TextPart, VideoPart, count_rows, iter_rows,
                                           parse_record)
from megafusion.preprocess.rejects import Rejected
from megafusion.preprocess.shards import plan_shards


def test_parquet_ranges_cross_row_groups(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(23)]}), path, row_group_size=4)
    assert count_rows(path)[0] == 23
    for start, stop in [(0, 23), (3, 9), (8, 12), (22, 23), (5, 5)]:
        rows = list(iter_rows(path, start, stop, Columns(), batch_rows=3))
        assert [r.row for r in rows] == list(range(start, stop))
        assert [r.values["text"] for r in rows] == [f"row {i}" for i in range(start, stop)]


def test_shard_plan_spans_inputs_and_seeks_jsonl(tmp_path):
    a = str(tmp_path / "a.jsonl")
    with open(a, "w") as f:
        for i in range(7):
            f.write(json.dumps({"text": f"a{i}" * (i + 1)}) + "\n")
    b = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [f"b{i}" for i in range(6)]}), b, row_group_size=2)
    shards = plan_shards([a, b], 5)
    assert [(s.start, s.stop) for s in shards] == [(0, 5), (5, 10), (10, 13)]
    assert [(g.input_index, g.start, g.stop) for g in shards[1].segments] == [(0, 5, 7), (1, 0, 3)]
    assert shards[1].segments[0].byte_offset == sum(len(json.dumps({"text": f"a{i}" * (i + 1)})) + 1
                                                    for i in range(5))
    texts = []
    for shard in shards:
        for g in shard.segments:
            path = [a, b][g.input_index]
            texts += [r.values["text"] for r in iter_rows(path, g.start, g.stop, Columns(), g.byte_offset)]
    assert texts == [f"a{i}" * (i + 1) for i in range(7)] + [f"b{i}" for i in range(6)]


def _raw(values, source="/data/x.jsonl"):
    from megafusion.preprocess.records import RawRow

    return RawRow(source, 0, values)


def test_kinds_columns_and_image_layouts():
    cols = Columns(text="caption", image="jpg", frames="clip")
    rec = parse_record(_raw({"caption": "a cat", "jpg": {"bytes": None, "path": "img/c.png"}}), cols)
    assert rec.kind == "image_text" and isinstance(rec.parts[1], ImagePart)
    assert rec.parts[1].image.path == "/data/img/c.png"
    rec = parse_record(_raw({"caption": "a cat", "jpg": {"bytes": base64.b64encode(b"xyz").decode()}}), cols)
    assert rec.parts[1].image.data == b"xyz"
    rec = parse_record(_raw({"caption": "clip", "clip": [b"1", b"2"]}), cols)
    assert rec.kind == "video" and len(rec.parts[1].frames) == 2 and isinstance(rec.parts[1], VideoPart)
    rec = parse_record(_raw({"texts": ["a", None, "", "b"], "images": [None, b"i", None, None]}), Columns())
    assert rec.kind == "interleaved"
    assert [type(p) for p in rec.parts] == [TextPart, ImagePart, TextPart]  # the empty text part is dropped
    assert parse_record(_raw({"text": "x", "image": b"i"}), Columns(), kind_mode="text").kind == "text"
    with pytest.raises(Rejected) as info:
        parse_record(_raw({"caption": "a", "jpg": 3}), cols)
    assert info.value.reason == "wrong_type" and "jpg" in info.value.detail
    with pytest.raises(Rejected) as info:
        parse_record(_raw({"texts": ["a"], "images": [b"i", None]}), Columns())
    assert info.value.reason == "wrong_type"


def test_custom_columns_through_the_cli(tmp_path, tokenizer_path):
    from preprocess_corpus import image_bytes, load_tool

    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"caption": ["a red cat", "a dog"], "jpg": pa.array([image_bytes(1), image_bytes(2)])}),
                   path)
    out = tmp_path / "out"
    load_tool("preprocess_data").main([
        "--input", path, "--output", str(out), "--tokenizer", tokenizer_path, "--text-column", "caption",
        "--image-column", "jpg", "--resolution", "8", "--min-image-size", "8", "--seq-length", "64",
        "--no-progress"])
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["counts"]["images"] == 2 and manifest["counts"]["rejected"] == 0
    assert manifest["options"]["columns"]["text"] == "caption"
    assert os.path.getsize(out / "latents.bin") == 2 * 3 * 8 * 8 * 4
