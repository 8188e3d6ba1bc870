import os
import sys

_TESTS = os.path.dirname(os.path.dirname(__file__))
for _sub in ("inference", "preprocess", "training"):  # trained_run.py, preprocess_corpus.py
    sys.path.insert(0, os.path.join(_TESTS, _sub))
