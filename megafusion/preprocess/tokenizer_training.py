"""Train a SentencePiece model (bpe or unigram) on the text of the same inputs preprocessing reads, with the
special tokens of megafusion/data/special_tokens.py at exactly their ids: pad 0, bos 1, eos 2, unk 3 through
sentencepiece's *_id options, and <boi> <eoi> <frame> and the spare slots <reserved_7> .. <reserved_15> as control
symbols (never produced from text), which sentencepiece places next, in order. Writes <prefix>.model, <prefix>.vocab
and <prefix>.special_tokens.json, and checks the ids by loading the model back.
"""

from __future__ import annotations

import sys
from typing import Iterator, List, Optional

from megafusion.data.special_tokens import SPECIAL_TOKENS
from megafusion.preprocess.records import Columns, count_rows, iter_rows, parse_record, record_texts
from megafusion.preprocess.rejects import Rejected
from megafusion.preprocess.tokenization import PIECES, TextTokenizer, control_symbols

MODEL_TYPES = ("bpe", "unigram")


def iter_sentences(inputs: List[str], columns: Columns, kind_mode: str = "auto", skipped: Optional[dict] = None,
                   max_sentence_bytes: int = 4096) -> Iterator[str]:
    """Non-empty lines of every text part of every readable record, in input order (long lines are cut)."""
    for path in inputs:
        n, _ = count_rows(path)
        for raw in iter_rows(path, 0, n, columns):
            try:
                record = parse_record(raw, columns, kind_mode)
            except Rejected as exc:
                if skipped is not None:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                continue
            for text in record_texts(record):
                for line in text.splitlines():
                    line = line.strip()
                    while line:
                        piece = line.encode("utf-8")[:max_sentence_bytes].decode("utf-8", "ignore")
                        yield piece
                        line = line[len(piece):]


def train_tokenizer(inputs: List[str], model_prefix: str, vocab_size: int = 32000, model_type: str = "bpe",
                    columns: Columns = Columns(), kind_mode: str = "auto", character_coverage: float = 0.9995,
                    byte_fallback: bool = False, input_sentence_size: int = 0, num_threads: int = 1,
                    seed_sentencepiece_size: int = 1000000) -> str:
    """Train and return the path of <model_prefix>.model."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model-type {model_type!r} is not one of {list(MODEL_TYPES)}")
    s = SPECIAL_TOKENS
    if vocab_size <= s.num_reserved:
        raise ValueError(f"--vocab-size {vocab_size} must exceed the {s.num_reserved} reserved special ids")
    skipped: dict = {}
    sentences = iter_sentences(inputs, columns, kind_mode, skipped)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            pad_id=s.pad, bos_id=s.bos, eos_id=s.eos, unk_id=s.unk, pad_piece=PIECES["pad"],
            bos_piece=PIECES["bos"], eos_piece=PIECES["eos"], unk_piece=PIECES["unk"],
            control_symbols=control_symbols(s), character_coverage=character_coverage,
            byte_fallback=byte_fallback, input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads, seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2)
    except RuntimeError as exc:
        hint = " (lower --vocab-size or give more text)" if "Vocabulary size" in str(exc) else ""
        raise RuntimeError(f"sentencepiece training on {inputs} failed: {exc}{hint}") from exc
    if skipped:
        print(f"[train_tokenizer] records without usable text skipped: {skipped}", file=sys.stderr)
    model_path = model_prefix + ".model"
    TextTokenizer(model_path)  # raises if a special token is not at its id
    s.to_json(model_prefix + ".special_tokens.json")
    return model_path
