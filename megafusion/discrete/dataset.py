"""The on-disk dataset of the masked-diffusion family: writer and validating reader (docs/masked_diffusion_data.md).

A folder holds

    tokens.bin       int32 unified ids (megafusion.discrete.vocab), every document's stream end to end
    index.npy        int64 [D + 1] document offsets into tokens.bin, in tokens (document d = [index[d], index[d+1]))
    documents.npy    uint8 [D, 2] per document: column 0 mixed (1: has image or audio codes, 0: text only),
                     column 1 the task (an index into the vocabulary's tasks)
    rejects.jsonl    one line per rejected record (megafusion.preprocess.rejects.reject_line)
    manifest.json    format version, family, vocabulary, tokenizers, counts, rejects, files (bytes, sha256)

`DiscreteDatasetWriter` writes every file under a temp name (``*.partial``), fsyncs and renames them, and writes
manifest.json last (megafusion.preprocess.publish.write_manifest: temp name, fsync, rename), so a folder without a
manifest is never complete and a killed run never leaves one that looks complete.

`DiscreteDataset(folder)` refuses, with a `DatasetFormatError` naming the file and the problem, a folder whose
manifest is missing, unparseable, of another family or format version; a file missing or whose size differs from
the manifest (small metadata files are also checked against their sha256); an index that is not a non-decreasing
run from 0 to the token count, or whose length is not documents + 1; flags that are not 0/1 or tasks outside the
vocabulary; ids outside the unified vocabulary (the manifest's min_id / max_id, and a scan of tokens.bin when it is
small or `verify=True`). Metadata (lengths, mixed flags, tasks) is in memory; tokens are memory-mapped. The object
pickles by folder, so a worker process re-opens the maps cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

import numpy as np

from megafusion.data.indexed import DatasetFormatError, read_manifest_file
from megafusion.discrete.vocab import UnifiedVocab
from megafusion.preprocess.publish import write_manifest
from megafusion.utils.files import file_sha256, fsync_file, publish_file

FAMILY = "masked_diffusion"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS, INDEX, DOCUMENTS, REJECTS = "tokens.bin", "index.npy", "documents.npy", "rejects.jsonl"
DATA_FILES = (TOKENS, INDEX, DOCUMENTS, REJECTS)
DOCUMENT_COLUMNS = ("mixed", "task")
_HASH_LIMIT = 64 << 20  # files below this size are checked against their sha256 at every open
_SCAN_LIMIT = 256 << 20  # tokens.bin below this size is scanned for out-of-vocabulary ids at every open

__all__ = ["DiscreteDataset", "DiscreteDatasetWriter", "DatasetFormatError", "FAMILY", "FORMAT_VERSION",
           "remove_dataset"]


def remove_dataset(folder: str) -> None:
    """Remove a published dataset from `folder` (manifest first, so it stops looking complete at once)."""
    for name in (MANIFEST,) + DATA_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)


class DiscreteDatasetWriter:
    """Appends documents and rejects to temp files; `publish(manifest)` makes the folder a dataset, `discard()`
    removes the temp files."""

    def __init__(self, folder: str, vocab: UnifiedVocab):
        self.folder, self.vocab = folder, vocab
        os.makedirs(folder, exist_ok=True)
        self._tokens = open(self._partial(TOKENS), "wb")
        self._rejects = open(self._partial(REJECTS), "w", encoding="ascii")
        self._digest = hashlib.sha256()
        self._offsets = [0]
        self._flags = []
        self.min_id, self.max_id = None, None

    def _partial(self, name: str) -> str:
        return os.path.join(self.folder, name + ".partial")

    def add(self, ids, mixed: bool, task: str) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("a discrete document is a non-empty 1-d id array")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab.size:
            raise ValueError(f"document {len(self._flags)}: ids [{lo}, {hi}] outside the unified vocabulary "
                             f"[0, {self.vocab.size})")
        data = ids.astype(np.int32).tobytes()
        self._tokens.write(data)
        self._digest.update(data)
        self._offsets.append(self._offsets[-1] + int(ids.size))
        self._flags.append((1 if mixed else 0, self.vocab.tasks.index(task)))
        self.min_id = lo if self.min_id is None else min(self.min_id, lo)
        self.max_id = hi if self.max_id is None else max(self.max_id, hi)

    def reject(self, line: str) -> None:
        self._rejects.write(line)

    @property
    def documents(self) -> int:
        return len(self._flags)

    def publish(self, manifest: dict) -> dict:
        """Write the metadata files, publish every file, then manifest.json (with `files` and `format_version`,
        `family`, `vocabulary` and `document_columns` added). Returns the manifest."""
        self._tokens.close()
        self._rejects.close()
        flags = np.asarray(self._flags, dtype=np.uint8).reshape(-1, len(DOCUMENT_COLUMNS))
        for name, array in ((INDEX, np.asarray(self._offsets, dtype=np.int64)), (DOCUMENTS, flags)):
            with open(self._partial(name), "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, array, allow_pickle=False)
        for name in DATA_FILES:
            fsync_file(self._partial(name))
        files: Dict[str, dict] = {}
        for name in DATA_FILES:  # tokens first, the small files after it, the manifest last
            path = os.path.join(self.folder, name)
            publish_file(self._partial(name), path)
            digest = self._digest.hexdigest() if name == TOKENS else file_sha256(path)
            files[name] = {"bytes": os.path.getsize(path), "sha256": digest}
        files[TOKENS]["min_id"] = -1 if self.min_id is None else self.min_id
        files[TOKENS]["max_id"] = -1 if self.max_id is None else self.max_id
        manifest = dict(manifest, format_version=FORMAT_VERSION, family=FAMILY, vocabulary=self.vocab.to_dict(),
                        document_columns=list(DOCUMENT_COLUMNS), files=files)
        write_manifest(self.folder, manifest)
        return manifest

    def discard(self, keep_rejects: bool = False) -> None:
        """Remove the temp files (a failed run); `keep_rejects` publishes rejects.jsonl first, so a run refused for
        too many rejects leaves the reasons to read (and no manifest: the folder is not a dataset)."""
        for f in (self._tokens, self._rejects):
            if not f.closed:
                f.close()
        if keep_rejects and os.path.exists(self._partial(REJECTS)):
            publish_file(self._partial(REJECTS), os.path.join(self.folder, REJECTS))
        for name in DATA_FILES:
            if os.path.exists(self._partial(name)):
                os.remove(self._partial(name))


class DiscreteDataset:
    """One validated masked-diffusion dataset folder."""

    def __init__(self, folder: str, verify: bool = False):
        self.folder = os.path.abspath(folder)
        self.manifest = self._load_manifest()
        self.vocab = UnifiedVocab.from_dict(self.manifest["vocabulary"], where=f"{self._path(MANIFEST)} vocabulary")
        self._check_files(verify)
        self._load_metadata()
        self._check_ids(verify)
        self._tokens = None

    # ------------------------------------------------------------------ validation
    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _load_manifest(self) -> dict:
        path = self._path(MANIFEST)
        m = read_manifest_file(path, ("format_version", "vocabulary", "counts", "files"), FORMAT_VERSION,
                               "tools/preprocess_data.py --family masked_diffusion", family=FAMILY)
        if not isinstance(m["counts"], dict) or "documents" not in m["counts"]:
            raise DatasetFormatError(f"{path}: manifest counts has no 'documents' entry")
        return m

    def _check_files(self, verify: bool) -> None:
        files = self.manifest["files"]
        for name in DATA_FILES:
            path = self._path(name)
            if name not in files or "bytes" not in files[name]:
                raise DatasetFormatError(f"{self._path(MANIFEST)}: files has no entry (bytes) for {name}")
            if not os.path.isfile(path):
                raise DatasetFormatError(f"{path}: file missing from the dataset folder")
            size, want = os.path.getsize(path), int(files[name]["bytes"])
            if size != want:
                what = "truncated" if size < want else "longer than recorded"
                raise DatasetFormatError(f"{path}: {size} bytes but the manifest records {want} ({what})")
            digest = files[name].get("sha256")
            if digest and (verify or (name != TOKENS and size < _HASH_LIMIT)):
                if file_sha256(path) != digest:
                    raise DatasetFormatError(f"{path}: sha256 differs from the manifest (file corrupted)")

    def _load_npy(self, name: str, dtype, ndim: int) -> np.ndarray:
        path = self._path(name)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # np.load raises ValueError / OSError / EOFError on damaged headers
            raise DatasetFormatError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
        if array.dtype != np.dtype(dtype) or array.ndim != ndim:
            raise DatasetFormatError(f"{path}: {array.dtype} array of {array.ndim} dimensions, expected "
                                     f"{np.dtype(dtype).name} with {ndim}")
        return np.array(array)

    def _load_metadata(self) -> None:
        n_docs = int(self.manifest["counts"]["documents"])
        index = self._load_npy(INDEX, np.int64, 1)
        tokens_path, index_path = self._path(TOKENS), self._path(INDEX)
        if len(index) != n_docs + 1:
            raise DatasetFormatError(f"{index_path}: {len(index)} offsets but the manifest counts {n_docs} documents "
                                     f"(expected {n_docs + 1})")
        if index[0] != 0 or (np.diff(index) <= 0).any():
            bad = int(np.argmax(np.diff(index) <= 0)) if len(index) > 1 and index[0] == 0 else 0
            raise DatasetFormatError(f"{index_path}: offsets must start at 0 and increase (document {bad} is empty "
                                     f"or out of order): the index is corrupt")
        n_tokens = os.path.getsize(tokens_path) // 4
        if os.path.getsize(tokens_path) % 4 or int(index[-1]) != n_tokens:
            raise DatasetFormatError(f"{tokens_path}: {os.path.getsize(tokens_path)} bytes but {index_path} ends at "
                                     f"token {int(index[-1])} ({4 * int(index[-1])} bytes of int32)")
        docs = self._load_npy(DOCUMENTS, np.uint8, 2)
        docs_path = self._path(DOCUMENTS)
        if docs.shape != (n_docs, len(DOCUMENT_COLUMNS)):
            raise DatasetFormatError(f"{docs_path}: shape {list(docs.shape)}, expected [{n_docs}, "
                                     f"{len(DOCUMENT_COLUMNS)}] ({', '.join(DOCUMENT_COLUMNS)} per document)")
        if (docs[:, 0] > 1).any():
            raise DatasetFormatError(f"{docs_path}: mixed flag of document {int(np.argmax(docs[:, 0] > 1))} is not "
                                     f"0 or 1")
        if (docs[:, 1] >= len(self.vocab.tasks)).any():
            d = int(np.argmax(docs[:, 1] >= len(self.vocab.tasks)))
            raise DatasetFormatError(f"{docs_path}: task {int(docs[d, 1])} of document {d} is outside the "
                                     f"vocabulary's tasks {list(self.vocab.tasks)}")
        self.offsets = index
        self.lengths = np.diff(index)
        self.mixed = docs[:, 0].astype(bool)
        self.task = docs[:, 1].astype(np.int64)

    def _check_ids(self, verify: bool) -> None:
        entry, tokens = self.manifest["files"][TOKENS], self._path(TOKENS)
        size = self.vocab.size
        lo, hi = entry.get("min_id"), entry.get("max_id")
        if lo is not None and hi is not None and len(self) and (int(lo) < 0 or int(hi) >= size):
            raise DatasetFormatError(f"{tokens}: ids [{lo}, {hi}] (manifest min_id / max_id) lie outside the unified "
                                     f"vocabulary [0, {size}) of {self._path(MANIFEST)}")
        if len(self) and (verify or os.path.getsize(tokens) < _SCAN_LIMIT or lo is None or hi is None):
            ids = np.memmap(tokens, dtype=np.int32, mode="r")
            bad = np.flatnonzero((ids < 0) | (ids >= size))
            if bad.size:
                raise DatasetFormatError(f"{tokens}: id {int(ids[bad[0]])} at token {int(bad[0])} (byte "
                                         f"{4 * int(bad[0])}) lies outside the unified vocabulary [0, {size}): the "
                                         f"tokens are corrupt or were written with another vocabulary")

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tokens_total(self) -> int:
        return int(self.offsets[-1])

    def tokens(self, doc: int, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        """Ids [start, end) of document `doc` (an int32 view of the memory map)."""
        if self._tokens is None:
            self._tokens = np.memmap(self._path(TOKENS), dtype=np.int32, mode="r")
        base, length = int(self.offsets[doc]), int(self.lengths[doc])
        end = length if end is None else end
        if not 0 <= start < end <= length:
            raise IndexError(f"{self.folder}: tokens [{start}, {end}) of document {doc} (length {length})")
        return self._tokens[base + start:base + end]

    def document(self, doc: int) -> np.ndarray:
        return np.asarray(self.tokens(doc), dtype=np.int64)

    def task_name(self, doc: int) -> str:
        return self.vocab.tasks[int(self.task[doc])]

    def __getstate__(self):
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])
