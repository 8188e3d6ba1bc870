"""Text sampling: greedy, top-k / top-p truncation, banned ids, temperature statistics, per-row generators, and the
GenerationConfig checks."""

from __future__ import annotations

import pytest
import torch

from megafusion.data.special_tokens import SPECIAL_TOKENS as ST
from megafusion.inference.sampling import banned_ids, sample_token
from megafusion.inference.settings import GenerationConfig

V, PADDED = 40, 64


def logits_with(peaks):
    x = torch.zeros(PADDED)
    for i, v in peaks.items():
        x[i] = v
    return x


def test_banned_ids():
    banned = banned_ids(V, allow_images=True)
    assert banned.shape == (V,) and banned[ST.pad] and banned[ST.frame] and banned[ST.eoi] and banned[ST.bos]
    assert not banned[ST.eos] and not banned[ST.boi] and not banned[ST.num_reserved:V].any()
    assert banned_ids(V, allow_images=False)[ST.boi]


def test_the_padding_of_the_vocabulary_never_changes_a_draw():
    # TP=1 and TP=2 pad the logits to different lengths; the draws must not depend on it
    banned = banned_ids(V, True)
    x = torch.randn(V, generator=torch.Generator().manual_seed(2))
    settings = GenerationConfig(temperature=1.0, top_k=20, top_p=0.9)
    for pad in (0, 24, 88):
        padded = torch.cat([x, torch.full((pad,), 5.0)])  # large junk logits in the padding
        g = torch.Generator().manual_seed(7)
        draws = [sample_token(padded, settings, banned, g) for _ in range(30)]
        if pad == 0:
            reference = draws
        assert draws == reference and max(draws) < V


def test_greedy_and_truncation():
    banned = banned_ids(V, True)
    x = logits_with({ST.frame: 50.0, V + 3: 60.0, 20: 5.0, 21: 4.9, 22: 1.0})
    assert sample_token(x, GenerationConfig(temperature=0.0), banned) == 20  # banned peaks are skipped
    g = torch.Generator().manual_seed(0)
    top1 = GenerationConfig(temperature=5.0, top_k=1)
    assert {sample_token(x, top1, banned, g) for _ in range(50)} == {20}
    nucleus = GenerationConfig(temperature=1.0, top_p=0.6)  # 20 and 21 hold ~0.5 each of the mass
    assert {sample_token(x, nucleus, banned, g) for _ in range(200)} == {20, 21}
    tight = GenerationConfig(temperature=1.0, top_p=0.01)
    assert {sample_token(x, tight, banned, g) for _ in range(50)} == {20}


def test_temperature_sampling_follows_the_softmax():
    banned = banned_ids(V, True)
    x = torch.full((PADDED,), -30.0)  # EOS and BOI are allowed tokens too: keep them unlikely
    x[20], x[21], x[22] = 2.0, 1.0, 0.0
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample_token(x, GenerationConfig(temperature=2.0), banned, g) for _ in range(3000)])
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 2.0, 0)
    observed = torch.stack([(draws == i).float().mean() for i in (20, 21, 22)])
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


def test_a_generator_fixes_the_draws():
    banned = banned_ids(V, True)
    x = torch.randn(PADDED, generator=torch.Generator().manual_seed(3))
    settings = GenerationConfig(temperature=1.0, top_k=10, top_p=0.9)
    a = [sample_token(x, settings, banned, torch.Generator().manual_seed(5)) for _ in range(5)]
    g = torch.Generator().manual_seed(5)
    b = [sample_token(x, settings, banned, g) for _ in range(5)]
    assert len(set(a)) == 1 and b[0] == a[0] and len(set(b)) > 1


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -1.0, "temperature=-1.0 must be >= 0"),
    ("top_p", 0.0, r"top_p=0.0 must be in \(0, 1\]"),
    ("steps", 0, "steps=0 must be >= 1"),
    ("solver", "rk4", "solver='rk4' is not one of"),
    ("timestep_shift", 0.5, "timestep_shift=0.5 must be >= 1"),
    ("cfg_interval", (0.8, 0.2), "cfg_interval=.* must be two flow times"),
    ("frames", 0, "frames=0 must be >= 1"),
])
def test_generation_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**{field: value})


def test_guidance_interval():
    settings = GenerationConfig(cfg_scale=3.0, cfg_interval=(0.4, 1.0))
    assert not settings.guided(0.2) and settings.guided(0.4) and settings.guided(1.0)
    assert not GenerationConfig(cfg_scale=1.0).guided(0.5)
