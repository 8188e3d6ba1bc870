"""Offline preprocessing: raw parquet / JSONL corpora -> tokenized documents + frozen-encoder latents, written as
the dataset folder of docs/DATA_FORMAT.md (megatron IndexedDatasets + manifest.json + rejects.jsonl).

records (reading) -> documents (tokens + latents, with rejects) -> shards (per-worker files, done-markers) ->
publish (ordered merge, manifest last); runner ties them together with workers, progress and resume.
"""

from megafusion.preprocess.options import PreprocessOptions
from megafusion.preprocess.records import Columns
from megafusion.preprocess.runner import PreprocessError, run_preprocess

__all__ = ["PreprocessOptions", "Columns", "PreprocessError", "run_preprocess"]
