"""megafusion.model: the multimodal transformer on megatron-core (embeddings, layers, heads, model).

Names are imported lazily, so `import megafusion.model.attention...` does not build the whole model stack.
"""

import importlib

_EXPORTS = {
    "ModelOutput": "megafusion.model.output",
    "MultimodalModel": "megafusion.model.model",
    "model_provider": "megafusion.model.model",
    "MultimodalTransformerConfig": "megafusion.model.transformer_config",
    "build_transformer_config": "megafusion.model.transformer_config",
    "get_layer_spec": "megafusion.model.specs",
    "patchify": "megafusion.model.heads",
    "unpatchify": "megafusion.model.heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megafusion.model' has no attribute {name!r}")
