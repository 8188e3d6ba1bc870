"""Round trip: preprocess generated parquet + JSONL, read back with megatron's IndexedDataset, compare with a
direct tokenize / encode of the same records."""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from megafusion.data.special_tokens import SPECIAL_TOKENS as S
from megafusion.encoders import build_encoder
from megafusion.preprocess import PreprocessOptions, run_preprocess
from megafusion.preprocess.documents import from_storage


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, mmap=False)


def _expected(rows, base, sp, enc):
    """Per row: (token stream, [latent [C, H, W]]) built directly from the raw values."""
    from PIL import Image

    def latent(value):
        data = value if isinstance(value, bytes) else open(os.path.join(base, value), "rb").read()
        x = enc.prepare(Image.open(io.BytesIO(data)))
        return enc.encode(torch.from_numpy(x)[None])[0].numpy()

    out = []
    for row in rows:
        kind = row.get("kind") or ("image_text" if row.get("image") else "text")
        ids, lat = [S.bos], []
        if kind == "text":
            ids += sp.encode(row["text"])
        elif kind == "image_text":
            ids += sp.encode(row["text"]) + [S.boi, S.frame, S.eoi]
            lat.append(latent(row["image"]))
        elif kind == "interleaved":
            for text, image in zip(row["texts"], row["images"]):
                if text is not None:
                    ids += sp.encode(text)
                else:
                    ids += [S.boi, S.frame, S.eoi]
                    lat.append(latent(image))
        else:
            ids += sp.encode(row["text"]) + [S.boi] + [S.frame] * len(row["frames"]) + [S.eoi]
            lat += [latent(f) for f in row["frames"]]
        out.append((ids + [S.eos], lat))
    return out


@pytest.mark.parametrize("encoder, latent_dtype", [("pixel", "float32"), ("pixel", "bfloat16"),
                                                   ("pixel", "float16")])
def test_roundtrip_parquet_and_jsonl(tmp_path, tokenizer_path, encoder, latent_dtype):
    import sentencepiece as spm
    from preprocess_corpus import mixed_rows, write_jsonl_with_paths, write_parquet

    rows = mixed_rows(20, seed=3, size=(20, 16))
    parquet = write_parquet(str(tmp_path / "mixed.parquet"), rows, row_group_size=5)
    jsonl = write_jsonl_with_paths(str(tmp_path / "j"), 6, size=(16, 24))
    out = str(tmp_path / "out")
    manifest = run_preprocess(PreprocessOptions(
        inputs=[parquet, jsonl], output=out, tokenizer=tokenizer_path, encoder=encoder,
        encoder_config={"resolution": 8}, latent_dtype=latent_dtype, min_image_size=8, seq_length=64,
        records_per_shard=7, chunk_records=3, progress=False))

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    enc = build_encoder(encoder, resolution=8)
    jrows = [json.loads(line) for line in open(jsonl)]
    expected = _expected(pq.read_table(parquet).to_pylist(), None, sp, enc) + \
        _expected(jrows, os.path.dirname(jsonl), sp, enc)

    tokens, latents = _read(os.path.join(out, "tokens")), _read(os.path.join(out, "latents"))
    n = len(expected)
    assert len(tokens.document_indices) - 1 == n == len(latents.document_indices) - 1 == manifest["counts"]["documents"]
    assert manifest["counts"]["records_read"] == n and manifest["counts"]["rejected"] == 0
    assert manifest["counts"]["tokens"] == sum(len(ids) for ids, _ in expected)
    assert manifest["counts"]["frames"] == 3 * 5  # one video per 4 parquet rows, 3 frames each
    assert manifest["counts"]["images"] == sum(len(lat) for _, lat in expected) - 15
    assert manifest["latent_shape"] == [3, 8, 8] and manifest["latent_dtype"] == latent_dtype
    assert manifest["latent_storage"] == ("float32" if latent_dtype == "float32" else f"{latent_dtype}-as-uint16")
    assert manifest["tokenizer"]["special_tokens"]["frame"] == S.frame
    for name, entry in manifest["files"].items():
        assert os.path.getsize(os.path.join(out, name)) == entry["bytes"]
    assert not os.path.exists(os.path.join(out, "shards"))
    assert manifest["files"]["tokens.bin"]["max_id"] == max(max(ids) for ids, _ in expected)
    tol = 0 if latent_dtype == "float32" else (1e-2 if latent_dtype == "bfloat16" else 1e-3)
    for doc, (ids, lat) in enumerate(expected):
        lo, hi = tokens.document_indices[doc], tokens.document_indices[doc + 1]
        assert hi - lo == 1
        stream = tokens[int(lo)]
        assert stream.dtype == np.int32 and stream.tolist() == ids, doc
        lo, hi = latents.document_indices[doc], latents.document_indices[doc + 1]
        assert hi - lo == len(lat) == int((stream == S.frame).sum())
        for k, want in zip(range(lo, hi), lat):
            got = from_storage(latents[int(k)], latent_dtype).reshape(3, 8, 8)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_roundtrip_vae_encoder(tmp_path, tokenizer_path):
    diffusers = pytest.importorskip("diffusers", reason="pip install diffusers to test the vae encoder")
    from preprocess_corpus import mixed_rows, write_parquet

    torch.manual_seed(0)
    vae = str(tmp_path / "vae")
    diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=8, scaling_factor=0.5).save_pretrained(vae)
    rows = mixed_rows(4, seed=5)
    parquet = write_parquet(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    manifest = run_preprocess(PreprocessOptions(
        inputs=[parquet], output=out, tokenizer=tokenizer_path, encoder="vae",
        encoder_config={"path": vae, "resolution": 8}, min_image_size=8, seq_length=64, progress=False))
    assert manifest["encoder"] == {"name": "vae", "config": build_encoder("vae", path=vae, resolution=8).config}
    assert manifest["latent_shape"] == [4, 4, 4]
    enc = build_encoder("vae", path=vae, resolution=8)
    import sentencepiece as spm

    expected = _expected(rows, None, spm.SentencePieceProcessor(model_file=tokenizer_path), enc)
    latents = _read(os.path.join(out, "latents"))
    flat = [lat for _, lats in expected for lat in lats]
    assert len(latents) == len(flat) == 1 + 2 + 3
    for k, want in enumerate(flat):  # batched in the pipeline, one by one here
        np.testing.assert_allclose(latents[k].reshape(4, 4, 4), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("latent_dtype", ["float32", "bfloat16"])
def test_output_opens_with_the_dataset_reader(tmp_path, tokenizer_path, latent_dtype):
    """The contract end to end: megafusion.data.indexed validates (sizes, sha256, FRAME counts) and reads it."""
    from preprocess_corpus import mixed_rows, write_parquet

    from megafusion.data.indexed import MultimodalDataset

    rows = mixed_rows(8, seed=9)
    parquet = write_parquet(str(tmp_path / "m.parquet"), rows)
    text_only = tmp_path / "t.jsonl"
    text_only.write_text('{"text": "a red cat"}\n{"text": "a dog near the river"}\n')
    out, out_text = str(tmp_path / "out"), str(tmp_path / "out_text")
    common = dict(tokenizer=tokenizer_path, encoder_config={"resolution": 8}, latent_dtype=latent_dtype,
                  min_image_size=8, seq_length=64, progress=False)
    run_preprocess(PreprocessOptions(inputs=[parquet], output=out, records_per_shard=3, **common))
    run_preprocess(PreprocessOptions(inputs=[str(text_only)], output=out_text, **common))
    ds = MultimodalDataset(out, verify_checksums=True)
    assert len(ds) == 8
    enc = build_encoder("pixel", resolution=8)
    from PIL import Image

    want = enc.prepare(Image.open(io.BytesIO(rows[1]["image"])))  # row 1 is an image-text pair
    tol = 0 if latent_dtype == "float32" else 1e-2
    np.testing.assert_allclose(ds.frames_f32(1, 0, 1)[0], want, atol=tol, rtol=tol)
    for doc in range(len(ds)):
        ds.frame_positions(doc)  # FRAME count == latent sequences, else DatasetFormatError
    text_ds = MultimodalDataset(out_text, verify_checksums=True)  # empty latents.bin
    assert len(text_ds) == 2 and text_ds.document(0).latents.shape[0] == 0
