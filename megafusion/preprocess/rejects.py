"""Rejected records: the reasons, the exception that carries one, and the rejects.jsonl lines.

A record that cannot become a document is never dropped silently: the code that finds the problem raises
``Rejected(reason, detail)``, the shard writer appends ``{"source", "row", "reason", "detail"}`` to its rejects
file and counts it by reason, and the manifest holds the totals.
"""

from __future__ import annotations

import json
import re
from typing import Dict

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

REASONS = {
    "invalid_json": "a JSONL line that is not a JSON object",
    "missing_column": "a column the record kind needs is absent or null",
    "wrong_type": "a column holds a value of the wrong type (or aligned lists of different lengths)",
    "unknown_kind": "the kind column names no known record kind",
    "empty_text": "text that is empty or only whitespace (a document with no content)",
    "invalid_utf8": "text that is not valid UTF-8",
    "missing_image_file": "an image path that does not exist or cannot be read",
    "undecodable_image": "image bytes that do not decode",
    "image_too_small": "an image whose shorter side is below --min-image-size",
    "image_exceeds_seq_length": "one image needs more positions than --seq-length (BOI + patches + EOI)",
    "nan_latent": "the encoder produced NaN or Inf",
}


class Rejected(Exception):
    """Raised while turning a record into a document; caught and logged by the shard writer."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; add it to megafusion.preprocess.rejects.REASONS")
        detail = _ADDRESS.sub("", detail)  # object addresses (PIL's messages) would make reruns differ
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def reject_line(source: str, row: int, rejected: Rejected) -> str:
    return json.dumps({"source": source, "row": row, "reason": rejected.reason, "detail": rejected.detail},
                      ensure_ascii=True, sort_keys=True) + "\n"


def empty_counts() -> Dict[str, int]:
    return {reason: 0 for reason in REASONS}
