"""Preprocessing of the masked-diffusion family: records -> unified-vocabulary documents -> a dataset folder
(megafusion.discrete.dataset; docs/masked_diffusion_data.md). `tools/preprocess_data.py --family masked_diffusion`
is the command line.

Records are read exactly as the flow-matching family reads them (megafusion.preprocess.records: parquet / JSONL,
the same columns and kind inference), plus audio: an ``audio`` column (name: `audio_column`) holding WAV bytes
(parquet binary), a path (JSONL; relative to the input file's folder) or ``{"bytes", "path"}`` (bytes base64 in
JSONL). Each record becomes one document, laid out by UnifiedVocab.document:

    text                 -> <task:text>        BOS_t text EOS_t
    text + image         -> <task:image_text>  BOS_t caption EOS_t  BOS_i image codes EOS_i
    text + audio         -> <task:audio_text>  BOS_t transcript EOS_t  BOS_a audio codes EOS_a

A record's kind is the ``kind`` column when present (text, image_text, audio_text), else audio_text when the
audio column is set (and no image), else what records.parse_record infers. Text ids are the SentencePiece
model's (megafusion.preprocess.tokenization.TextTokenizer, no BOS/EOS of its own); images are decoded with
megafusion.preprocess.images.load_image and coded by the image tokenizer; WAVs by the audio tokenizer's
encode_wav (channels averaged, resampled to its rate).

Rejects follow megafusion.preprocess.rejects (the records module's reasons, plus the ones in EXTRA_REASONS):
every rejected record is one line of rejects.jsonl and counted by reason in the manifest; a run whose rejected
fraction exceeds `max_reject_fraction` fails and publishes nothing. A mixed document longer than
`max_mixed_length` is rejected (mixed_exceeds_max_length): the loader gives each mixed document its own row, so
it must fit data.seq_length. The run is one process; re-running the same command on a finished folder does nothing
(its manifest's fingerprint matches), a different command needs `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from megafusion.discrete.dataset import MANIFEST, DiscreteDatasetWriter, remove_dataset
from megafusion.discrete.vocab import AUDIO, DEFAULT_TASKS, IMAGE, TEXT, UnifiedVocab
from megafusion.preprocess.images import load_image
from megafusion.preprocess.records import (KIND_MODES, Columns, ImageRef, RawRow, count_rows,
                                           iter_rows, media_ref, parse_record)
from megafusion.preprocess.options import check_inputs
from megafusion.preprocess.rejects import REASONS, Rejected, reject_line
from megafusion.preprocess.runner import PreprocessError
from megafusion.preprocess.tokenization import TextTokenizer

EXTRA_REASONS = {
    "missing_audio_file": "an audio path that does not exist or cannot be read",
    "undecodable_audio": "audio bytes that are not a readable PCM WAV, or a WAV with no samples",
    "unsupported_kind": "a record kind the masked-diffusion family does not lay out (interleaved, video, or a "
                        "modality without its --image-tokenizer / --audio-tokenizer)",
    "mixed_exceeds_max_length": "an image-text or audio-text document longer than --max-mixed-length",
}
DISCRETE_REASONS = {**REASONS, **EXTRA_REASONS}
DISCRETE_KIND_MODES = KIND_MODES + ("audio_text",)
TASK_OF_KIND = {"text": "text", "image_text": "image_text", "audio_text": "audio_text"}


@dataclass(frozen=True)
class DiscreteColumns(Columns):
    """The record columns plus the audio column (records.iter_rows reads every column a Columns names)."""

    audio: str = "audio"


def discrete_columns(columns: Columns, audio_column: str = "audio") -> DiscreteColumns:
    fields = {k: v for k, v in columns.to_dict().items() if k != "audio"}
    return DiscreteColumns(**fields, audio=audio_column)


class DiscreteRejected(Rejected):
    """A Rejected whose reason may also be one of EXTRA_REASONS (megafusion.preprocess.rejects keeps the
    flow-matching family's closed list)."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in DISCRETE_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to EXTRA_REASONS")
        if reason in REASONS:
            super().__init__(reason, detail)
            return
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", detail)  # as Rejected does: reruns give the same lines
        Exception.__init__(self, f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def empty_reject_counts() -> Dict[str, int]:
    return {reason: 0 for reason in DISCRETE_REASONS}


def parse_tokenizer_spec(value: Union[None, str, dict], flag: str) -> Optional[dict]:
    """A tokenizer spec from the command line: inline JSON, or the path of a JSON file; None stays None."""
    if value is None or isinstance(value, dict):
        return value
    text = value
    if not value.lstrip().startswith("{") and os.path.isfile(value):
        with open(value) as f:
            text = f.read()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} {value!r}: not JSON nor a JSON file ({exc}); e.g. {flag} "
                         f"'{{\"name\": \"palette\", \"config\": {{\"resolution\": 32}}}}'") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{flag} {value!r}: must be a JSON object {{\"name\": ..., \"config\": {{...}}}}")
    return spec


@dataclass
class DiscretePreprocessOptions:
    inputs: List[str]
    """Parquet / JSONL files, read in this order."""
    output: str
    """Dataset folder."""
    tokenizer: str
    """SentencePiece .model (tools/train_tokenizer.py): the text ids."""
    image_tokenizer: Optional[Dict[str, Any]] = None
    """Spec {"name", "config"} of megafusion.encoders.discrete.build_discrete_tokenizer (an image one), or None."""
    audio_tokenizer: Optional[Dict[str, Any]] = None
    """Spec of the audio tokenizer, or None."""
    max_mixed_length: int = 1024
    """Longest image-text / audio-text document kept (positions); the training data.seq_length must be >= it."""
    min_image_size: int = 0
    """Images whose shorter side is below this are rejected (image_too_small)."""
    max_reject_fraction: float = 0.05
    """The run fails, publishing nothing, when rejected / records read exceeds this."""
    columns: Columns = field(default_factory=Columns)
    audio_column: str = "audio"
    kind: str = "auto"
    """auto, or the kind of every record: text, image_text, audio_text."""
    tasks: Tuple[str, ...] = DEFAULT_TASKS
    """Task tokens of the vocabulary (objective.masked_diffusion.tasks must list the same)."""
    overwrite: bool = False
    progress: bool = True
    command: Optional[str] = None

    def __post_init__(self):
        check_inputs(self.inputs)
        self.image_tokenizer = parse_tokenizer_spec(self.image_tokenizer, "--image-tokenizer")
        self.audio_tokenizer = parse_tokenizer_spec(self.audio_tokenizer, "--audio-tokenizer")
        if self.kind not in DISCRETE_KIND_MODES or self.kind in ("interleaved", "video"):
            raise ValueError(f"--kind {self.kind!r}: the masked-diffusion family reads auto, text, image_text or "
                             f"audio_text")
        if self.max_mixed_length < 8:
            raise ValueError(f"--max-mixed-length must be >= 8, got {self.max_mixed_length}")
        if self.min_image_size < 0:
            raise ValueError(f"--min-image-size must be >= 0, got {self.min_image_size}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"--max-reject-fraction {self.max_reject_fraction} must be in [0, 1]")
        self.tasks = tuple(self.tasks)
        self.columns = discrete_columns(self.columns, self.audio_column)

    def settings(self) -> Dict[str, Any]:
        return {"max_mixed_length": self.max_mixed_length, "min_image_size": self.min_image_size,
                "max_reject_fraction": self.max_reject_fraction, "kind": self.kind,
                "columns": self.columns.to_dict(), "tasks": list(self.tasks)}

    def fingerprint(self, tokenizer_sha256: str, image_spec, audio_spec) -> str:
        """Hash of everything that determines the bytes written (not the threshold or progress)."""
        inputs = []
        for path in self.inputs:
            st = os.stat(path)
            inputs.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        settings = self.settings()
        settings.pop("max_reject_fraction")
        blob = {"family": "masked_diffusion", "inputs": inputs, "tokenizer_sha256": tokenizer_sha256,
                "image_tokenizer": image_spec, "audio_tokenizer": audio_spec, "settings": settings}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class AudioRef:
    data: Optional[bytes] = None
    path: Optional[str] = None

    def describe(self) -> str:
        return self.path if self.path is not None else f"<{len(self.data)} bytes>"


@dataclass
class DiscreteRecord:
    source: str
    row: int
    task: str
    text: str
    media: Union[None, ImageRef, AudioRef] = None


def _audio_ref(value: Any, where: str, base: str) -> AudioRef:
    return media_ref(value, where, base, AudioRef, "audio", DiscreteRejected)


def parse_discrete_record(raw: RawRow, columns: Columns, audio_column: str = "audio",
                          kind_mode: str = "auto") -> DiscreteRecord:
    """RawRow -> DiscreteRecord, or raise Rejected (text and images through records.parse_record)."""
    if raw.error is not None:
        raise raw.error
    values = raw.values
    kind = kind_mode  # "auto" or the kind of every record
    if kind == "auto":
        column_kind = values.get(columns.kind)
        if column_kind == "audio_text":
            kind = "audio_text"
        elif column_kind in ("interleaved", "video"):
            raise DiscreteRejected("unsupported_kind", f"column {columns.kind!r}={column_kind!r}: the "
                                                       f"masked-diffusion family lays out text, image_text and "
                                                       f"audio_text documents")
        elif column_kind is None and values.get(audio_column) is not None:
            others = [c for c in (columns.image, columns.images, columns.frames) if values.get(c) is not None]
            if others:
                raise DiscreteRejected("wrong_type", f"columns {audio_column!r} and {others} are both set; a "
                                                     f"masked-diffusion document holds one image or one audio clip")
            kind = "audio_text"
    if kind == "audio_text":
        text_record = parse_record(RawRow(raw.source, raw.row, values), columns, "text")
        base = os.path.dirname(os.path.abspath(raw.source))
        value = values.get(audio_column)
        if value is None:
            raise DiscreteRejected("missing_column", f"column {audio_column!r} is absent or null")
        return DiscreteRecord(raw.source, raw.row, "audio_text", text_record.parts[0].text,
                              _audio_ref(value, audio_column, base))
    record = parse_record(raw, columns, kind)  # auto re-reads the kind column; unknown kinds are rejected there
    if record.kind not in TASK_OF_KIND:
        raise DiscreteRejected("unsupported_kind", f"record kind {record.kind!r}: the masked-diffusion family lays "
                                                   f"out text, image_text and audio_text documents")
    media = record.parts[1].image if record.kind == "image_text" else None
    return DiscreteRecord(raw.source, raw.row, TASK_OF_KIND[record.kind], record.parts[0].text, media)


# ---------------------------------------------------------------------------------------------------- documents
@dataclass
class DiscreteDocument:
    ids: np.ndarray  # unified ids (int64)
    task: str
    mixed: bool


class DiscreteDocumentBuilder:
    """One raw row -> DiscreteDocument, or raise Rejected."""

    def __init__(self, tokenizer: TextTokenizer, vocab: UnifiedVocab, image_tokenizer=None, audio_tokenizer=None,
                 columns: Columns = Columns(), audio_column: str = "audio", kind_mode: str = "auto",
                 max_mixed_length: int = 1024, min_image_size: int = 0):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.image_tokenizer, self.audio_tokenizer = image_tokenizer, audio_tokenizer
        self.columns, self.audio_column, self.kind_mode = columns, audio_column, kind_mode
        self.max_mixed_length, self.min_image_size = max_mixed_length, min_image_size

    def build(self, raw: RawRow) -> DiscreteDocument:
        record = parse_discrete_record(raw, self.columns, self.audio_column, self.kind_mode)
        if record.task not in self.vocab.tasks:
            raise DiscreteRejected("unsupported_kind", f"task {record.task!r} is not among the vocabulary's tasks "
                                                       f"{list(self.vocab.tasks)}")
        text = self.vocab.codes_to_ids(TEXT, self.tokenizer.encode(record.text))
        parts = [(TEXT, text)]
        if record.task == "image_text":
            parts.append((IMAGE, self.vocab.codes_to_ids(IMAGE, self._image_codes(record.media))))
        elif record.task == "audio_text":
            parts.append((AUDIO, self.vocab.codes_to_ids(AUDIO, self._audio_codes(record.media))))
        ids = self.vocab.document(record.task, parts)
        mixed = len(parts) > 1
        if mixed and len(ids) > self.max_mixed_length:
            raise DiscreteRejected(
                "mixed_exceeds_max_length",
                f"{record.task} document of {len(ids)} positions (task + {len(text)} text ids + "
                f"{len(parts[1][1])} codes + 4 BOS/EOS) exceeds --max-mixed-length {self.max_mixed_length}")
        return DiscreteDocument(ids, record.task, mixed)

    def _image_codes(self, ref: ImageRef) -> np.ndarray:
        if self.image_tokenizer is None:
            raise DiscreteRejected("unsupported_kind", "image_text record but no --image-tokenizer was given")
        image = load_image(ref, self.min_image_size)  # missing_image_file / undecodable_image / image_too_small
        return self.image_tokenizer.encode(image)

    def _audio_codes(self, ref: AudioRef) -> np.ndarray:
        if self.audio_tokenizer is None:
            raise DiscreteRejected("unsupported_kind", "audio_text record but no --audio-tokenizer was given")
        data = ref.data
        if data is None:
            try:
                with open(ref.path, "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as exc:
                raise DiscreteRejected("missing_audio_file", f"{ref.path}: {exc.strerror or exc}") from None
        try:
            codes = self.audio_tokenizer.encode_wav(data)
        except Exception as exc:  # read_wav raises ValueError; damaged headers may raise others
            raise DiscreteRejected("undecodable_audio", f"{ref.describe()}: {type(exc).__name__}: {exc}") from None
        if len(codes) == 0:
            raise DiscreteRejected("undecodable_audio", f"{ref.describe()}: the WAV holds no samples")
        return codes


# ---------------------------------------------------------------------------------------------------- the run
def _log(message: str) -> None:
    print(f"[preprocess] {message}", file=sys.stderr, flush=True)


def _tokenizer(spec, modality: str, flag: str):
    if spec is None:
        return None
    from megafusion.encoders.discrete import build_discrete_tokenizer

    tok = build_discrete_tokenizer(spec)
    if tok.modality != modality:
        raise ValueError(f"{flag} {json.dumps(spec)}: a {tok.modality} tokenizer, expected a {modality} one")
    return tok


def _describe_tokenizer(tok) -> Optional[dict]:
    if tok is None:
        return None
    out = {**tok.spec(), "modality": tok.modality, "codebook_size": int(tok.codebook_size)}
    for name in ("tokens_per_item", "sample_rate"):
        if hasattr(type(tok), name) or hasattr(tok, name):
            try:
                out[name] = int(getattr(tok, name))
            except (NotImplementedError, TypeError, AttributeError):
                pass
    return out


def _read_existing(output: str) -> Optional[dict]:
    path = os.path.join(output, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_discrete_preprocess(opts: DiscretePreprocessOptions) -> dict:
    """Preprocess `opts.inputs` into the dataset folder `opts.output`; returns the published manifest. A failed run
    leaves no dataset (and removes the folder when it created it)."""
    created = not os.path.exists(opts.output)
    try:
        return _run(opts)
    except BaseException:
        kept = [name for name in (MANIFEST, "rejects.jsonl") if os.path.isfile(os.path.join(opts.output, name))]
        if created and not kept:
            shutil.rmtree(opts.output, ignore_errors=True)
        raise


def _run(opts: DiscretePreprocessOptions) -> dict:
    tokenizer = TextTokenizer(opts.tokenizer)
    image_tok = _tokenizer(opts.image_tokenizer, "image", "--image-tokenizer")
    audio_tok = _tokenizer(opts.audio_tokenizer, "audio", "--audio-tokenizer")
    vocab = UnifiedVocab(tokenizer.vocab_size, image_tok.codebook_size if image_tok else 0,
                         audio_tok.codebook_size if audio_tok else 0, opts.tasks)
    fingerprint = opts.fingerprint(tokenizer.sha256, image_tok.spec() if image_tok else None,
                                   audio_tok.spec() if audio_tok else None)
    existing = _read_existing(opts.output)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint and existing.get("family") == "masked_diffusion":
            _log(f"{opts.output} is already complete (same inputs and settings); nothing to do")
            return existing
        if not opts.overwrite:
            raise PreprocessError(f"{opts.output} already holds a dataset made by a different command; pass "
                                  f"--overwrite to replace it or choose another --output")
    os.makedirs(opts.output, exist_ok=True)
    remove_dataset(opts.output)

    builder = DiscreteDocumentBuilder(tokenizer, vocab, image_tok, audio_tok, opts.columns, opts.audio_column,
                                      opts.kind, opts.max_mixed_length, opts.min_image_size)
    writer = DiscreteDatasetWriter(opts.output, vocab)
    keep_rejects = False
    try:
        counts, by_reason, inputs = _write_documents(opts, builder, writer)
        if counts["records_read"] == 0:
            raise PreprocessError(f"--input {opts.inputs}: no records to preprocess")
        fraction = counts["rejected"] / counts["records_read"]
        if fraction > opts.max_reject_fraction or counts["documents"] == 0:
            keep_rejects = True
            reasons = ", ".join(f"{k}={v}" for k, v in by_reason.items() if v)
            raise PreprocessError(
                f"{counts['rejected']} of {counts['records_read']} records rejected ({fraction:.1%}) exceeds "
                f"--max-reject-fraction {opts.max_reject_fraction} or leaves no document ({reasons}); see "
                f"{os.path.join(opts.output, 'rejects.jsonl')}. No dataset was published; fix the inputs or raise "
                f"the threshold")
        manifest = {
            "tokenizer": tokenizer.describe(),
            "image_tokenizer": _describe_tokenizer(image_tok),
            "audio_tokenizer": _describe_tokenizer(audio_tok),
            "codebook_sizes": {"image": vocab.image_codes, "audio": vocab.audio_codes},
            "counts": counts,
            "rejected_by_reason": by_reason,
            "inputs": inputs,
            "options": opts.settings(),
            "fingerprint": fingerprint,
            "command": opts.command or "megafusion.discrete.preprocess.run_discrete_preprocess",
        }
        manifest = writer.publish(manifest)
    except BaseException:
        writer.discard(keep_rejects=keep_rejects)
        raise
    _log(f"wrote {opts.output}: {counts['documents']} documents ({counts['documents_per_task']}), "
         f"{counts['tokens']} tokens; {counts['rejected']} of {counts['records_read']} records rejected")
    return manifest


def _write_documents(opts: DiscretePreprocessOptions, builder: DiscreteDocumentBuilder,
                     writer: DiscreteDatasetWriter) -> Tuple[dict, dict, list]:
    from tqdm import tqdm

    counts = {"records_read": 0, "rejected": 0, "documents": 0, "tokens": 0, "text_documents": 0,
              "mixed_documents": 0, "images": 0, "audio": 0, "image_codes": 0, "audio_codes": 0,
              "max_document_length": 0, "max_mixed_length": 0,
              "documents_per_task": {task: 0 for task in builder.vocab.tasks}}
    by_reason = empty_reject_counts()
    inputs = []
    sizes = [count_rows(path)[0] for path in opts.inputs]
    image0, audio0 = builder.vocab.content_range(IMAGE)[0], builder.vocab.content_range(AUDIO)[0]
    with tqdm(total=sum(sizes), unit="rec", desc="preprocess", disable=not opts.progress, dynamic_ncols=True) as bar:
        for path, n in zip(opts.inputs, sizes):
            inputs.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path), "records": n})
            for raw in iter_rows(path, 0, n, opts.columns):
                counts["records_read"] += 1
                bar.update(1)
                try:
                    doc = builder.build(raw)
                except Rejected as exc:
                    writer.reject(reject_line(raw.source, raw.row, exc))
                    counts["rejected"] += 1
                    by_reason[exc.reason] += 1
                    continue
                writer.add(doc.ids, doc.mixed, doc.task)
                n_ids = len(doc.ids)
                counts["documents"] += 1
                counts["tokens"] += n_ids
                counts["documents_per_task"][doc.task] += 1
                counts["max_document_length"] = max(counts["max_document_length"], n_ids)
                if doc.mixed:
                    counts["mixed_documents"] += 1
                    counts["max_mixed_length"] = max(counts["max_mixed_length"], n_ids)
                    is_image = doc.task == "image_text"
                    counts["images" if is_image else "audio"] += 1
                    lo = image0 if is_image else audio0
                    hi = lo + (builder.vocab.image_codes if is_image else builder.vocab.audio_codes)
                    counts["image_codes" if is_image else "audio_codes"] += int(((doc.ids >= lo) & (doc.ids < hi))
                                                                                .sum())
                else:
                    counts["text_documents"] += 1
    return counts, by_reason, inputs


__all__ = ["DiscretePreprocessOptions", "run_discrete_preprocess", "DiscreteDocumentBuilder",
           "parse_discrete_record", "DiscreteRejected", "EXTRA_REASONS", "DISCRETE_REASONS",
           "parse_tokenizer_spec"]
