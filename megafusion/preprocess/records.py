"""Reading raw corpora: parquet (streamed record batches, never the whole file) and JSONL, into typed records.

A record is one source row and becomes one document. Kinds and the columns they read (names configurable with
`Columns`):

- ``text``:         ``text`` (string, or UTF-8 bytes)
- ``image_text``:   ``text`` (the caption, placed before the image) and ``image``
- ``interleaved``:  ``texts`` and ``images``, two aligned lists (the OBELICS layout): position i holds a text
                    or an image, the other list holds null there; order is document order
- ``video``:        ``text`` (the caption, placed before the frames) and ``frames``, a list of images in time order

The kind is the value of the ``kind`` column when the input has one, else inferred per row from which of
frames / images / image / text is non-null (in that priority), or fixed for all rows with ``kind_mode``.

An image value is encoded bytes, a path (relative paths are relative to the input file's folder), or a struct /
object ``{"bytes": ..., "path": ...}`` (the Hugging Face datasets Image layout; in JSONL "bytes" is base64).
Problems found here raise `Rejected` with the reason (see megafusion.preprocess.rejects); images are only
referenced, not read, so decoding errors surface later in megafusion.preprocess.documents.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, List, Optional, Tuple, Union

from megafusion.preprocess.rejects import Rejected

KINDS = ("text", "image_text", "interleaved", "video")
KIND_MODES = ("auto",) + KINDS
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class Columns:
    kind: str = "kind"
    text: str = "text"
    image: str = "image"
    texts: str = "texts"
    images: str = "images"
    frames: str = "frames"

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class ImageRef:
    data: Optional[bytes] = None  # encoded image bytes
    path: Optional[str] = None  # absolute path (resolved against the input's folder)

    def describe(self) -> str:
        return self.path if self.path is not None else f"<{len(self.data)} bytes>"


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    image: ImageRef


@dataclass
class VideoPart:
    frames: List[ImageRef]


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass
class Record:
    source: str
    row: int
    kind: str
    parts: List[Part]


@dataclass
class RawRow:
    """One source row before parsing: the values by column, or the reason it could not even be read."""

    source: str
    row: int
    values: Optional[dict]
    error: Optional[Rejected] = None


# ---------------------------------------------------------------------------------------------------- inputs
def input_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise ValueError(f"input {path}: unknown format; use a file ending in {PARQUET_SUFFIXES + JSONL_SUFFIXES}")


def count_rows(path: str, boundary_every: int = 0, first_global_row: int = 0) -> Tuple[int, dict]:
    """Rows of an input, and for JSONL the byte offset of each local row whose global index is a multiple of
    `boundary_every` (shard starts), so a worker can seek instead of scanning from the top."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows, {}
    offsets, rows, pos = {}, 0, 0
    with open(path, "rb") as f:
        for line in f:
            if boundary_every and (first_global_row + rows) % boundary_every == 0:
                offsets[rows] = pos
            pos += len(line)
            rows += 1
    return rows, offsets


def iter_rows(path: str, start: int, stop: int, columns: Columns, byte_offset: Optional[int] = None,
              batch_rows: int = 256) -> Iterator[RawRow]:
    """Rows [start, stop) of one input, in order."""
    if input_format(path) == "parquet":
        yield from _iter_parquet(path, start, stop, columns, batch_rows)
    else:
        yield from _iter_jsonl(path, start, stop, byte_offset)


def _iter_parquet(path: str, start: int, stop: int, columns: Columns, batch_rows: int) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    wanted = [c for c in dict.fromkeys(asdict(columns).values()) if c in names]
    groups, first = [], None
    row0 = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row0 < stop and row0 + n > start:
            groups.append(g)
            first = row0 if first is None else first
        row0 += n
    if not groups:
        return
    row = first
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=wanted):
        n = batch.num_rows
        lo, hi = max(start - row, 0), min(stop - row, n)
        if hi > lo:
            for i, values in enumerate(batch.slice(lo, hi - lo).to_pylist()):
                yield RawRow(path, row + lo + i, values)
        row += n
        if row >= stop:
            return


def _iter_jsonl(path: str, start: int, stop: int, byte_offset: Optional[int]) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        row = 0
        if byte_offset is not None:
            f.seek(byte_offset)
            row = start
        for line in f:
            if row >= stop:
                return
            if row >= start:
                yield _parse_json_line(path, row, line)
            row += 1


def _parse_json_line(path: str, row: int, line: bytes) -> RawRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(path, row, None, Rejected("invalid_utf8", f"line is not UTF-8 ({exc.reason} at byte "
                                                                f"{exc.start})"))
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(path, row, None, Rejected("invalid_json", f"{exc.msg} at column {exc.colno}"))
    if not isinstance(values, dict):
        return RawRow(path, row, None, Rejected("invalid_json", f"a line must hold an object, got "
                                                                f"{type(values).__name__}"))
    return RawRow(path, row, values)


# ---------------------------------------------------------------------------------------------------- parsing
def parse_record(raw: RawRow, columns: Columns, kind_mode: str = "auto") -> Record:
    """RawRow -> Record, or raise Rejected."""
    if raw.error is not None:
        raise raw.error
    values, base = raw.values, os.path.dirname(os.path.abspath(raw.source))
    kind = _kind(values, columns, kind_mode)
    if kind == "text":
        parts: List[Part] = [TextPart(_text(values, columns.text))]
    elif kind == "image_text":
        parts = [TextPart(_text(values, columns.text)), ImagePart(_image(_get(values, columns.image), columns.image,
                                                                         base))]
    elif kind == "video":
        frames = _get(values, columns.frames)
        if not isinstance(frames, (list, tuple)):
            raise Rejected("wrong_type", f"column {columns.frames!r} must be a list of images, got "
                                         f"{type(frames).__name__}")
        if not frames:
            raise Rejected("missing_column", f"column {columns.frames!r} holds no frames")
        refs = [_image(f, f"{columns.frames}[{i}]", base) for i, f in enumerate(frames)]
        parts = [TextPart(_text(values, columns.text)), VideoPart(refs)]
    else:
        parts = _interleaved(values, columns, base)
    return Record(raw.source, raw.row, kind, parts)


def _get(values: dict, column: str) -> Any:
    value = values.get(column)
    if value is None:
        raise Rejected("missing_column", f"column {column!r} is absent or null")
    return value


def _kind(values: dict, columns: Columns, kind_mode: str) -> str:
    if kind_mode != "auto":
        return kind_mode
    kind = values.get(columns.kind)
    if kind is not None:
        if not isinstance(kind, str):
            raise Rejected("wrong_type", f"column {columns.kind!r} must be a string, got {type(kind).__name__}")
        if kind not in KINDS:
            raise Rejected("unknown_kind", f"column {columns.kind!r}={kind!r} is not one of {list(KINDS)}")
        return kind
    for column, kind in ((columns.frames, "video"), (columns.images, "interleaved"), (columns.texts, "interleaved"),
                         (columns.image, "image_text"), (columns.text, "text")):
        if values.get(column) is not None:
            return kind
    names = [columns.text, columns.image, columns.texts, columns.images, columns.frames]
    raise Rejected("missing_column", f"none of the columns {names} holds a value")


def _decode_text(value: Any, where: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("invalid_utf8", f"{where}: {exc.reason} at byte {exc.start}") from None
    elif not isinstance(value, str):
        raise Rejected("wrong_type", f"{where} must be a string, got {type(value).__name__}")
    else:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes
            raise Rejected("invalid_utf8", f"{where}: {exc.reason} at character {exc.start}") from None
    return value


def _text(values: dict, column: str) -> str:
    text = _decode_text(_get(values, column), f"column {column!r}")
    if not text.strip():
        raise Rejected("empty_text", f"column {column!r} is empty")
    return text


def _image(value: Any, where: str, base: str) -> ImageRef:
    return media_ref(value, where, base, ImageRef, "image")


def media_ref(value: Any, where: str, base: str, ref_cls, kind: str, rejected=Rejected):
    """A media column's value (bytes, a path relative to `base`, or {bytes | path}; base64 bytes in JSONL) ->
    ref_cls(data=...) or ref_cls(path=...); problems raise `rejected` with reasons undecodable_<kind>,
    missing_<kind>_file, missing_column or wrong_type."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            if isinstance(data, str):  # JSONL: base64
                try:
                    data = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise rejected(f"undecodable_{kind}", f"{where}.bytes is not base64: {exc}") from None
            value = data
        elif path is not None:
            value = path
        else:
            raise rejected("missing_column", f"{where} has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return ref_cls(data=bytes(value))
    if isinstance(value, str):
        if not value:
            raise rejected(f"missing_{kind}_file", f"{where} is an empty path")
        return ref_cls(path=os.path.normpath(os.path.join(base, value)))
    raise rejected("wrong_type", f"{where} must be {kind} bytes, a path or {{bytes, path}}, got {type(value).__name__}")


def _interleaved(values: dict, columns: Columns, base: str) -> List[Part]:
    texts, images = values.get(columns.texts), values.get(columns.images)
    if texts is None and images is None:
        raise Rejected("missing_column", f"columns {columns.texts!r} and {columns.images!r} are absent or null")
    n = len(texts) if isinstance(texts, (list, tuple)) else len(images) if isinstance(images, (list, tuple)) else 0
    texts = [None] * n if texts is None else texts
    images = [None] * n if images is None else images
    for column, value in ((columns.texts, texts), (columns.images, images)):
        if not isinstance(value, (list, tuple)):
            raise Rejected("wrong_type", f"column {column!r} must be a list, got {type(value).__name__}")
    if len(texts) != len(images):
        raise Rejected("wrong_type", f"columns {columns.texts!r} ({len(texts)} items) and {columns.images!r} "
                                     f"({len(images)} items) must be aligned lists of equal length")
    parts: List[Part] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if text is not None and image is not None:
            raise Rejected("wrong_type", f"position {i} holds both a text and an image")
        if text is not None:
            text = _decode_text(text, f"{columns.texts}[{i}]")
            if text.strip():
                parts.append(TextPart(text))
        elif image is not None:
            parts.append(ImagePart(_image(image, f"{columns.images}[{i}]", base)))
    if not parts:
        raise Rejected("empty_text", f"interleaved document with no text and no image in {columns.texts!r} / "
                                     f"{columns.images!r}")
    return parts


def record_texts(record: Record) -> List[str]:
    """The text parts of a record, in order (the tokenizer trainer's view of a record)."""
    return [p.text for p in record.parts if isinstance(p, TextPart)]
