"""Bad input: every reject reason lands in rejects.jsonl with its source row and in the manifest counts; the run
fails only above --max-reject-fraction."""

import base64
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megafusion.encoders import register_encoder
from megafusion.encoders.pixel import PixelEncoder
from megafusion.preprocess import PreprocessOptions, run_preprocess
from megafusion.preprocess.rejects import REASONS


class NanOnWhitePixelEncoder(PixelEncoder):
    """The pixel encoder, except that an all-white image encodes to NaN (a broken encoder stand-in)."""

    name = "nan-on-white"

    def _encode(self, pixels):
        out = pixels.clone()
        out[(pixels > 0.99).flatten(1).all(dim=1)] = float("nan")
        return out


register_encoder("nan-on-white", NanOnWhitePixelEncoder)


def _png(path, size, colour=None, seed=0):
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 200, (size[1], size[0], 3), dtype=np.uint8)
    if colour is not None:
        array[:] = colour
    Image.fromarray(array).save(path)
    return os.path.basename(path)


def _bad_inputs(folder):
    """A JSONL and a parquet holding good rows and one row per reason; returns (inputs, {(file, row): reason})."""
    from preprocess_corpus import image_bytes

    folder = str(folder)
    good = _png(os.path.join(folder, "good.png"), (16, 16))
    small = _png(os.path.join(folder, "small.png"), (4, 16))
    white = _png(os.path.join(folder, "white.png"), (16, 16), colour=255)
    lines = [
        json.dumps({"text": "a good text document"}),
        "this is not json",
        json.dumps({"kind": "image_text", "text": "a caption without its image"}),
        json.dumps({"text": 5}),
        json.dumps({"text": "   "}),
        None,  # raw non-UTF-8 bytes
        json.dumps({"text": "a caption", "image": "no/such/file.png"}),
        json.dumps({"text": "a caption", "image": small}),
        json.dumps({"text": "a caption", "image": {"bytes": base64.b64encode(b"not an image").decode()}}),
        json.dumps({"kind": "painting", "text": "x"}),
        json.dumps({"text": "a caption", "image": white}),
        json.dumps({"text": "a caption", "image": good}),
        json.dumps({"texts": ["one", None], "images": [None]}),
        json.dumps({"text": "\ud800 lone surrogate"}),
    ]
    jsonl = os.path.join(folder, "bad.jsonl")
    with open(jsonl, "wb") as f:
        for line in lines:
            f.write((line.encode() if line is not None else b'{"text": "caf\xe9 latin-1"}') + b"\n")
    expected = {(jsonl, 1): "invalid_json", (jsonl, 2): "missing_column", (jsonl, 3): "wrong_type",
                (jsonl, 4): "empty_text", (jsonl, 5): "invalid_utf8", (jsonl, 6): "missing_image_file",
                (jsonl, 7): "image_too_small", (jsonl, 8): "undecodable_image", (jsonl, 9): "unknown_kind",
                (jsonl, 10): "nan_latent", (jsonl, 12): "wrong_type", (jsonl, 13): "invalid_utf8"}

    jpeg = image_bytes(1, (16, 16), "JPEG")
    rows = [
        {"kind": "text", "text": b"valid utf-8 text", "image": None},
        {"kind": "text", "text": b"\xff\xfe broken", "image": None},
        {"kind": "image_text", "text": b"caption", "image": b"garbage bytes"},
        {"kind": "image_text", "text": b"caption", "image": jpeg[: len(jpeg) // 2]},  # truncated JPEG
        {"kind": "image_text", "text": b"caption", "image": jpeg},
        {"kind": "text", "text": b"", "image": None},
    ]
    parquet = os.path.join(folder, "bad.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("kind", pa.string()), ("text", pa.binary()), ("image", pa.binary())])), parquet, row_group_size=4)
    expected.update({(parquet, 1): "invalid_utf8", (parquet, 2): "undecodable_image",
                     (parquet, 3): "undecodable_image", (parquet, 5): "empty_text"})

    typed = os.path.join(folder, "wrong_type.parquet")  # a whole column of the wrong type
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), typed)
    expected.update({(typed, 0): "wrong_type", (typed, 1): "wrong_type"})
    nocol = os.path.join(folder, "no_text_column.parquet")  # the text column is missing altogether
    pq.write_table(pa.table({"caption": pa.array(["x"])}), nocol)
    expected[(nocol, 0)] = "missing_column"
    return [jsonl, parquet, typed, nocol], expected, 14 + 6 + 2 + 1


def _options(inputs, out, tokenizer, **kw):
    base = dict(inputs=inputs, output=str(out), tokenizer=tokenizer, encoder="nan-on-white",
                encoder_config={"resolution": 8}, min_image_size=8, seq_length=64, records_per_shard=5,
                max_reject_fraction=1.0, progress=False)
    base.update(kw)
    return PreprocessOptions(**base)


def test_every_bad_input_is_rejected_with_its_reason(tmp_path, tokenizer_path):
    inputs, expected, total = _bad_inputs(tmp_path)
    manifest = run_preprocess(_options(inputs, tmp_path / "out", tokenizer_path))
    with open(tmp_path / "out" / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f]
    got = {(r["source"], r["row"]): r["reason"] for r in rejects}
    assert got == expected
    assert all(r["detail"] for r in rejects)
    assert set(expected.values()) | {"image_exceeds_seq_length"} == set(REASONS)
    counts = manifest["counts"]
    assert counts["records_read"] == total and counts["rejected"] == len(expected)
    assert counts["documents"] == total - len(expected) == 4  # good text, good image, parquet text + jpeg
    assert counts["images"] == 2
    by_reason = {reason: list(expected.values()).count(reason) for reason in REASONS}
    assert manifest["rejected_by_reason"] == by_reason


def test_image_that_cannot_fit_seq_length(tmp_path, tokenizer_path):
    from preprocess_corpus import write_jsonl_with_paths

    jsonl = write_jsonl_with_paths(str(tmp_path), 6)  # rows 0, 2, 4 carry an image
    # resolution 8, patch 2: one image = 16 patches + BOI + EOI = 18 positions > 17
    manifest = run_preprocess(_options([jsonl], tmp_path / "out", tokenizer_path, encoder="pixel", seq_length=17))
    assert manifest["rejected_by_reason"]["image_exceeds_seq_length"] == 3
    assert manifest["counts"]["documents"] == 3 and manifest["counts"]["images"] == 0
    rows = [json.loads(line)["row"] for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert rows == [0, 2, 4]
    manifest = run_preprocess(_options([jsonl], tmp_path / "out18", tokenizer_path, encoder="pixel", seq_length=18))
    assert manifest["counts"]["rejected"] == 0


def test_threshold_failure_exits_nonzero_and_publishes_nothing(tmp_path, tokenizer_path, capsys):
    from preprocess_corpus import load_tool

    inputs, expected, total = _bad_inputs(tmp_path)
    out = tmp_path / "out"
    argv = ["--input", *inputs, "--output", str(out), "--tokenizer", tokenizer_path, "--encoder", "nan-on-white",
            "--resolution", "8", "--min-image-size", "8", "--seq-length", "64", "--no-progress",
            "--max-reject-fraction", "0.5"]
    main = load_tool("preprocess_data").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"{len(expected)} of {total} records rejected" in err and "--max-reject-fraction 0.5" in err
    assert "rejects.jsonl" in err
    assert not (out / "manifest.json").exists() and not (out / "tokens.idx").exists()
    assert not list(out.glob("*.partial")), "the merged-so-far temp files of a failed run are removed"
    assert len(open(out / "rejects.jsonl").readlines()) == len(expected)
    # the same command with a looser threshold reuses the finished shards and publishes
    main(argv[:-1] + ["0.9"])
    err = capsys.readouterr().err
    assert "resuming" in err
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["counts"]["rejected"] == len(expected)
    assert manifest["command"].startswith("tools/preprocess_data.py --input")


def test_a_run_that_fails_before_any_record_leaves_no_output_folder(tmp_path, tokenizer_path):
    from preprocess_corpus import write_parquet

    from megafusion.preprocess import PreprocessError, PreprocessOptions, run_preprocess

    empty = write_parquet(str(tmp_path / "empty.parquet"), [], row_group_size=4)
    common = dict(encoder_config={"resolution": 8}, min_image_size=8, seq_length=64, progress=False)
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match="no records to preprocess"):
        run_preprocess(PreprocessOptions(inputs=[empty], output=str(out), tokenizer=tokenizer_path, **common))
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_preprocess(PreprocessOptions(inputs=[empty], output=str(out), tokenizer=str(tmp_path / "missing.model"),
                                         **common))
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    with pytest.raises(PreprocessError):
        run_preprocess(PreprocessOptions(inputs=[empty], output=str(existing), tokenizer=tokenizer_path, **common))
    assert (existing / "notes.txt").read_text() == "the user's", "a folder the run did not create is kept"
