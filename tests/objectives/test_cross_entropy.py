"""Text cross-entropy: masked mean against torch's reference (TP=2 vs TP=1: test_objectives_distributed.py)."""

import pytest
import torch
import torch.nn.functional as F

from megafusion.data.synthetic import SyntheticDocuments, SyntheticSpec
from megafusion.objectives.cross_entropy import text_cross_entropy

VOCAB = 64


def make_batch(kind="mixed", b=2, s=64, seed=0):
    spec = SyntheticSpec(vocab_size=VOCAB, seq_length=s, patch_dim=4, patches_per_frame=4, kind=kind, fill=0.8)
    return SyntheticDocuments(spec, seed).batch(b).validate()


def reference_ce(logits, batch):
    """Plain torch: [b, s] masked mean of F.cross_entropy."""
    lg = logits.transpose(0, 1).reshape(-1, logits.shape[-1])  # [b*s, V]
    per = F.cross_entropy(lg, batch.labels.reshape(-1), reduction="none")
    mask = batch.loss_mask.reshape(-1)
    return (per * mask).sum() / mask.sum()


def test_masked_cross_entropy_matches_torch():
    batch = make_batch()
    assert 0 < batch.num_text_targets < batch.loss_mask.numel()  # a genuinely masked case (images, padding)
    logits = torch.randn(batch.seq_length, batch.batch_size, VOCAB, generator=torch.Generator().manual_seed(0))
    logits.requires_grad_(True)
    before = logits.detach().clone()
    loss, count = text_cross_entropy(logits, batch)
    ref_logits = before.clone().requires_grad_(True)
    ref = reference_ce(ref_logits, batch)
    assert count.item() == batch.num_text_targets
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    ref.backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-7)
    assert torch.equal(logits.detach(), before)  # the caller's logits are not modified
    # masked-out positions get no gradient
    masked = batch.loss_mask.t() == 0
    assert (logits.grad[masked] == 0).all()


def test_cross_entropy_zero_with_grad_when_no_targets():
    batch = make_batch("image", b=1, s=16)
    batch = batch.replace(loss_mask=torch.zeros_like(batch.loss_mask))
    logits = torch.randn(16, 1, VOCAB, requires_grad=True)
    loss, count = text_cross_entropy(logits, batch)
    assert loss.item() == 0.0 and count.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_rejects_batch_first_logits():
    batch = make_batch(b=2, s=64)
    with pytest.raises(ValueError, match="sequence-first"):
        text_cross_entropy(torch.zeros(2, 64, VOCAB), batch)
