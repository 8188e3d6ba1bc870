import os

import numpy as np
import pytest
import torch
from fixtures import random_docs, refresh_file_entry, rewrite_manifest, write_dataset

from megafusion.data.indexed import DatasetFormatError, MultimodalDataset
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST


@pytest.fixture
def folder(tmp_path):
    docs = random_docs(np.random.default_rng(0), 20)
    return write_dataset(str(tmp_path / "ds"), docs), docs


@pytest.mark.parametrize("storage", ["float32", "bfloat16-as-uint16", "float16-as-uint16", "float16"])
def test_documents_read_back(tmp_path, storage):
    docs = random_docs(np.random.default_rng(1), 12)
    ds = MultimodalDataset(write_dataset(str(tmp_path / storage), docs, storage=storage))
    assert len(ds) == 12
    want_dtype = {"float32": torch.float32, "bfloat16-as-uint16": torch.bfloat16, "float16": torch.float16,
                  "float16-as-uint16": torch.float16}[storage]
    for i, (tokens, latents) in enumerate(docs):
        doc = ds.document(i)
        assert doc.tokens.tolist() == list(tokens)
        assert doc.latents.dtype == want_dtype and tuple(doc.latents.shape) == latents.shape
        expect = torch.from_numpy(latents).to(want_dtype)
        assert torch.equal(doc.latents, expect)
        assert np.array_equal(ds.frames_f32(i, 0, len(latents)), expect.float().numpy())
    assert ds.frame_counts.tolist() == [len(l) for _, l in docs]


def test_truncated_bin_names_the_file(folder):
    path, _ = folder
    bin_ = os.path.join(path, "latents.bin")
    with open(bin_, "r+b") as f:
        f.truncate(os.path.getsize(bin_) - 8)
    with pytest.raises(DatasetFormatError, match=r"latents\.bin.*truncated"):
        MultimodalDataset(path)
    # even when the manifest is updated to the damaged size, the .idx still disagrees with the .bin
    refresh_file_entry(path, "latents.bin")
    with pytest.raises(DatasetFormatError, match=r"latents\.bin.*describes.*truncated"):
        MultimodalDataset(path)


def test_corrupt_idx_names_the_file(folder):
    path, _ = folder
    idx = os.path.join(path, "tokens.idx")
    with open(idx, "r+b") as f:
        f.write(b"GARBAGE!!")
    refresh_file_entry(path, "tokens.idx")
    with pytest.raises(DatasetFormatError, match=r"tokens\.idx: bad \.idx header"):
        MultimodalDataset(path)


def test_corrupt_idx_lengths_detected(folder):
    path, _ = folder
    idx = os.path.join(path, "latents.idx")
    with open(idx, "r+b") as f:  # first sequence length of the latents index
        f.seek(34)
        f.write(np.int32(7).tobytes())
    refresh_file_entry(path, "latents.idx")
    with pytest.raises(DatasetFormatError, match=r"latents\.idx"):
        MultimodalDataset(path)


def test_idx_checksum_mismatch(folder):
    path, _ = folder
    idx = os.path.join(path, "tokens.idx")
    data = bytearray(open(idx, "rb").read())
    data[-1] ^= 0xFF
    open(idx, "wb").write(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"tokens\.idx: sha256"):
        MultimodalDataset(path)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m["counts"].update(documents=21), r"tokens\.idx: 20 documents but manifest counts\.documents = 21"),
        (lambda m: m.update(latent_shape=[4, 8, 4]), r"latents\.idx: latent sequence 0 holds 256 values"),
        (lambda m: m.update(latent_storage="bfloat16-as-uint16"), r"latents\.idx: stored dtype float32"),
        (lambda m: m["files"]["tokens.bin"].update(bytes=1), r"tokens\.bin: .* bytes but the manifest records 1"),
        (lambda m: m.update(latent_storage="int4"), r"latent_storage='int4'"),
        (lambda m: m.pop("files"), r"manifest has no 'files'"),
    ],
)
def test_manifest_mismatch_is_named(folder, edit, needle):
    path, _ = folder
    rewrite_manifest(path, edit)
    with pytest.raises(DatasetFormatError, match=needle):
        MultimodalDataset(path)


def test_missing_files(folder, tmp_path):
    path, _ = folder
    os.remove(os.path.join(path, "latents.idx"))
    with pytest.raises(DatasetFormatError, match=r"latents\.idx: file missing"):
        MultimodalDataset(path)
    with pytest.raises(DatasetFormatError, match="manifest.json: missing"):
        MultimodalDataset(str(tmp_path / "nowhere"))


def test_frame_count_mismatch_names_the_document(tmp_path):
    docs = random_docs(np.random.default_rng(2), 6)
    rich = next(i for i, (_, l) in enumerate(docs) if len(l) >= 1)
    tokens, latents = docs[rich]
    docs[rich] = (list(tokens[:-1]) + [ST.frame, ST.eos], latents)  # one FRAME more than latents
    ds = MultimodalDataset(write_dataset(str(tmp_path / "ds"), docs))
    with pytest.raises(DatasetFormatError, match=rf"document {rich} has {len(latents) + 1} FRAME tokens but "
                                                 rf"{len(latents)} latent sequences"):
        ds.document(rich)


def test_pickles_by_path(folder):
    import pickle

    path, docs = folder
    ds = pickle.loads(pickle.dumps(MultimodalDataset(path)))
    assert ds.tokens(5).tolist() == list(docs[5][0])


def test_text_only_folder_with_empty_latents(tmp_path):
    docs = [([ST.bos, 20, 21, ST.eos], np.zeros((0, 4, 8, 8), np.float32)) for _ in range(3)]
    path = write_dataset(str(tmp_path / "text"), docs)
    assert os.path.getsize(os.path.join(path, "latents.bin")) == 0
    ds = MultimodalDataset(path)
    assert ds.frame_counts.tolist() == [0, 0, 0]
    assert ds.document(2).latents.shape == (0, 4, 8, 8)


def test_a_masked_diffusion_folder_is_refused_by_name(tmp_path):
    import json as _json

    from megafusion.data.indexed import DatasetFormatError, MultimodalDataset

    (tmp_path / "manifest.json").write_text(_json.dumps({"family": "masked_diffusion", "format_version": 1}))
    with pytest.raises(DatasetFormatError, match="masked_diffusion family, not flow_matching; train on it with "
                                                  "objective.kind=masked_diffusion"):
        MultimodalDataset(str(tmp_path))
