"""Flow matching: flow-time sampling, noising (z_t, targets, per-block t), CFG condition dropout, velocity loss."""

import math

import numpy as np
import pytest
import torch

from megafusion.config.schema import ObjectiveConfig
from megafusion.data.batch import MODALITY_IMAGE
from megafusion.data.collate import FramePart, SequenceLayout, TextPart, collate
from megafusion.data.special_tokens import SPECIAL_TOKENS as ST
from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.objectives.flow_matching import (
    LatentIndex,
    apply_noise,
    captioned_items,
    flow_matching_loss,
    noise_batch,
    sample_timesteps,
    shift_timesteps,
)

A = [[2.0, 4.0], [0.0, 8.0]]


def _t(*ids):
    return TextPart(np.array(ids, dtype=np.int64))


def _f(rows, noised=True):
    return FramePart(np.array(rows, dtype=np.float32), noised=noised)


def hand_batch():
    """Row 0: doc 0 = text, image A (pos 4-5), text, video B1 (9-10) + B2 (11-12); doc 1 = clean image C (17-18).
    Row 1: text then image D (4-5). Blocks in latent-row order: A, B1, B2, C, D; media items: A, B, C, D."""
    row0 = SequenceLayout([
        [_t(ST.bos, 20, 21, ST.boi), _f(A), _t(ST.eoi, 22, ST.boi), _f([[1, 1], [2, 2]]), _f([[3, 3], [4, 4]]),
         _t(ST.eoi, ST.eos)],
        [_t(ST.bos, ST.boi), _f([[5, 5], [6, 6]], noised=False), _t(ST.eoi, 23)],
    ])
    row1 = SequenceLayout([[_t(ST.bos, 30, 31, ST.boi), _f([[7, 7], [8, 8]]), _t(ST.eoi)]])
    return collate([row0, row1], seq_length=24, patch_dim=2).validate()


def synthetic(kind="mixed", b=4, s=256, seed=0):
    spec = SyntheticSpec(vocab_size=64, seq_length=s, patch_dim=4, patches_per_frame=4, kind=kind)
    return SyntheticDocuments(spec, seed).batch(b).validate()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- index
def test_latent_index_blocks_and_items():
    idx = LatentIndex.from_batch(hand_batch())
    assert idx.num_blocks == 5 and idx.num_items == 4
    assert idx.block_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert idx.item_index.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3]  # the video's two frames are one item
    assert idx.item_start.tolist() == [4, 9, 17, 4]
    assert idx.item_noised.tolist() == [True, True, False, True]
    assert idx.item_row.tolist() == [0, 0, 0, 1] and idx.item_end.tolist() == [5, 12, 18, 5]


# ---------------------------------------------------------------------------------------------- hand-computed
def test_apply_noise_hand_computed():
    batch = hand_batch()
    t_block = torch.tensor([0.25, 0.5, 0.75, 0.9, 0.0])
    z0 = torch.tensor([[1.0, -1.0], [4.0, 0.0]] + [[0.5, 0.5]] * 6 + [[-2.0, 3.0], [1.0, 1.0]])
    out = apply_noise(batch, t_block, z0, torch.tensor([False, True, True, False])).validate()
    # image A, t = 0.25: z_t = 0.25 * z1 + 0.75 * z0, target z1 - z0
    assert torch.equal(out.noisy_latents[0:2], torch.tensor([[1.25, 0.25], [3.0, 2.0]]))
    assert torch.equal(out.velocity_target[0:2], torch.tensor([[1.0, 5.0], [-4.0, 8.0]]))
    # video frames B1 (t = 0.5) and B2 (t = 0.75) each have their own t
    assert torch.equal(out.noisy_latents[2:4], torch.tensor([[0.75, 0.75], [1.25, 1.25]]))
    assert torch.equal(out.noisy_latents[4:6], torch.tensor([[2.375, 2.375], [3.125, 3.125]]))
    # clean image C: untouched, t = 1, no target, not in the loss (its 0.9 draw is ignored)
    assert torch.equal(out.noisy_latents[6:8], batch.latents[6:8])
    assert torch.equal(out.velocity_target[6:8], torch.zeros(2, 2))
    # image D at t = 0: pure noise
    assert torch.equal(out.noisy_latents[8:10], z0[8:10])
    assert out.latent_t.tolist() == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 0.0, 0.0]
    assert out.fm_loss_mask.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 1, 1]
    # the loader's fields are not modified in place
    assert torch.equal(batch.noisy_latents, batch.latents) and batch.velocity_target is None


def test_condition_dropout_moves_context_start_of_chosen_items_only():
    batch = hand_batch()
    n = batch.num_latent_positions
    out = apply_noise(batch, torch.full((5,), 0.5), torch.zeros(n, 2), torch.tensor([False, True, True, False]))
    expected = batch.context_start.clone()
    expected[0, 9:13] = 9  # the whole video (both frames) sees only itself; C is clean, so never dropped
    assert torch.equal(out.context_start, expected)
    out = apply_noise(batch, torch.full((5,), 0.5), torch.zeros(n, 2), torch.tensor([True, False, False, True]))
    expected = batch.context_start.clone()
    expected[0, 4:6] = 4
    expected[1, 4:6] = 4
    assert torch.equal(out.context_start, expected)


def test_flow_matching_loss_hand_computed():
    layout = SequenceLayout([[_t(ST.bos, ST.boi), _f([[0, 0], [0, 0], [0, 0]]), _t(ST.eoi)]])
    batch = collate([layout], seq_length=8, patch_dim=2).replace(
        velocity_target=torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]),
        fm_loss_mask=torch.tensor([1.0, 1.0, 0.0]))
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    loss, count = flow_matching_loss(pred, batch)
    # ((1 + 4) + (4 + 9)) / (2 rows * 2 dims)
    assert loss.item() == pytest.approx(4.5) and count.item() == 2
    loss.backward()
    assert torch.allclose(pred.grad, torch.tensor([[0.5, 1.0], [1.0, 1.5], [0.0, 0.0]]))


def test_flow_matching_loss_zero_with_grad_when_nothing_noised():
    clean = hand_batch()
    clean = clean.replace(noised=torch.zeros_like(clean.noised))
    out = noise_batch(clean, ObjectiveConfig(), gen(0))
    assert torch.equal(out.noisy_latents, clean.latents) and (out.latent_t == 1).all()
    pred = torch.randn(out.num_latent_positions, 2, requires_grad=True)
    loss, count = flow_matching_loss(pred, out)
    assert loss.item() == 0.0 and count.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    text_only = noise_batch(synthetic("text", b=2), ObjectiveConfig(), gen(0))
    pred = torch.zeros(0, 4, requires_grad=True)
    loss, count = flow_matching_loss(pred, text_only)
    assert loss.item() == 0.0 and count.item() == 0 and loss.grad_fn is not None


def test_flow_matching_loss_requires_noised_batch():
    batch = hand_batch()
    with pytest.raises(ValueError, match="noise_batch"):
        flow_matching_loss(torch.zeros(batch.num_latent_positions, 2), batch)


# ---------------------------------------------------------------------------------------------- noise_batch
def test_noise_batch_follows_documented_draw_order():
    batch, cfg = synthetic("mixed"), ObjectiveConfig(cond_dropout=0.5)
    out = noise_batch(batch, cfg, gen(7))
    g = gen(7)
    idx = LatentIndex.from_batch(batch)
    t = sample_timesteps(idx.num_blocks, cfg, g)
    z0 = torch.randn(batch.latents.shape, generator=g)
    drop = torch.rand(idx.num_items, generator=g) < cfg.cond_dropout
    limit = (torch.rand(idx.num_items, generator=g) < cfg.caption_fraction) & captioned_items(batch, idx)
    assert limit.any()  # the default captioning rule is exercised
    ref = apply_noise(batch, t, z0, drop, limit_item=limit, caption_min_t=cfg.caption_min_t)
    for name in ("noisy_latents", "latent_t", "velocity_target", "fm_loss_mask", "context_start"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_noise_batch_deterministic_and_seed_dependent():
    batch, cfg = synthetic("mixed"), ObjectiveConfig()
    a, b, c = (noise_batch(batch, cfg, gen(s)) for s in (3, 3, 4))
    assert torch.equal(a.noisy_latents, b.noisy_latents) and torch.equal(a.context_start, b.context_start)
    assert not torch.equal(a.noisy_latents, c.noisy_latents)


@pytest.mark.parametrize("kind", ["mixed", "video", "multi_image"])
def test_one_t_per_block_and_per_frame(kind):
    batch = synthetic(kind, seed=1)
    out = noise_batch(batch, ObjectiveConfig(), gen(1)).validate()
    rows, pos = torch.nonzero(batch.modality == MODALITY_IMAGE, as_tuple=True)
    keys = rows * 10_000 + batch.block_ids[rows, pos]
    per_block = {}
    for k, t in zip(keys.tolist(), out.latent_t.tolist()):
        per_block.setdefault(k, set()).add(t)
    assert all(len(ts) == 1 for ts in per_block.values())  # constant inside a block
    values = [next(iter(ts)) for ts in per_block.values()]
    assert len(set(values)) == len(values)  # a fresh draw per block, video frames included
    assert all(0.0 <= v < 1.0 for v in values)
    # z_t and the target are consistent with the clean latents: z0 = z1 - v, z_t = t z1 + (1 - t) z0
    z0 = out.latents - out.velocity_target
    t = out.latent_t.unsqueeze(1)
    assert torch.allclose(out.noisy_latents, t * out.latents + (1 - t) * z0, atol=1e-5)
    assert abs(z0.mean().item()) < 0.1 and abs(z0.std().item() - 1.0) < 0.1


def test_clean_rows_untouched_in_synthetic_batch():
    batch = synthetic("mixed", seed=2)
    rows, pos = torch.nonzero(batch.image_positions, as_tuple=True)
    clean_rows = torch.arange(rows.numel()) % 3 == 0  # mark some frames' rows clean: make whole blocks clean
    block_key = rows * 10_000 + batch.block_ids[rows, pos]
    clean_blocks = set(block_key[clean_rows].tolist())
    is_clean = torch.tensor([k in clean_blocks for k in block_key.tolist()])
    noised = batch.noised.clone()
    noised[rows[is_clean], pos[is_clean]] = False
    batch = batch.replace(noised=noised)
    out = noise_batch(batch, ObjectiveConfig(cond_dropout=0.0), gen(5))
    assert torch.equal(out.noisy_latents[is_clean], batch.latents[is_clean])
    assert (out.latent_t[is_clean] == 1).all() and (out.fm_loss_mask[is_clean] == 0).all()
    assert (out.fm_loss_mask[~is_clean] == 1).all() and (out.latent_t[~is_clean] < 1).all()
    assert torch.equal(out.context_start, batch.context_start)  # cond_dropout = 0 never drops


def _items(batch):
    """Media items found independently: maximal runs of consecutive latent positions in one row."""
    items = []
    image = batch.image_positions
    for r in range(batch.batch_size):
        pos = torch.nonzero(image[r]).flatten().tolist()
        run = []
        for p in pos:
            if run and p != run[-1] + 1:
                items.append((r, run))
                run = []
            run.append(p)
        if run:
            items.append((r, run))
    return items


def test_condition_dropout_rate_and_exact_moves():
    batch, p = synthetic("mixed", b=8, seed=3), 0.3
    items = _items(batch)
    dropped = total = 0
    for seed in range(40):
        out = noise_batch(batch, ObjectiveConfig(cond_dropout=p), gen(seed))
        for r, run in items:
            cs_in, cs_out = batch.context_start[r, run], out.context_start[r, run]
            moved = not torch.equal(cs_in, cs_out)
            if moved:
                assert (cs_out == run[0]).all()  # the whole item, exactly to its first latent position
            dropped += moved
            total += 1
        text = ~batch.image_positions
        assert torch.equal(out.context_start[text], batch.context_start[text])
    rate, sigma = dropped / total, math.sqrt(p * (1 - p) / total)
    assert abs(rate - p) < 5 * sigma, (rate, total)


# ---------------------------------------------------------------------------------------------- timesteps
def test_uniform_timestep_statistics():
    t = sample_timesteps(200_000, ObjectiveConfig(), gen(0))
    assert t.dtype == torch.float32 and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002


def test_logit_normal_timestep_statistics():
    cfg = ObjectiveConfig(timestep_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)
    t = sample_timesteps(200_000, cfg, gen(0)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01


def test_shift_formula_and_direction_towards_noise():
    t = torch.linspace(0, 1, 101)
    s = 3.0
    shifted = shift_timesteps(t, s)
    assert torch.allclose(shifted, t / (t + s * (1 - t)))
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] < t[1:-1]).all()  # t = 1 is clean: a shift towards noise lowers t
    # in noise-level terms sigma = 1 - t it is the SD3 shift s * sigma / (1 + (s - 1) * sigma)
    sigma = 1 - t
    assert torch.allclose(1 - shifted, s * sigma / (1 + (s - 1) * sigma), atol=1e-6)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    # sampled: the median of shifted uniform t is 1 / (1 + s)
    drawn = sample_timesteps(100_000, ObjectiveConfig(timestep_shift=s), gen(0))
    assert abs(drawn.median().item() - 1 / (1 + s)) < 0.01
    with pytest.raises(ValueError, match="timestep_shift"):
        shift_timesteps(t, 0.5)


def test_bf16_latents_keep_dtype_and_loss_is_fp32():
    batch = synthetic("image", b=2, seed=4).to(dtype=torch.bfloat16)
    out = noise_batch(batch, ObjectiveConfig(), gen(0))
    assert out.noisy_latents.dtype == torch.bfloat16 and out.velocity_target.dtype == torch.bfloat16
    loss, _ = flow_matching_loss(torch.zeros_like(out.velocity_target), out)
    assert loss.dtype == torch.float32 and loss.item() > 0


# ---------------------------------------------------------------------------------------------- captioning rule
NOISE_FIELDS = ("noisy_latents", "latent_t", "velocity_target", "fm_loss_mask", "context_start")


def caption_batch():
    """Items in order, and whether a caption follows them in their document:
    row 0 doc 0: P then text 40 41 (yes); Q then only EOI EOS (no: EOS is no caption);
    row 0 doc 1: caption first, then R, EOI, EOS (no);
    row 1 doc 0: S then directly another image T (no), T then EOS (no);
    row 1 doc 1: U, EOI, end of document (no: the text that follows belongs to doc 2);
    row 1 doc 3: V then a one-token caption 46 (yes)."""
    img = [[1, 1], [2, 2]]
    row0 = SequenceLayout([
        [_t(ST.bos, ST.boi), _f(img), _t(ST.eoi, 40, 41, ST.boi), _f(img), _t(ST.eoi, ST.eos)],
        [_t(ST.bos, 42, 43, ST.boi), _f(img), _t(ST.eoi, ST.eos)],
    ])
    row1 = SequenceLayout([
        [_t(ST.bos, ST.boi), _f(img), _t(ST.eoi, ST.boi), _f(img), _t(ST.eoi, ST.eos)],
        [_t(ST.bos, ST.boi), _f(img), _t(ST.eoi)],
        [_t(ST.bos, 44, 45, ST.eos)],
        [_t(ST.bos, ST.boi), _f(img), _t(ST.eoi, 46, ST.eos)],
    ])
    return collate([row0, row1], seq_length=40, patch_dim=2).validate()


def test_captioned_items_definition():
    batch = caption_batch()
    idx = LatentIndex.from_batch(batch)
    assert idx.num_items == 7
    assert captioned_items(batch, idx).tolist() == [True, False, False, False, False, False, True]
    assert captioned_items(hand_batch()).tolist() == [True, False, True, False]  # C is captioned (but clean)


def test_apply_noise_limits_the_given_items_to_the_cleaner_times():
    batch = hand_batch()
    t_block = torch.tensor([0.25, 0.5, 0.75, 0.9, 0.0])
    z0 = torch.zeros(batch.num_latent_positions, 2)
    no = torch.zeros(4, dtype=torch.bool)
    out = apply_noise(batch, t_block, z0, no, limit_item=torch.tensor([True, True, True, False]), caption_min_t=0.5)
    # A: 0.5 + 0.5 * 0.25; both frames of video B; clean C stays at t = 1; D not limited
    assert out.latent_t.tolist() == [0.625, 0.625, 0.75, 0.75, 0.875, 0.875, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(out.noisy_latents[0:2], 0.625 * batch.latents[0:2])  # z_t uses the limited t
    plain = apply_noise(batch, t_block, z0, no)
    for name in NOISE_FIELDS:  # no limit given == all False, bit for bit
        assert torch.equal(getattr(plain, name), getattr(apply_noise(batch, t_block, z0, no, limit_item=no),
                                                         name)), name
    with pytest.raises(ValueError, match="limit_item has shape"):
        apply_noise(batch, t_block, z0, no, limit_item=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="objective.caption_min_t"):
        apply_noise(batch, t_block, z0, no, limit_item=no, caption_min_t=1.0)


def _old_stream(batch, cfg, seed):
    """noise_batch as it was before the captioning rule: t, z0, dropout draws only."""
    g = gen(seed)
    idx = LatentIndex.from_batch(batch)
    t = sample_timesteps(idx.num_blocks, cfg, g)
    z0 = torch.randn(batch.latents.shape, generator=g)
    return apply_noise(batch, t, z0, torch.rand(idx.num_items, generator=g) < cfg.cond_dropout)


def test_caption_fraction_zero_and_bagel_leave_the_old_stream_unchanged():
    batch = synthetic("mixed", b=6, seed=8)
    for cfg in (ObjectiveConfig(caption_fraction=0.0, cond_dropout=0.3),
                ObjectiveConfig(captioning="bagel", caption_fraction=1.0, cond_dropout=0.3)):
        out, ref = noise_batch(batch, cfg, gen(9)), _old_stream(batch, cfg, 9)
        for name in NOISE_FIELDS:
            assert torch.equal(getattr(out, name), getattr(ref, name)), (cfg.captioning, name)


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_caption_fraction_limits_captioned_items_only(fraction):
    batch = synthetic("mixed", b=8, seed=3)
    idx = LatentIndex.from_batch(batch)
    captioned = captioned_items(batch, idx) & idx.item_noised
    assert captioned.any() and (~captioned & idx.item_noised).any()  # both kinds are present
    cfg = ObjectiveConfig(caption_fraction=fraction, caption_min_t=0.6)
    limited_items = total = 0
    for seed in range(30):
        out = noise_batch(batch, cfg, gen(seed))
        free = noise_batch(batch, ObjectiveConfig(caption_fraction=0.0, caption_min_t=0.6), gen(seed))
        t, t0 = out.latent_t, free.latent_t  # the same t, z0 and dropout draws: only the limit differs
        assert torch.equal(out.context_start, free.context_start)
        changed = torch.zeros(idx.num_items, dtype=torch.bool).index_put_((idx.item_index,), t != t0,
                                                                          accumulate=True)
        assert not (changed & ~captioned).any()  # items not followed by a caption are never limited
        mapped = 0.6 + 0.4 * t0
        limited_row = changed[idx.item_index]
        assert torch.equal(t[limited_row], mapped[limited_row])  # the whole item: every block, every frame
        assert (t[limited_row] >= 0.6).all()
        if fraction == 1.0:
            assert torch.equal(changed, captioned)  # every captioned item is limited
        limited_items += int(changed.sum())
        total += int(captioned.sum())
    rate = limited_items / total
    assert abs(rate - fraction) < 5 * math.sqrt(max(fraction * (1 - fraction), 1e-9) / total) + 1e-9, rate
