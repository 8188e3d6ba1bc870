"""The Hugging Face folder on disk: what the converter writes and reads besides the model code.

    stage = Staging(out, overwrite=False)          # <parent>/.<name>.partial-<pid>: nothing under `out` yet
    ShardWriter(stage.path, max_shard_size).write(plan, fetch)   # model.safetensors or model-0000x-of-0000y + index
    stage.publish()                                # fsync every file, rename to `out`, fsync the parent
    folder = HFFolder(path)                        # config.json + shards, index checked; folder.tensor(name)

Owns: the shard size syntax (`5GB`, `500MB`, bytes; decimal units as transformers uses), the shard layout and
index (transformers' `model.safetensors.index.json` format), atomic publication of a whole output folder (a
killed conversion leaves only a `.partial-` folder, never something under the final name), the tokenizer files
(a SentencePiece model that transformers' LlamaTokenizer loads), and the peak-memory report.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from megafusion.utils.files import fsync_dir, fsync_tree

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class HFFolderError(ValueError):
    """A Hugging Face folder that cannot be converted: the message names the file or tensor and the fix."""


def parse_size(text) -> int:
    """'5GB' / '500MB' / '64KiB' / '123' -> bytes (decimal units like transformers' max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {text!r}: use a number of bytes or e.g. 500MB, 5GB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return size


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PlannedTensor:
    name: str
    nbytes: int


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_size: int) -> List[List[PlannedTensor]]:
    """Greedy, in order: a shard closes before the tensor that would take it past max_shard_size (a tensor larger
    than the limit gets a shard of its own), as transformers' save_pretrained splits."""
    shards: List[List[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s] or [[]]


def shard_file_names(count: int) -> List[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(folder: Path, shards: List[List[PlannedTensor]], fetch: Callable[[str], torch.Tensor],
                 metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Write each shard from `fetch(name)` (tensors are materialised one shard at a time) and the index when there
    is more than one shard; returns the file names."""
    from safetensors.torch import save_file

    names = shard_file_names(len(shards))
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        tensors = {}
        for t in shard:
            tensors[t.name] = fetch(t.name).contiguous()
            weight_map[t.name] = file_name
            total += t.nbytes
        save_file(tensors, str(folder / file_name), metadata={"format": "pt", **(metadata or {})})
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


class Staging:
    """An output folder built under a temporary sibling name and renamed into place only when complete."""

    def __init__(self, out, overwrite: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"--out {self.out} already exists; choose a new folder or pass --overwrite")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def publish(self) -> Path:
        fsync_tree(self.path)
        if self.out.exists():  # --overwrite: the old folder goes only once the new one is complete
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        fsync_dir(self.out.parent)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class HFFolder:
    """A Hugging Face model folder opened for reading, tensor by tensor (safetensors memory maps its files)."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / CONFIG).is_file():
            raise HFFolderError(f"--hf {self.path}: no {CONFIG} (not a Hugging Face model folder, or a conversion "
                                f"that did not finish)")
        self.config = json.loads((self.path / CONFIG).read_text())
        self.weight_map = self._weight_map()

    def _weight_map(self) -> Dict[str, str]:
        from safetensors import safe_open

        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFFolderError(f"{index}: no weight_map; the index is damaged, convert the checkpoint again")
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise HFFolderError(f"{self.path}: shard file(s) {', '.join(missing)} listed in {INDEX_FILE} are "
                                    f"missing; copy the complete folder")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise HFFolderError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE}; the folder holds no weights")
        with safe_open(str(single), framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def check_names(self, expected: Iterable[str]) -> None:
        """Every expected tensor present and nothing else: otherwise one error listing both kinds."""
        expected = set(expected)
        have = set(self.weight_map)
        missing, unknown = sorted(expected - have), sorted(have - expected)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                             f"{' ...' if len(missing) > 20 else ''}")
            if unknown:
                parts.append(f"unknown tensors ({len(unknown)}): {', '.join(unknown[:20])}"
                             f"{' ...' if len(unknown) > 20 else ''}")
            raise HFFolderError(f"{self.path}: the weights do not match config.json's model: {'; '.join(parts)}")

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, in memory of its own: the file is mapped only while it is read, so the pages of tensors
        already converted do not stay resident (a 5 GB shard would otherwise count in full)."""
        from safetensors import safe_open

        file_name = self.weight_map.get(name)
        if file_name is None:
            raise HFFolderError(f"{self.path}: tensor {name} is not in the index; the folder is incomplete")
        with safe_open(str(self.path / file_name), framework="pt") as handle:
            return handle.get_tensor(name).clone()

    def tensors(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        return {n: self.tensor(n) for n in names}


def write_tokenizer(folder: Path, sentencepiece_model: Optional[str], special) -> bool:
    """Copy the SentencePiece model and write the files transformers' LlamaTokenizer loads it with (no BOS/EOS
    added on encode, as megafusion's TextTokenizer). Returns False (nothing written) when there is no tokenizer."""
    if not sentencepiece_model:
        return False
    from megafusion.preprocess.tokenization import PIECES, TextTokenizer

    TextTokenizer(sentencepiece_model, special)  # refuses a model whose special pieces sit at other ids
    shutil.copyfile(sentencepiece_model, folder / TOKENIZER_FILE)
    names = {f"{k}_token": PIECES[k] for k in ("pad", "bos", "eos", "unk")}
    extra = [PIECES[k] for k in ("boi", "eoi", "frame")]
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {**names, "additional_special_tokens": extra}, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": True,
        **names, "additional_special_tokens": extra,
        "megafusion_special_token_ids": {k: getattr(special, k) for k in PIECES},
    }, indent=2) + "\n")
    return True


def describe_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def shard_summary(names: List[str]) -> Tuple[str, int]:
    return (names[0] if len(names) == 1 else f"{len(names)} shards + {INDEX_FILE}"), len(names)
