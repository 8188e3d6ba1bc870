"""tools/train_tokenizer.py: special tokens at the reserved ids, control pieces never produced from text."""

import json
import os

import pytest

from megafusion.data.special_tokens import SPECIAL_TOKENS, SpecialTokens


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_special_ids_match_reserved(tmp_path, model_type):
    import sentencepiece as spm
    from preprocess_corpus import train_tiny_tokenizer

    path = train_tiny_tokenizer(str(tmp_path), vocab_size=80, model_type=model_type)
    sp = spm.SentencePieceProcessor(model_file=path)
    s = SPECIAL_TOKENS
    assert sp.get_piece_size() == 80
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (s.pad, s.bos, s.eos, s.unk) == (0, 1, 2, 3)
    assert [sp.piece_to_id(p) for p in ("<boi>", "<eoi>", "<frame>")] == [s.boi, s.eoi, s.frame] == [4, 5, 6]
    assert [sp.id_to_piece(i) for i in range(7, 16)] == [f"<reserved_{i}>" for i in range(7, 16)]
    assert all(sp.is_control(i) for i in range(4, 16))
    ids = sp.encode("a red cat <boi> <frame> <eoi> <s> house", out_type=int)
    assert ids and all(i == s.unk or i >= s.num_reserved for i in ids), ids
    written = SpecialTokens.from_json(path[: -len(".model")] + ".special_tokens.json")
    assert written == SPECIAL_TOKENS


def test_cli_trains_from_parquet_and_jsonl(tmp_path):
    from preprocess_corpus import load_tool, mixed_rows, write_jsonl_with_paths, write_parquet

    main = load_tool("train_tokenizer").main

    pq = write_parquet(str(tmp_path / "m.parquet"), mixed_rows(120))
    jl = write_jsonl_with_paths(str(tmp_path), 60)
    main(["--input", pq, jl, "--model-prefix", str(tmp_path / "tok" / "sp"), "--vocab-size", "64",
          "--model-type", "unigram", "--num-threads", "1"])
    assert os.path.isfile(tmp_path / "tok" / "sp.model")
    with open(tmp_path / "tok" / "sp.special_tokens.json") as f:
        assert json.load(f)["frame"] == 6


def test_vocab_below_reserved_is_rejected(tmp_path):
    from megafusion.preprocess.tokenizer_training import train_tokenizer

    with pytest.raises(ValueError, match="--vocab-size"):
        train_tokenizer([str(tmp_path / "x.jsonl")], str(tmp_path / "t"), vocab_size=10)
