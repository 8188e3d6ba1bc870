"""Token ids are range-checked when a dataset is opened, and model.vocab_size against the dataset's tokenizer."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from megafusion.config import load_config
from megafusion.data.indexed import DatasetFormatError, MultimodalDataset
from megafusion.data.loader import check_vocab, open_datasets
from tests.data.fixtures import random_docs, rewrite_manifest, write_dataset


@pytest.fixture
def folder(tmp_path):
    docs = random_docs(np.random.default_rng(0), 12, vocab=200)
    path = write_dataset(str(tmp_path / "ds"), docs)
    largest = int(max(max(tokens) for tokens, _ in docs))
    return path, largest


def test_the_largest_id_is_scanned_when_the_manifest_does_not_record_it(folder):
    path, largest = folder
    ds = MultimodalDataset(path)
    assert ds.max_token_id == largest and ds.tokenizer_vocab_size is None


def test_a_recorded_largest_id_is_trusted_and_checked_against_the_tokenizer(folder):
    path, largest = folder

    def edit(m):
        m["files"]["tokens.bin"]["max_id"] = largest
        m["tokenizer"]["vocab_size"] = largest  # an id equal to the vocabulary size is out of range
    rewrite_manifest(path, edit)
    with pytest.raises(DatasetFormatError, match=r"tokens\.bin: holds token id .* outside the tokenizer's vocab"):
        MultimodalDataset(path)
    rewrite_manifest(path, lambda m: m["tokenizer"].update(vocab_size=largest + 1))
    assert MultimodalDataset(path).tokenizer_vocab_size == largest + 1


def test_model_vocab_smaller_than_the_tokenizer_is_an_error_larger_a_warning(folder, caplog):
    path, largest = folder
    rewrite_manifest(path, lambda m: m["tokenizer"].update(vocab_size=256))
    ds = MultimodalDataset(path)
    with pytest.raises(ValueError, match=r"model\.vocab_size=128 is smaller than the tokenizer vocabulary 256 .*"
                                         r"set model\.vocab_size=256"):
        check_vocab(128, ds)
    check_vocab(256, ds)
    with caplog.at_level(logging.WARNING):
        check_vocab(512, ds)
    assert "256 embedding rows are never trained" in caplog.text


def test_ids_past_the_model_vocab_are_an_error_without_tokenizer_information(folder):
    path, largest = folder
    ds = MultimodalDataset(path)
    with pytest.raises(ValueError, match=rf"token id {largest} but model\.vocab_size={largest}"):
        check_vocab(largest, ds)


def test_training_start_up_checks_the_vocabulary(folder):
    path, _ = folder
    rewrite_manifest(path, lambda m: m["tokenizer"].update(vocab_size=1024))
    cfg = load_config("tiny", [f"data.paths=[{path}]", "model.latent_channels=4", "model.latent_size=8",
                               "model.vocab_size=512"])
    with pytest.raises(ValueError, match="model.vocab_size=512 is smaller than the tokenizer vocabulary 1024"):
        open_datasets(cfg)
