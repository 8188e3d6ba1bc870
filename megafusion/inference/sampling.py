"""Next-token choice from one row's logits: greedy, temperature, top-k, top-p, with the row's own generator.

Every row samples with its own torch.Generator (seeded per prompt), one draw per sampled token, so a prompt gives
the same tokens alone or in any batch, and a seed fixes the output. Tokens the model must never emit as text are
masked first: PAD/BOS/UNK/FRAME and the spare reserved ids, EOI (the engine appends it after an image), and BOI
when images are not allowed. Sampling sees only the real vocabulary: the tensor-parallel padding of the logits
(whose length depends on the TP size) is cut off first, so every layout draws from the same distribution with the
same random numbers.
"""

from __future__ import annotations

from typing import Optional

import torch

from megafusion.data.special_tokens import SPECIAL_TOKENS, SpecialTokens
from megafusion.inference.settings import GenerationConfig


def banned_ids(vocab_size: int, allow_images: bool, special: SpecialTokens = SPECIAL_TOKENS) -> torch.Tensor:
    """[vocab_size] bool, True for ids text sampling never returns."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[: special.num_reserved] = True
    banned[special.eos] = False
    if allow_images:
        banned[special.boi] = False
    return banned


def sample_token(logits: torch.Tensor, settings: GenerationConfig, banned: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> int:
    """logits [V_padded] (one row, full vocabulary, maybe padded) -> a token id below len(banned)."""
    scores = logits[: banned.numel()].float().cpu().masked_fill(banned, float("-inf"))
    if settings.temperature == 0.0:
        return int(torch.argmax(scores).item())
    probs = filtered_probs(scores[None], settings.temperature, settings.top_k, settings.top_p)[0]
    return int(torch.multinomial(probs, 1, generator=generator).item())


def filtered_probs(scores: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The sampling distribution of every row of scores [n, A] (temperature > 0): divide by the temperature, keep
    the top_k largest, keep the smallest set reaching top_p (the most likely id always kept), renormalise."""
    scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely ids
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(before >= top_p, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
