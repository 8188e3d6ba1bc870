import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # trained_run.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "preprocess"))  # preprocess_corpus.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))  # loop_harness.py

