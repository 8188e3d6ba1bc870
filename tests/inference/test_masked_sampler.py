"""Masked-diffusion sampling (megafusion/inference/masked): the unmasking scheduler's counts and steps, and the
sampler on a tiny random MultimodalModel (CFG, batching, determinism, semi-autoregressive blocks) and on an oracle
model whose logits name a known target."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distributed import megatron_single_process
from megafusion.config.schema import (Config, DataConfig, MaskedDiffusionConfig, ModelConfig, ObjectiveConfig,
                                      TrainingConfig)
from megafusion.discrete.vocab import AUDIO, IMAGE, TEXT, UnifiedVocab
from megafusion.inference.masked import sampler as sampler_module
from megafusion.inference.masked import (MaskedGenerationConfig, MaskedPrompt, MaskedSampler, UnmaskingScheduler,
                                         filtered_probs, guide, layout_row, unconditional_prompt)
from megafusion.objectives.masked_diffusion import schedule_beta

VOCAB = UnifiedVocab(40, 16, 8)
FAST = dict(text_steps=6, image_steps=3, audio_steps=3)


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    with megatron_single_process():
        yield


@pytest.fixture(scope="module")
def model():
    from megafusion.model import MultimodalModel
    from megafusion.model.transformer_config import build_transformer_config

    md = MaskedDiffusionConfig(text_vocab_size=40, image_codebook_size=16, audio_codebook_size=8)
    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                   ffn_hidden_size=96, vocab_size=VOCAB.size, modality_ffn=False,
                                   transformer_impl="local"),
                 data=DataConfig(seq_length=64),
                 objective=ObjectiveConfig(kind="masked_diffusion", masked_diffusion=md),
                 training=TrainingConfig(precision="fp32"))
    torch.manual_seed(0)
    return MultimodalModel(build_transformer_config(cfg)).eval()


def prompts():
    doc = VOCAB.document
    return [MaskedPrompt(doc("text", [(TEXT, [5, 6, 7])]), [(TEXT, 10)], seed=1),
            MaskedPrompt(doc("image_text", [(TEXT, [9, 3, 3, 8, 1, 2])]), [(IMAGE, 8)], seed=2),
            MaskedPrompt(doc("audio_text", [(TEXT, [4])]), [(AUDIO, 6)], seed=3),
            MaskedPrompt(doc("text", [(TEXT, [11, 12, 13, 14, 15])]), [(TEXT, 7), (IMAGE, 4)], seed=4)]


# ---------------------------------------------------------------- scheduler
@pytest.mark.parametrize("schedule,exponent", [("linear", 1.0), ("cosine", 1.0), ("polynomial", 2.0),
                                               ("polynomial", 0.5)])
@pytest.mark.parametrize("steps,n", [(10, 100), (12, 13), (32, 7), (1, 5), (4, 1), (5, 0)])
def test_counts_sum_to_masked_at_least_one_per_step(schedule, exponent, steps, n):
    s = UnmaskingScheduler()
    s.set_timesteps(steps, n, schedule, exponent)
    assert s.num_steps == min(steps, n) and sum(s.reveal_counts) == n
    assert all(c >= 1 for c in s.reveal_counts)
    assert s.remaining[0] == n and s.remaining[-1] == 0
    assert all(a > b for a, b in zip(s.remaining[:-1], s.remaining[1:]))  # strictly fewer masked after each step
    if (steps, n) == (10, 100):  # no correction needed: the masked count follows n * beta(t_k)
        grid = 1.0 - torch.arange(11, dtype=torch.float64) / 10
        expected = 100 * schedule_beta(schedule, grid, exponent)
        assert (torch.tensor(s.remaining, dtype=torch.float64) - expected).abs().max() <= 0.5 + 1e-9
        c = s.reveal_counts
        if schedule == "linear":
            assert max(c) - min(c) <= 1
        elif exponent == 0.5 or schedule == "cosine":
            assert c[0] < c[-1]  # concave beta (sin(pi t / 2): MaskGIT's cosine): few first, many last
        else:
            assert c[0] > c[-1]  # convex beta on t = 1 -> 0: many first


@pytest.mark.parametrize("order", ["confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_step_reveals_k_and_never_changes_revealed(order, temperature):
    mask, allowed = VOCAB.mask(IMAGE), VOCAB.allowed_ids(IMAGE)
    tokens = torch.full((30,), mask)
    tokens[:3] = torch.tensor([1, 2, 3])
    s = UnmaskingScheduler()
    s.set_timesteps(5, 27, "cosine")
    g, logits_g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for count in s.reveal_counts:
        masked = torch.nonzero(tokens == mask).squeeze(1)
        logits = torch.randn(masked.numel(), VOCAB.size, generator=logits_g)
        out = s.step(logits, masked, tokens, g, order, temperature, top_k=5, top_p=0.9, allowed_ids=allowed)
        changed = torch.nonzero(out.tokens != tokens).squeeze(1)
        assert changed.tolist() == out.revealed.tolist() and len(changed) == count
        assert bool(torch.isin(out.tokens[changed], allowed).all())
        tokens = out.tokens
    assert s.done and not bool((tokens == mask).any())
    with pytest.raises(RuntimeError):
        s.step(torch.zeros(0, VOCAB.size), torch.zeros(0, dtype=torch.long), tokens)


def test_confidence_order_reveals_most_probable_first():
    s = UnmaskingScheduler()
    s.set_timesteps(2, 4)  # reveals 2, then 2
    logits = torch.tensor([[0.0, 1.0], [0.0, 5.0], [3.0, 0.0], [0.0, 0.5]])
    out = s.step(logits, torch.tensor([10, 11, 12, 13]), torch.full((14,), -1), order="confidence")
    assert out.revealed.tolist() == [11, 12] and out.tokens[11].item() == 1 and out.tokens[12].item() == 0


def test_filtered_probs():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert (filtered_probs(scores, 1.0, top_k=2)[0, 2:] == 0).all()
    p = torch.softmax(scores[0], -1)
    kept = filtered_probs(scores, 1.0, top_p=float(p[0]) + 1e-3)[0]  # needs the first two
    assert (kept[:2] > 0).all() and (kept[2:] == 0).all() and torch.isclose(kept.sum(), torch.tensor(1.0))
    assert (filtered_probs(scores, 1.0, top_p=1e-6)[0] == torch.tensor([1.0, 0, 0, 0])).all()


# ---------------------------------------------------------------- layout
def test_layout_and_unconditional_prompt():
    ids = VOCAB.document("image_text", [(TEXT, [5, 6])])
    row, ranges = layout_row(MaskedPrompt(ids, [(IMAGE, 3), (TEXT, 2)]), VOCAB)
    assert ranges == [(6, 9), (11, 13)]
    assert row[5] == VOCAB.bos(IMAGE) and row[9] == VOCAB.eos(IMAGE) and (row[6:9] == VOCAB.mask(IMAGE)).all()
    assert row[10] == VOCAB.bos(TEXT) and row[13] == VOCAB.eos(TEXT) and (row[11:13] == VOCAB.mask(TEXT)).all()
    uncond = unconditional_prompt(ids, VOCAB)
    assert uncond[0] == ids[0] and (uncond[1:] == VOCAB.mask(TEXT)).all()


# ---------------------------------------------------------------- sampler on the tiny model
def test_generated_ids_in_allowed_range_and_no_mask_left(model):
    config = MaskedGenerationConfig(temperature=1.0, cfg_scale=2.0, block_length=4, **FAST)
    for p, r in zip(prompts(), MaskedSampler(model, VOCAB).generate(prompts(), config)):
        assert not bool(VOCAB.is_mask(np.array(r.tokens)).any())
        for (modality, length), span in zip(p.spans, r.spans):
            allowed = VOCAB.allowed_ids(modality).tolist()
            assert all(i in allowed for i in span.ids)
            assert len(span.ids) == length or modality == TEXT
            assert span.codes == (np.array(span.ids) - VOCAB.code_offsets[modality]).tolist()


def test_per_position_code_ranges_are_respected(model):
    """A tokenizer whose layout ties position j to a sub-codebook (Encodec: residual codebook j % n_q) gets only
    codes of that sub-codebook there."""
    from megafusion.encoders.discrete import build_discrete_tokenizer

    def two_books(j):  # audio codebook of 8 = two residual books of 4
        return (4 * (j % 2), 4 * (j % 2) + 4)

    config = MaskedGenerationConfig(temperature=1.0, **FAST)
    results = MaskedSampler(model, VOCAB, code_ranges={AUDIO: two_books}).generate(prompts(), config)
    codes = results[2].spans[0].codes
    assert len(codes) == 6 and all(two_books(j)[0] <= c < two_books(j)[1] for j, c in enumerate(codes))
    unrestricted = MaskedSampler(model, VOCAB).generate(prompts(), config)[2].spans[0].codes
    assert any(not two_books(j)[0] <= c < two_books(j)[1] for j, c in enumerate(unrestricted))  # it did bind
    assert build_discrete_tokenizer({"name": "mulaw", "config": {}}).code_range(5) == (0, 64)


def test_batched_cfg_forward_equals_two_forwards(model):
    sampler = MaskedSampler(model, VOCAB)
    rows = [layout_row(p, VOCAB)[0] for p in prompts()]
    uncond = [np.concatenate([unconditional_prompt(p.ids, VOCAB), r[len(p.ids):]]) for p, r in zip(prompts(), rows)]
    both = sampler.forward(rows + uncond, seq_length=32)
    cond_alone, uncond_alone = sampler.forward(rows, seq_length=32), sampler.forward(uncond, seq_length=32)
    for j, r in enumerate(rows):
        n = len(r)
        torch.testing.assert_close(both[:n, j], cond_alone[:n, j], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[:n, len(rows) + j], uncond_alone[:n, j], atol=1e-5, rtol=0)
    assert not torch.allclose(cond_alone[:, 1], uncond_alone[:, 1])  # the prompt does condition the logits
    guided = guide(cond_alone, uncond_alone, 3.0)
    lc, lu = torch.log_softmax(cond_alone, -1), torch.log_softmax(uncond_alone, -1)
    torch.testing.assert_close(guided, lu + 3.0 * (lc - lu))


def test_cfg_scale_one_is_conditional_only(model, monkeypatch):
    seen, last = [], []
    fwd = MaskedSampler.forward

    def recording(self, rows, seq_length=None):
        seen.append(len(rows))
        last[:] = [np.asarray(r) for r in rows]
        return fwd(self, rows, seq_length)

    monkeypatch.setattr(MaskedSampler, "forward", recording)
    config = MaskedGenerationConfig(cfg_scale=1.0, **FAST)
    plain = MaskedSampler(model, VOCAB).generate(prompts(), config)
    assert set(seen) == {4, 2, 1} and max(seen) == len(prompts())  # no unconditional rows; finished rows leave
    monkeypatch.setattr(sampler_module, "guidance_active", lambda scale: True)  # run both branches at s = 1
    seen.clear()
    both = MaskedSampler(model, VOCAB).generate(prompts(), config)
    assert max(seen) == 2 * len(prompts())
    p = prompts()[3]  # the last call: its conditional row and the unconditional one (prompt content masked)
    cond, uncond = last
    n = len(p.ids)
    assert (uncond[:n] == unconditional_prompt(p.ids, VOCAB)).all() and (uncond[n:] == cond[n:]).all()
    assert (cond[:n] == p.ids).all()
    assert [r.tokens for r in plain] == [r.tokens for r in both]


@pytest.mark.parametrize("settings", [dict(cfg_scale=2.0, block_length=4),
                                      dict(temperature=1.0, top_k=10, top_p=0.9, order="random")])
def test_batched_prompts_equal_one_by_one(model, settings):
    config = MaskedGenerationConfig(**FAST, **settings)
    sampler = MaskedSampler(model, VOCAB)
    batched = sampler.generate(prompts(), config)
    for p, r in zip(prompts(), batched):
        alone = sampler.generate([p], config)[0]
        assert alone.tokens == r.tokens and alone.trace == r.trace


def test_greedy_is_deterministic_and_seeded_random_order_reproducible(model):
    sampler = MaskedSampler(model, VOCAB)
    p = prompts()[3]
    greedy = MaskedGenerationConfig(**FAST)
    a = sampler.generate([p], greedy)[0]
    b = sampler.generate([MaskedPrompt(p.ids, p.spans, seed=99)], greedy)[0]  # greedy ignores the seed
    assert a.tokens == b.tokens and a.trace == b.trace
    rand = MaskedGenerationConfig(temperature=1.0, order="random", **FAST)
    c, d = sampler.generate([p], rand)[0], sampler.generate([p], rand)[0]
    assert c.tokens == d.tokens and c.trace == d.trace
    e = sampler.generate([MaskedPrompt(p.ids, p.spans, seed=5)], rand)[0]
    assert e.trace != c.trace


def test_semi_autoregressive_blocks_unmask_left_to_right(model):
    config = MaskedGenerationConfig(text_steps=8, block_length=5, order="random", temperature=1.0)
    p = MaskedPrompt(VOCAB.document("text", [(TEXT, [5, 6])]), [(TEXT, 17)], seed=0)
    (start, end), = layout_row(p, VOCAB)[1]
    r = MaskedSampler(model, VOCAB).generate([p], config)[0]
    blocks = [(lo, min(lo + 5, end)) for lo in range(start, end, 5)]  # 4 blocks, 2 steps each
    assert [e.block for e in r.trace] == [0, 0, 1, 1, 2, 2, 3, 3]
    revealed = set()
    for e in r.trace:
        lo, hi = blocks[e.block]
        assert all(lo <= q < hi for q in e.positions)
        assert all(q in revealed for b in range(e.block) for q in range(*blocks[b]))  # earlier blocks finished
        revealed.update(e.positions)
    assert revealed == set(range(start, end))


# ---------------------------------------------------------------- oracle model
class OracleModel:
    """Logits that put all mass on target[p] at every position p of every row."""

    def __init__(self, target):
        self.target = torch.as_tensor(target)

    def __call__(self, batch):
        b, s = batch.tokens.shape
        logits = torch.full((s, b, VOCAB.size), -1e4)
        n = min(s, len(self.target))
        logits[torch.arange(n), :, self.target[:n]] = 0.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("order", ["confidence", "random"])
@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 1.0), (1.0, 2.5)])
def test_oracle_model_target_is_reproduced(order, temperature, cfg_scale):
    p = MaskedPrompt(VOCAB.document("image_text", [(TEXT, [3, 4, 5])]), [(TEXT, 6), (IMAGE, 8), (AUDIO, 5)], seed=7)
    row, ranges = layout_row(p, VOCAB)
    rng = np.random.default_rng(0)
    text = [7, 8, 9, 10, VOCAB.eos(TEXT), 11]
    image = VOCAB.codes_to_ids(IMAGE, rng.integers(0, 16, 8)).tolist()
    audio = VOCAB.codes_to_ids(AUDIO, rng.integers(0, 8, 5)).tolist()
    target = row.copy()
    for (lo, hi), ids in zip(ranges, [text, image, audio]):
        target[lo:hi] = ids
    config = MaskedGenerationConfig(order=order, temperature=temperature, cfg_scale=cfg_scale, block_length=3, **FAST)
    r = MaskedSampler(OracleModel(target), VOCAB).generate([p], config)[0]
    assert r.tokens == target.tolist()
    assert [s.ids for s in r.spans] == [text[:4], image, audio]
    assert r.spans[1].codes == (np.array(image) - VOCAB.code_offsets[IMAGE]).tolist()
    assert len(r.trace) == FAST["text_steps"] + FAST["image_steps"] + FAST["audio_steps"]
    assert math.isclose(sum(len(e.positions) for e in r.trace), 6 + 8 + 5)
