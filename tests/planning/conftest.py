"""The planning tests' helpers (meta_build.py, measure_cpu_run.py) import by name from this folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
