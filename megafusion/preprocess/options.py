"""The settings of one preprocessing run (what tools/preprocess_data.py parses), validated with messages naming the
flag, and the fingerprint that decides whether existing shards or a finished dataset belong to this same run."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megafusion.preprocess.documents import LATENT_DTYPES
from megafusion.preprocess.records import KIND_MODES, Columns, input_format

START_METHODS = ("fork", "spawn", "forkserver")


def check_inputs(inputs) -> None:
    """--input: at least one file, each an existing parquet or JSONL file."""
    if not inputs:
        raise ValueError("--input: give at least one parquet or JSONL file")
    for path in inputs:
        input_format(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path}: no such file")


@dataclass
class PreprocessOptions:
    inputs: List[str]
    """Parquet / JSONL files, read in this order (the global record order)."""
    output: str
    """Dataset folder (docs/DATA_FORMAT.md)."""
    tokenizer: str
    """SentencePiece .model from tools/train_tokenizer.py."""
    encoder: str = "pixel"
    """Encoder name for megafusion.encoders.build_encoder."""
    encoder_config: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the encoder (resolution, crop, dtype, path, device, batch_size, ...)."""
    latent_dtype: str = "float32"
    """Stored latent dtype: float32 | float16 | bfloat16 (16-bit ones as uint16 bit patterns)."""
    patch_size: int = 2
    """Model patch size p: one image takes (H/p)*(W/p) + 2 positions."""
    seq_length: int = 4096
    """Packed sequence length; a document whose single image cannot fit is rejected."""
    min_image_size: int = 32
    """Images whose shorter side is below this many pixels are rejected (0 = no minimum)."""
    max_reject_fraction: float = 0.05
    """The run fails when rejected / records read exceeds this."""
    columns: Columns = field(default_factory=Columns)
    """Input column names."""
    kind: str = "auto"
    """Record kind for every row, or auto (the kind column, else inferred per row)."""
    workers: int = 1
    """Worker processes (1 = in this process)."""
    records_per_shard: int = 2000
    """Contiguous records per shard: the unit of parallel work and of resume."""
    chunk_records: int = 64
    """Records whose images are encoded together (fixed from the shard start, so results do not depend on workers)."""
    threads_per_worker: Optional[int] = None
    """torch threads per worker; None = cpu_count // workers (at least 1)."""
    start_method: str = "fork"
    """multiprocessing start method for workers > 1."""
    keep_shards: bool = False
    """Keep shards/ after publishing (default: removed)."""
    overwrite: bool = False
    """Replace a finished dataset or shards written by a different command in the output folder."""
    progress: bool = True
    """Show the tqdm progress bar."""
    command: Optional[str] = None
    """The command line stored in the manifest."""

    def __post_init__(self):
        check_inputs(self.inputs)
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"--latent-dtype {self.latent_dtype!r} is not one of {list(LATENT_DTYPES)}")
        if self.kind not in KIND_MODES:
            raise ValueError(f"--kind {self.kind!r} is not one of {list(KIND_MODES)}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"--start-method {self.start_method!r} is not one of {list(START_METHODS)}")
        for name in ("patch_size", "seq_length", "workers", "records_per_shard", "chunk_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.min_image_size < 0:
            raise ValueError(f"--min-image-size must be >= 0, got {self.min_image_size}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"--max-reject-fraction {self.max_reject_fraction} must be in [0, 1]")

    @property
    def threads(self) -> int:
        if self.threads_per_worker:
            return self.threads_per_worker
        return max(1, (os.cpu_count() or 1) // self.workers)

    def settings(self) -> Dict[str, Any]:
        """What goes into the manifest's "options" (everything that shapes the output)."""
        return {"seq_length": self.seq_length, "min_image_size": self.min_image_size,
                "max_reject_fraction": self.max_reject_fraction, "kind": self.kind,
                "columns": self.columns.to_dict(), "records_per_shard": self.records_per_shard,
                "chunk_records": self.chunk_records}

    def fingerprint(self, encoder_config: Dict[str, Any], tokenizer_sha256: str) -> str:
        """Hash of everything that determines the bytes written (not workers, progress or the threshold)."""
        inputs = []
        for path in self.inputs:
            st = os.stat(path)
            inputs.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        settings = self.settings()
        settings.pop("max_reject_fraction")
        blob = {"inputs": inputs, "encoder": self.encoder, "encoder_config": encoder_config,
                "encoder_options": self.encoder_config, "tokenizer_sha256": tokenizer_sha256,
                "latent_dtype": self.latent_dtype, "patch_size": self.patch_size, "settings": settings}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
