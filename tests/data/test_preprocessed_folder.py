"""The contract end to end: folders written by the real preprocessing (megafusion.preprocess, pixel encoder) open,
validate and load into batches whose tokens and latents are the stored documents."""

import os
import sys

import numpy as np
import pytest
from unpack import segments, stitch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "preprocess"))

from megafusion.config.schema import Config, DataConfig, ModelConfig, TrainingConfig  # noqa: E402
from megafusion.data.indexed import MultimodalDataset  # noqa: E402
from megafusion.data.loader import build_data_iterators  # noqa: E402
from megafusion.data.sampler import epoch_order, split_documents  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from preprocess_corpus import train_tiny_tokenizer

    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("latent_dtype", ["float32", "float16"])
def test_preprocessed_folder_loads(tmp_path, tokenizer, latent_dtype):
    from preprocess_corpus import mixed_rows, write_parquet

    from megafusion.preprocess import PreprocessOptions, run_preprocess

    parquet = write_parquet(str(tmp_path / "m.parquet"), mixed_rows(24, seed=3, size=(20, 16)), row_group_size=6)
    out = str(tmp_path / "ds")
    run_preprocess(PreprocessOptions(inputs=[parquet], output=out, tokenizer=tokenizer, encoder="pixel",
                                     encoder_config={"resolution": 8}, latent_dtype=latent_dtype, min_image_size=8,
                                     seq_length=64, records_per_shard=7, chunk_records=3, progress=False))
    ds = MultimodalDataset(out, verify_checksums=True)
    c, h, w = ds.latent_shape
    docs = [ds.document(i) for i in range(len(ds))]
    assert sum(len(d.latents) for d in docs) > 0
    cfg = Config(model=ModelConfig(latent_channels=c, latent_size=h, patch_size=2, vocab_size=512),
                 data=DataConfig(seq_length=64, paths=[out], valid_fraction=0.0, seed=5),
                 training=TrainingConfig(micro_batch_size=2, global_batch_size=2))
    train, _ = build_data_iterators(cfg, 0, 1, 0)
    rows = []
    for _ in range(30):
        rows += segments(next(train).validate(), 2, (c, h, w))
    tokens, frames = stitch(rows)
    order = epoch_order(split_documents(len(ds), 0.0, 5, 0)[0], 5, 0, 0, 0)
    want = [t for i in order for t in docs[i].tokens.tolist()]
    assert tokens[: len(want)] == want
    want_frames = [f.float().numpy() for i in order for f in docs[i].latents]
    assert len(frames) >= len(want_frames)
    assert all(np.array_equal(a, b) for a, b in zip(frames, want_frames))
