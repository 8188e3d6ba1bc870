"""megafusion.inference: generation from a trained checkpoint (docs/inference.md).

    from megafusion.inference import GenerationConfig, Prompt, load_for_generation
    gen = load_for_generation("runs/demo")
    results = gen.engine.generate([Prompt(parts=[gen.tokenizer.encode("a red circle")], force_image=True)],
                                  GenerationConfig(steps=25, cfg_scale=3.0))

Names are imported lazily, so importing one module does not build the whole stack.
"""

import importlib

_EXPORTS = {
    "Engine": "megafusion.inference.engine",
    "Prompt": "megafusion.inference.engine",
    "GenerationResult": "megafusion.inference.engine",
    "PromptTooLongError": "megafusion.inference.engine",
    "GenerationConfig": "megafusion.inference.settings",
    "FlowMatchScheduler": "megafusion.inference.scheduler",
    "KVCache": "megafusion.inference.kv_cache",
    "InferenceStep": "megafusion.inference.kv_cache",
    "load_for_generation": "megafusion.inference.loading",
    "read_prompt_file": "megafusion.inference.prompts",
    "encode_prompts": "megafusion.inference.prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megafusion.inference' has no attribute {name!r}")
