"""Open and validate one preprocessed dataset folder (docs/DATA_FORMAT.md) and read its documents.

`MultimodalDataset(folder)` memory-maps `tokens.bin/.idx` and `latents.bin/.idx` with megatron-core's
IndexedDataset and checks them against `manifest.json` before anything is read:

  - every file is present and its byte size equals `manifest.files[name].bytes`; .idx files small enough to hash
    (< 64 MiB) are also checked against their sha256 (all files with `verify_checksums=True`)
  - each .idx parses (header, version, dtype code) and its arrays are consistent with its own length and with the
    size of the matching .bin (a truncated .bin or a damaged length table cannot pass)
  - tokens are int32 with exactly one sequence per document; latents are stored as `manifest.latent_storage`
    ("float32", or "float16-as-uint16" / "bfloat16-as-uint16": 2-byte bit patterns in a uint16 IndexedDataset,
    since megatron's DType has no 16-bit float code) and every latent sequence holds C*H*W values
  - both datasets hold `manifest.counts.documents` documents
  - every token id is below the tokenizer's vocabulary (`manifest.tokenizer.vocab_size`): the largest id is
    `manifest.files["tokens.bin"].max_id` (folders written before it was recorded are scanned once); the loader
    then checks the model's vocabulary against both (`max_token_id`, `tokenizer_vocab_size`)

Any failure raises `DatasetFormatError` naming the file and what is wrong. FRAME tokens are counted per document
when the document is first laid out (`frame_positions`): a document whose FRAME count differs from its number of
latent sequences raises `DatasetFormatError` naming the document.

Readers: `tokens(doc, start, end)` (int32 view), `frames_f32(doc, first, count)` ([count, C, H, W] float32, what
the packer uses) and `document(doc)` (tokens plus latents as a torch tensor in the stored dtype, bfloat16 viewed
back from its uint16 bits). The object pickles by path, so loader workers (under spawn) re-open the memory maps cheaply.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megafusion.data.special_tokens import SPECIAL_TOKENS
from megafusion.utils.files import file_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DATA_FILES = ("tokens.bin", "tokens.idx", "latents.bin", "latents.idx")
# latent_storage -> (numpy dtype of the IndexedDataset, dtype the bits mean)
LATENT_STORAGE = {
    "float32": (np.float32, torch.float32),
    "float16-as-uint16": (np.uint16, torch.float16),
    "float16": (np.uint16, torch.float16),  # the name docs/DATA_FORMAT.md lists; stored the same way
    "bfloat16-as-uint16": (np.uint16, torch.bfloat16),
}
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_PREAMBLE = 34  # header 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
_HASH_LIMIT = 64 << 20


def read_manifest_file(path: str, required, version: int, writer: str, family: str = "flow_matching") -> dict:
    """A dataset folder's manifest.json: present (else the folder is unfinished: `writer` makes it), a JSON object
    of the model `family` (its "family" field; flow-matching manifests have none) with the `required` keys and
    format_version `version`; DatasetFormatError naming the file otherwise."""
    if not os.path.isfile(path):
        raise DatasetFormatError(f"{path}: missing; a dataset folder is complete only once {writer} has written its "
                                 f"manifest (re-run preprocessing or point data.paths at a finished folder)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise DatasetFormatError(f"{path}: must hold a JSON object, got {type(m).__name__}")
    found = m.get("family", "flow_matching")
    if found != family:
        raise DatasetFormatError(f"{path}: a dataset of the {found} family, not {family}; train on it with "
                                 f"objective.kind={found}")
    for key in required:
        if key not in m:
            raise DatasetFormatError(f"{path}: manifest has no '{key}' field")
    if m["format_version"] != version:
        raise DatasetFormatError(f"{path}: format_version {m['format_version']}, this reader reads {version}")
    return m


class DatasetFormatError(ValueError):
    """A dataset folder does not match docs/DATA_FORMAT.md; the message names the file and the problem."""


@dataclass
class Document:
    tokens: np.ndarray  # [n_tokens] int32 token stream with one FRAME per latent
    latents: torch.Tensor  # [n_frames, C, H, W] in the stored latent dtype




def _read_idx_preamble(path: str) -> Tuple[int, int, int]:
    """(dtype code, sequence count, document count) of a megatron .idx file, or DatasetFormatError."""
    with open(path, "rb") as f:
        head = f.read(_IDX_PREAMBLE)
    if len(head) < _IDX_PREAMBLE:
        raise DatasetFormatError(f"{path}: .idx is {len(head)} bytes, shorter than its {_IDX_PREAMBLE}-byte header")
    if head[:9] != _IDX_HEADER:
        raise DatasetFormatError(f"{path}: bad .idx header {head[:9]!r}, expected megatron's {_IDX_HEADER!r}")
    version, code, nseq, ndoc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise DatasetFormatError(f"{path}: .idx version {version}, only version 1 is readable")
    return code, nseq, ndoc


class MultimodalDataset:
    """One validated dataset folder: documents of interleaved tokens and latent frames."""

    def __init__(self, folder: str, verify_checksums: bool = False, frame_token: int = SPECIAL_TOKENS.frame,
                 boi_token: int = SPECIAL_TOKENS.boi):
        self.folder = os.path.abspath(folder)
        self.frame_token = frame_token
        self.boi_token = boi_token
        self.manifest = self._load_manifest()
        self._validate_files(verify_checksums)
        self._open()
        self._frame_cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ validation
    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _load_manifest(self) -> dict:
        path = self._path(MANIFEST)
        m = read_manifest_file(path, ("format_version", "latent_shape", "latent_storage", "counts", "files"),
                               FORMAT_VERSION, "tools/preprocess_data.py")
        if m["latent_storage"] not in LATENT_STORAGE:
            raise DatasetFormatError(
                f"{path}: latent_storage={m['latent_storage']!r} is not one of {sorted(LATENT_STORAGE)}"
            )
        shape = m["latent_shape"]
        if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise DatasetFormatError(f"{path}: latent_shape={shape} must be three positive ints [C, H, W]")
        if "documents" not in m["counts"]:
            raise DatasetFormatError(f"{path}: manifest counts has no 'documents' entry")
        return m

    def _validate_files(self, verify_checksums: bool) -> None:
        files = self.manifest["files"]
        for name in DATA_FILES:
            path = self._path(name)
            if not os.path.isfile(path):
                raise DatasetFormatError(f"{path}: file missing from the dataset folder")
            if name not in files:
                raise DatasetFormatError(f"{self._path(MANIFEST)}: files has no entry for {name}")
            size, want = os.path.getsize(path), int(files[name]["bytes"])
            if size != want:
                what = "truncated" if size < want else "longer than recorded"
                raise DatasetFormatError(f"{path}: {size} bytes but the manifest records {want} ({what})")
            digest = files[name].get("sha256")
            if digest and (verify_checksums or (name.endswith(".idx") and size < _HASH_LIMIT)):
                if file_sha256(path) != digest:
                    raise DatasetFormatError(f"{path}: sha256 differs from the manifest (file corrupted)")
        self.latent_shape = tuple(int(v) for v in self.manifest["latent_shape"])
        storage_np, self.latent_dtype = LATENT_STORAGE[self.manifest["latent_storage"]]
        self._check_idx("tokens", np.int32, one_sequence_per_document=True)
        self._check_idx("latents", storage_np, one_sequence_per_document=False)
        self._check_token_range()

    def _check_token_range(self) -> None:
        tokens = self._path("tokens.bin")
        recorded = self.manifest["files"]["tokens.bin"].get("max_id")
        if recorded is not None:
            self.max_token_id = int(recorded)
        else:
            self.max_token_id = int(_flat_view(tokens, np.int32).max()) if os.path.getsize(tokens) else -1
        vocab = self.manifest.get("tokenizer", {}).get("vocab_size")
        self.tokenizer_vocab_size: Optional[int] = int(vocab) if vocab is not None else None
        if self.tokenizer_vocab_size is not None and self.max_token_id >= self.tokenizer_vocab_size:
            raise DatasetFormatError(
                f"{tokens}: holds token id {self.max_token_id}, outside the tokenizer's vocabulary of "
                f"{self.tokenizer_vocab_size} ({self._path(MANIFEST)} tokenizer.vocab_size): the tokens are corrupt "
                f"or were written with another tokenizer; re-run preprocessing")

    def _check_idx(self, stem: str, dtype, one_sequence_per_document: bool) -> None:
        idx, bin_ = self._path(stem + ".idx"), self._path(stem + ".bin")
        code, nseq, ndoc_plus_1 = _read_idx_preamble(idx)
        itemsize = np.dtype(dtype).itemsize
        from megatron.core.datasets.indexed_dataset import DType

        try:
            got = DType.dtype_from_code(code)
        except ValueError:
            raise DatasetFormatError(f"{idx}: unknown dtype code {code}") from None
        if got != dtype:
            raise DatasetFormatError(
                f"{idx}: stored dtype {got.__name__}, expected {np.dtype(dtype).name} for {stem} "
                f"(manifest latent_storage={self.manifest['latent_storage']!r})"
            )
        expect = _IDX_PREAMBLE + 12 * nseq + 8 * ndoc_plus_1
        size = os.path.getsize(idx)
        if size != expect:
            raise DatasetFormatError(
                f"{idx}: {size} bytes, but its header announces {nseq} sequences and {ndoc_plus_1 - 1} documents "
                f"({expect} bytes): the index is corrupt"
            )
        mm = np.memmap(idx, mode="r", dtype=np.uint8)
        lengths = np.frombuffer(mm, np.int32, nseq, _IDX_PREAMBLE)
        pointers = np.frombuffer(mm, np.int64, nseq, _IDX_PREAMBLE + 4 * nseq)
        docs = np.frombuffer(mm, np.int64, ndoc_plus_1, _IDX_PREAMBLE + 12 * nseq)
        if ndoc_plus_1 < 1 or docs[0] != 0 or docs[-1] != nseq or (np.diff(docs) < 0).any():
            raise DatasetFormatError(f"{idx}: document index is not a non-decreasing run from 0 to {nseq}")
        if (lengths < 0).any():
            raise DatasetFormatError(f"{idx}: negative sequence length at sequence {int(np.argmax(lengths < 0))}")
        ends = np.cumsum(lengths, dtype=np.int64) * itemsize
        starts = ends - lengths.astype(np.int64) * itemsize
        if nseq and not np.array_equal(pointers, starts):
            bad = int(np.argmax(pointers != starts))
            raise DatasetFormatError(
                f"{idx}: sequence {bad} points at byte {int(pointers[bad])}, expected {int(starts[bad])}: "
                f"the index is corrupt"
            )
        bin_size, want = os.path.getsize(bin_), int(ends[-1]) if nseq else 0
        if bin_size != want:
            raise DatasetFormatError(
                f"{bin_}: {bin_size} bytes but {idx} describes {want} bytes "
                f"({'truncated' if bin_size < want else 'trailing data'})"
            )
        ndoc, manifest_docs = ndoc_plus_1 - 1, int(self.manifest["counts"]["documents"])
        if ndoc != manifest_docs:
            raise DatasetFormatError(
                f"{idx}: {ndoc} documents but manifest counts.documents = {manifest_docs}"
            )
        if one_sequence_per_document and nseq != ndoc:
            raise DatasetFormatError(f"{idx}: {nseq} sequences for {ndoc} documents; tokens hold one per document")
        if not one_sequence_per_document:
            c, h, w = self.latent_shape
            bad = np.flatnonzero(lengths != c * h * w)
            if bad.size:
                raise DatasetFormatError(
                    f"{idx}: latent sequence {int(bad[0])} holds {int(lengths[bad[0]])} values, expected "
                    f"C*H*W = {c * h * w} for latent_shape {list(self.latent_shape)}"
                )
        del mm

    # ------------------------------------------------------------------ reading
    def _open(self) -> None:
        try:
            # an empty .bin (e.g. no latents in a text-only folder) cannot be memory-mapped; it is never read
            self._tokens = IndexedDataset(self._path("tokens"), mmap=os.path.getsize(self._path("tokens.bin")) > 0)
            self._latents = IndexedDataset(self._path("latents"), mmap=os.path.getsize(self._path("latents.bin")) > 0)
        except (AssertionError, ValueError, OSError) as e:  # already validated; kept as a named error anyway
            raise DatasetFormatError(f"{self.folder}: megatron IndexedDataset refused to open: {e}") from e
        self.token_lengths = self._tokens.sequence_lengths.astype(np.int64)  # [D]
        self._latent_docs = self._latents.document_indices  # [D + 1] latent sequence range per document
        self.frame_counts = np.diff(self._latent_docs).astype(np.int64)  # [D]
        self._lat_np_dtype = self._latents.index.dtype
        self._tok_ptr = self._tokens.index.sequence_pointers  # [D] byte offset of each document's tokens
        self._lat_ptr = self._latents.index.sequence_pointers  # [frames] byte offset of each latent
        self._frame_numel = int(np.prod(self.latent_shape))
        # whole-file flat views: a read is then one slice (megatron's read() costs a frombuffer call each)
        self._tok_flat = _flat_view(self._path("tokens.bin"), np.int32)
        self._lat_flat = _flat_view(self._path("latents.bin"), self._lat_np_dtype)
        self._tok_start = (self._tok_ptr // 4).astype(np.int64)  # [D] first token of each document
        self._lat_start = (self._lat_ptr // np.dtype(self._lat_np_dtype).itemsize).astype(np.int64)
        self._frame_shape = tuple(self.latent_shape)

    def __getstate__(self):
        return {"folder": self.folder, "manifest": self.manifest, "frame_token": self.frame_token,
                "boi_token": self.boi_token}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.latent_shape = tuple(int(v) for v in self.manifest["latent_shape"])
        self.latent_dtype = LATENT_STORAGE[self.manifest["latent_storage"]][1]
        self._open()
        self._frame_cache = {}

    def __len__(self) -> int:
        return len(self.token_lengths)

    def positions(self, patches_per_frame: int) -> np.ndarray:
        """[D] int64: sequence positions of each document once every FRAME is expanded to its patches."""
        return self.token_lengths + self.frame_counts * (patches_per_frame - 1)

    def tokens(self, doc: int, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        """[end - start] int32 slice of document `doc`'s token stream (a read-only view of the memory map)."""
        base = int(self._tok_start[doc])
        end = int(self.token_lengths[doc]) if end is None else end
        return self._tok_flat[base + start: base + end]

    def frames_raw(self, doc: int, first: int, count: int) -> np.ndarray:
        """[count, C, H, W] stored values (float32 or uint16 bit patterns) of frames first.. of `doc` (a view)."""
        if first < 0 or first + count > self.frame_counts[doc]:
            raise IndexError(f"{self.folder}: document {doc} has {int(self.frame_counts[doc])} frames, "
                             f"asked for frames {first}..{first + count - 1}")
        if count == 0:
            return np.zeros((0,) + self.latent_shape, self._lat_np_dtype)
        a = int(self._lat_start[int(self._latent_docs[doc]) + first])
        return self._lat_flat[a: a + count * self._frame_numel].reshape((count,) + self._frame_shape)

    def frames_f32(self, doc: int, first: int, count: int) -> np.ndarray:
        """[count, C, H, W] float32 latents (a new array); 16-bit storage is widened exactly."""
        return to_float32(self.frames_raw(doc, first, count), self.latent_dtype)

    def document(self, doc: int) -> Document:
        """Document `doc`: its token stream and its latents [n_frames, C, H, W] in the stored dtype."""
        self.frame_positions(doc)  # validates the FRAME count
        raw = np.array(self.frames_raw(doc, 0, int(self.frame_counts[doc])))
        if self.latent_dtype == torch.float32:
            latents = torch.from_numpy(raw)
        else:
            latents = torch.from_numpy(raw.view(np.int16)).view(self.latent_dtype)
        return Document(tokens=np.array(self.tokens(doc)), latents=latents)

    def frame_positions(self, doc: int) -> Tuple[List[int], List[bool]]:
        """(positions of FRAME tokens in `doc`, whether each is directly preceded by BOI) as Python lists (the
        planner walks them one by one); checks the count against latents.idx."""
        hit = self._frame_cache.get(doc)
        if hit is not None:
            return hit
        a = int(self._tok_start[doc])
        toks = self._tok_flat[a: a + int(self.token_lengths[doc])]
        pos = (toks == self.frame_token).nonzero()[0]
        if len(pos) != self.frame_counts[doc]:
            raise DatasetFormatError(
                f"{self.folder}: document {doc} has {len(pos)} FRAME tokens but {int(self.frame_counts[doc])} "
                f"latent sequences in latents.idx; the token stream and the latents disagree"
            )
        boi = (toks[pos - 1] == self.boi_token).tolist()  # pos - 1 = -1 (a FRAME first) is fixed below
        pos = pos.tolist()
        if pos and pos[0] == 0:
            boi[0] = False
        if len(self._frame_cache) > 65536:
            self._frame_cache.clear()
        self._frame_cache[doc] = (pos, boi)
        return pos, boi


def _flat_view(path: str, dtype) -> np.ndarray:
    """The whole file as a read-only 1-D array (memory-mapped; empty files give an empty array)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype)


def to_float32(raw: np.ndarray, stored: torch.dtype) -> np.ndarray:
    """Widen stored latent values to float32: bfloat16 bits shift into the high half of a float32 (exact)."""
    if stored == torch.float32:
        return np.array(raw, dtype=np.float32)
    if stored == torch.bfloat16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16).astype(np.float32)
