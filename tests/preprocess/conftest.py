import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # preprocess_corpus.py


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    from preprocess_corpus import train_tiny_tokenizer

    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
