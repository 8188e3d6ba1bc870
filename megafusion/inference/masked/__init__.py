"""megafusion.inference.masked: generation for the masked-diffusion family (objective.kind = masked_diffusion) by
iterative unmasking; this package's public names.

    from megafusion.inference.masked import MaskedGenerationConfig, MaskedPrompt, MaskedSampler
    results = MaskedSampler(model, vocab).generate([MaskedPrompt(ids, spans=[(IMAGE, 256)], seed=0)],
                                                   MaskedGenerationConfig(image_steps=12, cfg_scale=2.0))

scheduler.py: UnmaskingScheduler (how many positions each step reveals, and which); sampler.py: the prompt layout,
the generation loop (CFG, semi-autoregressive text blocks, batched prompts) and its settings.
"""

from megafusion.inference.masked.sampler import (
    MaskedGenerationConfig,
    MaskedGenerationResult,
    MaskedPrompt,
    MaskedSampler,
    SpanResult,
    UnmaskEvent,
    generate_masked,
    guide,
    layout_row,
    unconditional_prompt,
)
from megafusion.inference.masked.scheduler import UnmaskingScheduler, UnmaskingStepOutput, filtered_probs

__all__ = [
    "MaskedGenerationConfig", "MaskedGenerationResult", "MaskedPrompt", "MaskedSampler", "SpanResult",
    "UnmaskEvent", "UnmaskingScheduler", "UnmaskingStepOutput", "filtered_probs", "generate_masked", "guide",
    "layout_row", "unconditional_prompt",
]
