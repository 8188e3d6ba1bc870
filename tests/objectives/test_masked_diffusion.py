"""The masked-diffusion objective: masking statistics per modality, the ELBO weight against the exact sum over all
masks, anti-masking's complementarity and variance reduction, the loss over vocab-parallel logits."""

import math
from itertools import product

import numpy as np
import pytest
import torch

from megafusion.config.schema import MaskedDiffusionConfig, MaskScheduleConfig
from megafusion.discrete.batch import discrete_batch
from megafusion.discrete.vocab import AUDIO, IMAGE, MODALITY_NAMES, TEXT, UnifiedVocab
from megafusion.objectives.masked_diffusion import (drop_vocab_padding, mask_batch, masked_copy,
                                                    masked_diffusion_loss, schedule_beta, schedule_weight)

VOCAB = UnifiedVocab(30, 16, 8)


def _cfg(**kw):
    return MaskedDiffusionConfig(text_vocab_size=30, image_codebook_size=16, audio_codebook_size=8, **kw)


def _rows(n):
    img = VOCAB.document("image_text", [(TEXT, np.arange(6)), (IMAGE, VOCAB.codes_to_ids(IMAGE, np.arange(12)))])
    aud = VOCAB.document("audio_text", [(TEXT, np.arange(4)), (AUDIO, VOCAB.codes_to_ids(AUDIO, np.arange(10) % 8))])
    return discrete_batch([[img] if r % 2 else [aud] for r in range(n)], 24, VOCAB)


@pytest.mark.parametrize("kind, exponent", [("linear", 1.0), ("cosine", 1.0), ("polynomial", 3.0)])
def test_schedules_run_from_zero_to_one_and_the_weight_is_the_log_derivative(kind, exponent):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    beta = schedule_beta(kind, t, exponent)
    assert schedule_beta(kind, torch.tensor([0.0, 1.0], dtype=torch.float64), exponent).tolist() == \
        pytest.approx([0.0, 1.0])
    assert (beta[1:] > beta[:-1]).all()
    h = 1e-6
    numeric = (schedule_beta(kind, t + h, exponent) - schedule_beta(kind, t - h, exponent)) / (2 * h) / beta
    assert torch.allclose(schedule_weight(kind, t, exponent), numeric, rtol=1e-5)


def test_masking_rate_matches_each_modalitys_schedule():
    cfg = _cfg(text_schedule=MaskScheduleConfig("linear"), image_schedule=MaskScheduleConfig("cosine"),
               audio_schedule=MaskScheduleConfig("polynomial", 3.0))
    batch = _rows(4000)
    g = torch.Generator().manual_seed(0)
    for t_value in (0.2, 0.6, 0.9):
        t = torch.full((batch.batch_size,), t_value, dtype=torch.float64)
        u = torch.rand(batch.tokens.shape, generator=g, dtype=torch.float64)
        out = masked_copy(batch, VOCAB, cfg, t, u)
        masked = VOCAB.is_mask(out.tokens)
        assert (masked == (out.loss_mask > 0)).all()
        for m, name in enumerate(MODALITY_NAMES):
            sel = batch.token_modality == m
            sched = getattr(cfg, f"{name}_schedule")
            beta = float(schedule_beta(sched.kind, torch.tensor(t_value), sched.exponent))
            rate = masked[sel].double().mean().item()
            se = math.sqrt(beta * (1 - beta) / sel.sum().item())
            assert abs(rate - beta) < 5 * se + 1e-9, (name, t_value, rate, beta)
            # the masked token is the modality's own MASK; the weight is the schedule's
            assert (out.tokens[sel & masked] == VOCAB.mask(m)).all()
            w = float(schedule_weight(sched.kind, torch.tensor(t_value, dtype=torch.float64), sched.exponent))
            assert torch.allclose(out.loss_mask[sel & masked].double(), torch.tensor(w, dtype=torch.float64))
    assert (out.tokens[batch.token_modality < 0] == batch.tokens[batch.token_modality < 0]).all()  # padding kept
    assert (out.labels == batch.labels).all()


@pytest.mark.parametrize("kind, exponent", [("linear", 1.0), ("polynomial", 2.0), ("cosine", 1.0)])
def test_elbo_weight_is_unbiased_against_the_exact_sum_over_masks(kind, exponent):
    """For a sequence of L positions and any 'model' g(i, M) = -log p(x_i | x outside M), the expected weighted loss
    equals sum_M B(|M|, L - |M| + 1) sum_{i in M} g(i, M) (the integral of w(t) beta^k (1 - beta)^(L-k) over t is
    that Beta function whatever the schedule)."""
    vocab = UnifiedVocab(20)
    doc = vocab.document("text", [(TEXT, np.arange(2))])  # task, BOS, 2 ids, EOS: L = 5
    L, rows = len(doc), 200_000
    batch = discrete_batch([[doc]] * rows, L, vocab)
    schedule = MaskScheduleConfig(kind, exponent)
    cfg = MaskedDiffusionConfig(text_vocab_size=20, text_schedule=schedule, t_floor=1e-6)
    g = torch.Generator().manual_seed(1)
    table = torch.rand(L, 2 ** L, generator=g, dtype=torch.float64)  # g(i, mask bitmask)
    exact = 0.0
    for bits in product((0, 1), repeat=L):
        k = sum(bits)
        if k == 0:
            continue
        code = sum(b << i for i, b in enumerate(bits))
        beta_fn = math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L)
        exact += beta_fn * sum(table[i, code].item() for i in range(L) if bits[i])
    exact /= L
    t = torch.rand(rows, generator=g, dtype=torch.float64)
    u = torch.rand(rows, L, generator=g, dtype=torch.float64)
    out = masked_copy(batch, vocab, cfg, t, u)
    masked = (out.loss_mask > 0).long()
    codes = (masked << torch.arange(L)).sum(1)
    per_row = (out.loss_mask.double() * table[:, codes].t()).sum(1) / L
    se = per_row.std().item() / math.sqrt(rows)
    assert abs(per_row.mean().item() - exact) < 4 * se, (per_row.mean().item(), exact, se)


def test_anti_masking_copies_are_complementary():
    batch = _rows(64)
    out = mask_batch(batch, _cfg(anti_masking=True), VOCAB, torch.Generator().manual_seed(3))
    assert out.batch_size == 2 * batch.batch_size
    a, b = (out.loss_mask > 0)[:64], (out.loss_mask > 0)[64:]
    # from the same uniforms: a masks u < beta, b masks u > 1 - beta (disjoint below beta = 1/2, covering above)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(64, generator=g, dtype=torch.float64).clamp(min=1e-3)
    for r in range(64):
        valid = batch.token_modality[r] >= 0
        if t[r] <= 0.5:  # text and audio here are linear / polynomial-free defaults: beta = t for every modality
            assert not (a[r] & b[r]).any()
        else:
            assert ((a[r] | b[r]) == valid).all()
    for name in ("labels", "document_ids", "block_ids", "context_start", "token_modality"):
        assert torch.equal(getattr(out, name)[:64], getattr(out, name)[64:])


def test_anti_masking_lowers_the_variance_of_the_masking_pattern():
    """At a given t the two complementary copies' average varies far less than the average of two independent
    masks (at t = 1/2 the copies partition the sequence: no pattern variance at all)."""
    vocab = UnifiedVocab(20)
    L, rows = 16, 20_000
    batch = discrete_batch([[vocab.document("text", [(TEXT, np.arange(L - 3))])]] * rows, L, vocab)
    cfg = MaskedDiffusionConfig(text_vocab_size=20)
    g = torch.Generator().manual_seed(0)
    cost = 2 * torch.rand(L, generator=g, dtype=torch.float64)

    def estimate(out):  # a loss that grows with how much is masked, as a model's does
        m = out.loss_mask.double()
        return (m * (cost + (m > 0).double().mean(1, keepdim=True))).sum(1) / L

    for t_value, most in ((0.3, 0.7), (0.5, 0.05), (0.7, 0.7)):
        t = torch.full((rows,), t_value, dtype=torch.float64)
        u, v = (torch.rand(rows, L, generator=g, dtype=torch.float64) for _ in range(2))
        first = estimate(masked_copy(batch, vocab, cfg, t, u))
        anti = (first + estimate(masked_copy(batch, vocab, cfg, t, u, complementary=True))) / 2
        independent = (first + estimate(masked_copy(batch, vocab, cfg, t, v))) / 2
        assert anti.var() < most * independent.var(), (t_value, anti.var().item(), independent.var().item())
        assert anti.mean().item() == pytest.approx(independent.mean().item(), rel=0.02)


def test_loss_is_the_weighted_ce_per_position_and_ignores_vocab_padding():
    batch = _rows(3)
    out = mask_batch(batch, _cfg(), VOCAB, torch.Generator().manual_seed(5))
    s, b = out.seq_length, out.batch_size
    padded = 128
    logits = torch.randn(s, b, padded, requires_grad=True)
    total, report = masked_diffusion_loss(logits, out, VOCAB.size)
    ref = torch.nn.functional.cross_entropy(logits[..., :VOCAB.size].reshape(s * b, -1), out.labels.t().reshape(-1),
                                            reduction="none").view(s, b)
    weighted = ref * out.loss_mask.t()
    valid = (out.token_modality.t() >= 0)
    assert total.item() == pytest.approx((weighted.sum() / valid.sum()).item(), rel=1e-6)
    for m, name in enumerate(MODALITY_NAMES):
        sel = out.token_modality.t() == m
        assert report[f"md_sum_{name}"].item() == pytest.approx(weighted[sel].sum().item(), rel=1e-6)
        assert report[f"md_count_{name}"].item() == sel.sum().item()
    total.backward()
    assert logits.grad[..., VOCAB.size:].abs().max() == 0  # padded columns take no part
    assert torch.isinf(drop_vocab_padding(logits.detach(), VOCAB.size)[..., VOCAB.size:]).all()


def test_masks_depend_only_on_the_generator():
    batch = _rows(8)
    one = mask_batch(batch, _cfg(anti_masking=True), VOCAB, torch.Generator().manual_seed(7))
    two = mask_batch(batch, _cfg(anti_masking=True), VOCAB, torch.Generator().manual_seed(7))
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.loss_mask, two.loss_mask)
    one.validate()


def test_conditioning_rows_keep_their_text_or_media_clean():
    batch = discrete_batch([[VOCAB.document("text", [(TEXT, np.arange(5))])]] * 100 + 400 * [[
        VOCAB.document("image_text", [(TEXT, np.arange(6)), (IMAGE, VOCAB.codes_to_ids(IMAGE, np.arange(12)))])]],
        24, VOCAB)
    out = mask_batch(batch, _cfg(clean_text_fraction=0.5, clean_media_fraction=0.25), VOCAB,
                     torch.Generator().manual_seed(11))
    masked = out.loss_mask > 0
    assert (VOCAB.is_mask(out.tokens) == masked).all()  # a clean position is neither masked nor in the loss
    tm = batch.token_modality
    text_masked = (masked & (tm == TEXT)).any(1)
    media_masked = (masked & (tm > TEXT)).any(1)
    mixed = slice(100, None)
    keep_text = (~text_masked[mixed] & media_masked[mixed]).float().mean().item()
    keep_media = (text_masked[mixed] & ~media_masked[mixed]).float().mean().item()
    assert 0.4 < keep_text < 0.6 and 0.15 < keep_media < 0.35  # 1/2 and 1/4 of the mixed rows (up to t ~ 0 rows)
    assert text_masked[:100].float().mean() > 0.5  # text-only rows are masked as before


def test_unweighted_schedule_puts_weight_one_on_masked_positions():
    cfg = _cfg(image_schedule=MaskScheduleConfig("cosine", weighting="none"))
    out = mask_batch(_rows(64), cfg, VOCAB, torch.Generator().manual_seed(2))
    image = (out.token_modality == IMAGE) & (out.loss_mask > 0)
    text = (out.token_modality == TEXT) & (out.loss_mask > 0)
    assert image.any() and (out.loss_mask[image] == 1).all()
    assert (out.loss_mask[text] >= 1).all() and (out.loss_mask[text] > 1).any()  # text keeps its 1/t weight
