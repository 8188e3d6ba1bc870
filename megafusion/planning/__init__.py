"""Planning a run before renting GPUs (`megafusion plan`): parameter counts (counts.py), activation memory
(activations.py), per-GPU memory (memory.py) under a launch layout (layout.py), FLOPs, steps and wall-clock, table
and JSON (report.py), the command line (cli.py). Pure arithmetic on the config: nothing is allocated."""

from megafusion.planning.counts import ParameterCounts, count_parameters
from megafusion.planning.report import Plan, make_plan

__all__ = ["ParameterCounts", "Plan", "count_parameters", "make_plan"]
