"""The masked demo's sampler-free conditioning probe (megafusion/demo/masked/probe.py), against fake forwards whose
answers are known: an oracle that predicts each scene's own codes, and one that predicts the first scene for all."""

import numpy as np
import pytest
import torch

from megafusion.config.loading import load_config
from megafusion.demo.masked.probe import conditioning_probe
from megafusion.demo.masked.run import IMAGE_TOKENIZER
from megafusion.demo.world import render, single_object_scene
from megafusion.discrete.vocab import IMAGE, TEXT
from megafusion.encoders.discrete import build_discrete_tokenizer
from megafusion.inference.masked.sampler import MaskedPrompt, layout_row
from megafusion.objectives.masked_diffusion import vocab_from_config


@pytest.fixture(scope="module")
def setup():
    vocab = vocab_from_config(load_config("configs/masked_diffusion_demo.yaml").objective.masked_diffusion)
    palette = build_discrete_tokenizer(IMAGE_TOKENIZER)
    scenes = [single_object_scene("square", "red", "left"), single_object_scene("square", "blue", "right")]
    captions = [[5, 6, 7], [8, 9]]
    return vocab, palette, scenes, captions


def _fake_forward(vocab, palette, code_rows, seen):
    """logits [s, n, V]: at row i's image positions, +20 on code_rows[i][j] (else 0)."""
    lo = vocab.content_range(IMAGE)[0]

    def forward(rows):
        seen.extend(np.asarray(r).tolist() for r in rows)
        length = max(len(r) for r in rows)
        logits = torch.zeros(length, len(rows), vocab.size)
        for i, row in enumerate(rows):
            start = int(np.flatnonzero(np.asarray(row) == vocab.bos(IMAGE))[0]) + 1
            for j, code in enumerate(code_rows[i]):
                logits[start + j, i, lo + int(code)] = 20.0
        return logits
    return forward


def test_oracle_scores_one_and_rows_are_the_generation_layout(setup):
    vocab, palette, scenes, captions = setup
    codes = [palette.encode(render(s)) for s in scenes]
    seen = []
    result = conditioning_probe(_fake_forward(vocab, palette, codes, seen), vocab, captions, scenes, palette)
    assert result["colour"] == {"accuracy": 1.0, "chance": 1 / 6, "n": 2}
    assert result["position"]["overlap"] == 1.0 and result["position"]["n"] == 2
    objects = [(c != 7).sum() for c in codes]
    assert result["position"]["chance"] == pytest.approx(np.mean(objects) / 64)
    expected = [layout_row(MaskedPrompt(ids=vocab.document("image_text", [(TEXT, c)]), spans=[(IMAGE, 64)]),
                           vocab)[0].tolist() for c in captions]
    assert seen == expected


def test_a_model_that_ignores_the_caption_scores_the_first_scene_only(setup):
    vocab, palette, scenes, captions = setup
    first = palette.encode(render(scenes[0]))
    result = conditioning_probe(_fake_forward(vocab, palette, [first, first], []), vocab, captions, scenes, palette,
                                batch_size=1)
    assert result["colour"]["accuracy"] == 0.5  # red is right for the red scene, wrong for the blue one
    assert result["position"]["overlap"] == 0.5  # left's patches are all wrong for the object on the right


def test_mismatched_inputs_are_refused(setup):
    vocab, palette, scenes, captions = setup
    with pytest.raises(ValueError, match="one caption per scene"):
        conditioning_probe(lambda rows: None, vocab, captions[:1], scenes, palette)


def test_bad_prompt_files_name_the_line(tmp_path):
    from megafusion.demo.masked.probe import _read_prompts

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "a", "text": "a red square", "generate": "image"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a JSON object"):
        _read_prompts(str(bad))
    bad.write_text('{"id": 3, "text": "a red square", "generate": "image"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: an image prompt needs string fields"):
        _read_prompts(str(bad))
    bad.write_text('{"id": "t", "generate": "text"}\n')
    with pytest.raises(ValueError, match="no prompts with"):
        _read_prompts(str(bad))


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from megafusion.demo.masked.probe import main

    rc = main(["--checkpoint", str(tmp_path / "nope"), "--prompts", "p.jsonl", "--truth", "t.json", "--out",
               str(tmp_path / "o.json")])
    assert rc == 2 and "no such folder" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
