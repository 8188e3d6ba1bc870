import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tiny_model.py, trained_run.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "preprocess"))  # preprocess_corpus.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))  # loop_harness.py


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny model trained for a few steps on a preprocessed corpus (pixel encoder, 8x8 images)."""
    from trained_run import make_trained_run

    return make_trained_run(tmp_path_factory.mktemp("trained_run"))
